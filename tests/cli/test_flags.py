"""Flags that would silently do nothing are refused at start: a binding of a macro no loaded gin
file uses (a typo), and step counts, periods, batch sizes and limits of 0 or less. Every error
here comes before a model is loaded, so no checkpoint is needed (the path is never read)."""
import pathlib
import re
import shlex

import gin
import pytest

from prompt_tuning import eval as eval_main
from prompt_tuning.cli import flags
from prompt_tuning.cli import gin_utils
from prompt_tuning import infer as infer_main
from prompt_tuning import multi_infer
from prompt_tuning import train as train_main

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train_flags(model_dir, *extra):
  return [
      "--gin_file=models/from_checkpoint.gin",
      "--gin_file=runs/prompt_finetune.gin",
      "--gin.INITIAL_CHECKPOINT_PATH='/never/read'",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'",
      "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
      *extra,
  ]


def _eval_flags(run_file, *extra):
  return ["--gin_file=models/from_checkpoint.gin", f"--gin_file={run_file}",
          "--gin.INITIAL_CHECKPOINT_PATH='/never/read'",
          "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'",
          "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'", *extra]


# --- Macros no loaded file uses -----------------------------------------------------------------

def test_a_misspelt_macro_is_refused_naming_the_right_one(tmp_path):
  model_dir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train_main.main(_train_flags(model_dir, "--gin.TASK_FEATURE_LENGHTS={'inputs': 9}"))
  text = str(e.value)
  assert "TASK_FEATURE_LENGHTS" in text and "did you mean TASK_FEATURE_LENGTHS?" in text
  assert "--gin.TASK_FEATURE_LENGTHS=" in text and "\n" not in text  # one line for run_main
  assert not model_dir.exists()


def test_a_macro_of_a_file_not_loaded_names_that_file():
  """PROMPT_FILE is read only by prompts/from_file.gin."""
  with pytest.raises(ValueError, match=r"PROMPT_FILE.*--gin_file=prompts/from_file\.gin"):
    flags.parse_args(_eval_flags("runs/prompt_eval.gin", "--gin.PROMPT_FILE='p.npy'"), "")


def test_a_lowercase_macro_binding_is_refused_too():
  """`--gin.train_steps=5` binds a macro named train_steps, not runs.train.train_steps."""
  with pytest.raises(ValueError, match="did you mean TRAIN_STEPS"):
    flags.parse_args(_train_flags("/unused", "--gin_bindings=train_steps = 5"), "")


def test_known_macros_still_parse():
  flags.parse_args(_train_flags("/unused", "--gin.TASK_FEATURE_LENGTHS={'inputs': 9, "
                                    "'targets': 3}", "--gin.LEARNING_RATE=1e30"), "")
  assert gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value") == {"inputs": 9, "targets": 3}
  # The optimizer reads LEARNING_RATE, so even 1e30 is a real setting (the NaN guard handles it).
  assert str(gin.query_parameter("optimizers.prompt_tuning_optimizer.learning_rate")) == (
      "%LEARNING_RATE")


def test_a_macro_only_a_binding_references_parses():
  flags.parse_args(_train_flags("/unused", "--gin.runs.train.train_steps=%STEPS",
                                    "--gin.STEPS=7"), "")
  assert gin.query_parameter("STEPS/macro.value") == 7


@pytest.mark.parametrize("use", ["defines", "references"])
def test_a_macro_of_an_included_file_parses(tmp_path, use):
  """A macro that only a file pulled in by `include` (after the others) defines or reads."""
  (tmp_path / "top.gin").write_text("include 'runs/prompt_finetune.gin'\ninclude 'extra.gin'\n")
  (tmp_path / "extra.gin").write_text(
      "MY_STEPS = 11\n" if use == "defines" else
      "from __gin__ import dynamic_registration\nfrom prompt_tuning import runs\n"
      "runs.train.train_steps = %MY_STEPS\n")
  flags.parse_args(["--gin_file=models/from_checkpoint.gin", "--gin_file=top.gin",
                        f"--gin_search_paths={tmp_path}", "--gin.MY_STEPS=5"], "")
  assert gin.query_parameter("MY_STEPS/macro.value") == 5


def test_a_macro_of_a_file_a_binding_includes_parses(tmp_path):
  (tmp_path / "extra.gin").write_text("MY_STEPS = 11\n")
  flags.parse_args(_train_flags("/unused", f"--gin_search_paths={tmp_path}",
                                    "--gin_bindings=include 'extra.gin'", "--gin.MY_STEPS=5"), "")
  assert gin.query_parameter("MY_STEPS/macro.value") == 5


def test_a_macro_defined_by_a_later_gin_file_parses():
  """PROMPT_FILE comes from prompts/from_file.gin, loaded after the run file."""
  flags.parse_args(_eval_flags("runs/prompt_eval.gin", "--gin_file=prompts/from_file.gin",
                                   "--gin.PROMPT_FILE='p.npy'"), "")
  assert gin.query_parameter("PROMPT_FILE/macro.value") == "p.npy"


def test_an_unknown_parameter_keeps_gins_error():
  with pytest.raises(ValueError, match="'runs.train' doesn't have a parameter named "
                                       "'train_step'"):
    train_main.main(_train_flags("/unused", "--gin.runs.train.train_step=3"))


def _documented_commands():
  """The entry-point commands of README.md and of the gin/runs/*.gin headers."""
  sources = [REPO / "README.md"] + sorted((REPO / "gin" / "runs").glob("*.gin"))
  commands = []
  for path in sources:
    text = re.sub(r"(?m)^#", "", path.read_text()) if path.suffix == ".gin" else path.read_text()
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
      m = re.search(r"python -m prompt_tuning\.(train|eval|infer|multi_infer)\s+(--gin.*)", line)
      if m and "<" not in line:
        commands.append(pytest.param(shlex.split(m.group(2)),
                                     id=f"{path.name}:{len(commands)}"))
  return commands


@pytest.mark.parametrize("argv", _documented_commands())
def test_documented_commands_still_parse(argv):
  flags.parse_args([a for a in argv if a.startswith("--gin")], "")


# --- Counts, periods and sizes of 0 or less -----------------------------------------------------

@pytest.mark.parametrize("flag, message", [
    ("--gin.TRAIN_STEPS=-3", "TRAIN_STEPS must be a positive integer, got -3"),
    ("--gin.TRAIN_STEPS=0", "TRAIN_STEPS must be a positive integer, got 0"),
    ("--gin.CHECKPOINT_PERIOD=0", "CHECKPOINT_PERIOD must be a positive integer, got 0"),
    ("--gin.EVAL_PERIOD=0", "EVAL_PERIOD must be a positive integer, got 0"),
    ("--gin.runs.train.log_period=0", "runs.train.log_period must be a positive integer"),
    ("--gin.NUM_MICROBATCHES=0", "NUM_MICROBATCHES must be a positive integer, got 0"),
    ("--gin.KEEP_CHECKPOINTS=0", r"KEEP_CHECKPOINTS must be a positive integer or None \(no "
                                 r"limit\), got 0"),
    ("--gin.EVAL_MAX_EXAMPLES=0", "EVAL_MAX_EXAMPLES must be a positive integer or None"),
    ("--gin.BATCH_SIZE=0", "BATCH_SIZE must be positive, got 0"),
    ("--gin.EVAL_BATCH_SIZE=0", "BATCH_SIZE must be positive, got 0 .*EVAL_BATCH_SIZE"),
])
def test_train_refuses_counts_of_zero_or_less_before_anything_runs(tmp_path, flag, message):
  model_dir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train_main.main(_train_flags(model_dir, flag))
  assert not model_dir.exists()


def test_keep_checkpoints_none_is_still_allowed(tmp_path):
  """None keeps every checkpoint: the run passes the check and fails later, on the checkpoint."""
  with pytest.raises((ValueError, FileNotFoundError), match="never/read"):
    train_main.main(_train_flags(tmp_path / "run", "--gin.KEEP_CHECKPOINTS=None",
                                 "--gin.EVAL_MAX_EXAMPLES=None"))


@pytest.mark.parametrize("main, run_file, name, out_macro", [
    (eval_main.main, "runs/prompt_eval.gin", "EVAL_MAX_EXAMPLES", "OUTPUT_PATH"),
    (infer_main.main, "runs/prompt_infer.gin", "INFER_MAX_EXAMPLES", "INFER_OUTPUT_DIR"),
    (multi_infer.main, "runs/prompt_ensemble_eval.gin", "EVAL_MAX_EXAMPLES", "OUTPUT_DIR"),
    (multi_infer.main, "runs/prompt_bank_infer.gin", "INFER_MAX_EXAMPLES", "INFER_OUTPUT_DIR"),
])
@pytest.mark.parametrize("value", [0, -1])
def test_eval_and_infer_refuse_a_limit_of_zero_or_less(tmp_path, main, run_file, name, out_macro,
                                                       value):
  out = tmp_path / "out"
  flags = _eval_flags(run_file, f"--gin.{name}={value}", f"--gin.{out_macro}='{out}'")
  if main is multi_infer.main:
    flags.append("--gin.PROMPT_FILES=['/never/read.npy']")
  with pytest.raises(ValueError, match=f"{name} must be a positive integer or None .*, got "
                                       f"{value}"):
    main(flags)
  assert not out.exists()


def test_a_runs_folder_in_the_working_directory_does_not_break_includes(tmp_path, monkeypatch):
  """`make demo` writes ./runs/demo; gin then saw a namespace package `runs` and every
  `include 'runs/...'` failed with a TypeError from inside gin."""
  from prompt_tuning.cli import flags
  from prompt_tuning.cli import gin_utils
  (tmp_path / "runs" / "demo").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  top = tmp_path / "top.gin"
  top.write_text("include 'runs/prompt_finetune.gin'\n")
  gin_utils.parse([str(top)], [])
