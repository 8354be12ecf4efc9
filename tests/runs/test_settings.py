"""The first hour of a new user: a run's settings are remembered by eval and infer, a rerun
with other settings does not silently resume the old run, exploding parameters stop a run like a
NaN loss, Ctrl-C saves like SIGTERM, and errors name the real cause (an unknown task, a damaged
frozen checkpoint).

Runs go through the command lines on the demo task and the tiny frozen model of
tests/runs/test_loop.py; one 3-step run (checkpoint 3) is shared and copied where a test resumes it.
"""
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import seqio

from prompt_tuning.training import checkpoints
from prompt_tuning import eval as eval_main
from prompt_tuning.cli import flags
from prompt_tuning.cli import gin_utils
from prompt_tuning import infer as infer_main
from prompt_tuning.formats import pretrained
from prompt_tuning import train as train_main
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.runs import guards
from prompt_tuning.runs import settings as settings_lib
from prompt_tuning.runs import setup as run_setup
from tests.runs.test_loop import NO_EVAL, PROMPT_LENGTH, REPO, _eval_flags, _flags, _subprocess_env
from tests.runs.test_loop import frozen_checkpoint  # pylint: disable=unused-import  (a fixture)

COMBINE = "--gin.PROMPT_COMBINE='prefix_after_bos'"  # not the run files' default: must be remembered


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train(model_dir, checkpoint, *extra, steps=3):
  gin.clear_config()
  return train_main.main(_flags(model_dir, checkpoint, NO_EVAL, COMBINE, *extra, steps=steps))


def _committed(model_dir) -> list[int]:
  root = pathlib.Path(model_dir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, frozen_checkpoint):
  """3 steps of prompt tuning, checkpoint 3, prompt inserted after the first token."""
  model_dir = tmp_path_factory.mktemp("settings") / "run"
  _train(model_dir, frozen_checkpoint)
  gin.clear_config()
  return model_dir


def _copy(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


# --- 1. Settings are remembered -----------------------------------------------------------------

def test_the_run_records_its_settings(trained, frozen_checkpoint):
  settings = json.loads((trained / settings_lib.RUN_SETTINGS_FILE).read_text())
  assert settings["remembered"] == {
      "MIXTURE_OR_TASK_NAME": "demo_taskless_last", "MIXTURE_OR_TASK_MODULE": "tasks.demo",
      "TASK_FEATURE_LENGTHS": {"inputs": 32, "targets": 8}, "PROMPT_LENGTH": PROMPT_LENGTH,
      "PROMPT_COMBINE": "prefix_after_bos", "INITIAL_CHECKPOINT_PATH": frozen_checkpoint}
  assert settings["training"]["optimizer"]["learning_rate"] == 0.3
  assert settings["gin_files"][1].endswith("gin/runs/prompt_finetune.gin")
  assert "LEARNING_RATE = 0.3" in settings["gin_config"]
  meta = json.loads((trained / "checkpoints" / "3" / "metadata" / "metadata").read_text())
  assert meta["run_settings"] == settings


def _short_eval(model_dir, out, *extra):
  return ["--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.EVAL_BATCH_SIZE=8",
          "--gin.EVAL_MAX_EXAMPLES=8", f"--gin.OUTPUT_PATH='{out}'", *extra]


def test_eval_and_infer_take_the_task_lengths_prompt_and_frozen_model_from_model_dir(
    tmp_path, trained, frozen_checkpoint, capsys):
  """With only MODEL_DIR, eval gives the metrics of the command that names every setting; the
  log says which settings came from MODEL_DIR. A flag still wins (here PROMPT_COMBINE)."""
  capsys.readouterr()
  short = eval_main.main(_short_eval(trained, tmp_path / "short.json"))
  log = capsys.readouterr().out
  assert "Settings of the run in MODEL_DIR" in log
  for shown in ("MIXTURE_OR_TASK_NAME='demo_taskless_last'", f"PROMPT_LENGTH={PROMPT_LENGTH}",
                "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                "PROMPT_COMBINE='prefix_after_bos'", f"INITIAL_CHECKPOINT_PATH='{frozen_checkpoint}'"):
    assert shown in log
  gin.clear_config()
  full = eval_main.main(_eval_flags(trained, frozen_checkpoint)
                        + [COMBINE, f"--gin.OUTPUT_PATH='{tmp_path / 'full.json'}'"])
  assert short["checkpoint_step"] == full["checkpoint_step"] == 3
  assert short["results"] == full["results"]
  gin.clear_config()
  prefix = eval_main.main(_short_eval(trained, tmp_path / "prefix.json",
                                      "--gin.PROMPT_COMBINE='prefix'"))
  loss = lambda out: out["results"]["demo_taskless_last"]["loss"]
  assert loss(prefix) != loss(short)

  gin.clear_config()
  [path] = infer_main.main([
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_infer.gin",
      f"--gin.MODEL_DIR='{trained}'", "--gin.BATCH_SIZE=8", "--gin.INFER_MAX_EXAMPLES=3",
      f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"])
  assert pathlib.Path(path).name == "demo_taskless_last-3.jsonl"
  assert len(pathlib.Path(path).read_text().splitlines()) == 3


def _query(name):
  return gin.query_parameter(f"{name}/macro.value")


def test_flags_and_own_gin_files_beat_model_dir_which_beats_the_project_files(
    tmp_path, trained, frozen_checkpoint):
  own = tmp_path / "own.gin"
  own.write_text("PROMPT_LENGTH = 7\n")
  flags.parse_args(
      ["--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
       f"--gin_file={own}", f"--gin.MODEL_DIR='{trained}'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"], "",
      remembered=lambda: settings_lib.remembered_settings(
          gin_utils.bound_value("runs.evaluate", "model_dir")))
  assert _query("TASK_FEATURE_LENGTHS") == {"inputs": 16, "targets": 4}  # the flag
  assert _query("PROMPT_LENGTH") == 7  # the user's own gin file
  # MODEL_DIR's settings beat runs/prompt_eval.gin and models/from_checkpoint.gin.
  assert _query("PROMPT_COMBINE") == "prefix_after_bos"
  assert _query("MIXTURE_OR_TASK_NAME") == "demo_taskless_last"
  assert _query("INITIAL_CHECKPOINT_PATH") == frozen_checkpoint


def test_without_model_dir_the_run_file_defaults_stay():
  flags.parse_args(
      ["--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
       "--gin_file=prompts/from_file.gin", "--gin.PROMPT_FILE='p.npy'"], "",
      remembered=lambda: settings_lib.remembered_settings(
          gin_utils.bound_value("runs.evaluate", "model_dir")))
  assert _query("MODEL_DIR") is None
  assert _query("TASK_FEATURE_LENGTHS") == {"inputs": 512, "targets": 8}
  assert _query("PROMPT_LENGTH") == 100 and _query("PROMPT_COMBINE") == "prefix"


def test_a_run_of_an_older_version_is_remembered_from_its_checkpoint_metadata(
    tmp_path, trained, frozen_checkpoint):
  model_dir = _copy(trained, tmp_path)
  (model_dir / settings_lib.RUN_SETTINGS_FILE).unlink()
  path = model_dir / "checkpoints" / "3" / "metadata" / "metadata"
  meta = json.loads(path.read_text())
  del meta["run_settings"]
  path.write_text(json.dumps(meta))
  source, values = settings_lib.remembered_settings(str(model_dir))
  assert source.endswith("checkpoints/3/metadata")
  assert values == {"MIXTURE_OR_TASK_NAME": "demo_taskless_last", "PROMPT_LENGTH": PROMPT_LENGTH,
                    "PROMPT_COMBINE": "prefix_after_bos",
                    "INITIAL_CHECKPOINT_PATH": frozen_checkpoint}


def test_a_file_task_is_registered_again_from_model_dir(tmp_path, frozen_checkpoint):
  """Trained on a file task (registered by the user's gin file); eval in a process that never
  saw that gin file registers it again from MODEL_DIR's settings."""
  name = "test_remembered_file_task"
  for split in ("train", "dev"):
    rows = [{"text": f"{w} {i}", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["good", "bad", "fine", "poor"] * 4)]
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  task_gin = tmp_path / "my_task.gin"
  task_gin.write_text(f"""
from prompt_tuning.data import file_tasks
MIXTURE_OR_TASK_NAME = @sentiment/file_tasks.register_file_task()
MIXTURE_OR_TASK_MODULE = None
sentiment/file_tasks.register_file_task:
  name = '{name}'
  train = '{tmp_path / "train.jsonl"}'
  validation = '{tmp_path / "dev.jsonl"}'
  inputs = '{{text}}'
  targets = '{{label}}'
  class_labels = ['neg', 'pos']
  vocabulary = 'byt5'
""")
  model_dir = tmp_path / "run"
  flags = [f for f in _flags(model_dir, frozen_checkpoint, NO_EVAL, steps=1)
           if "MIXTURE_OR_TASK" not in f and "CHECKPOINT_PERIOD" not in f]
  train_main.main(flags + [f"--gin_file={task_gin}", "--gin.CHECKPOINT_PERIOD=1"])
  seqio.TaskRegistry.remove(name)  # as in a fresh process
  gin.clear_config()
  out = eval_main.main(_short_eval(model_dir, tmp_path / "out.json"))
  assert out["results"][name]["examples"] == 8 and "accuracy" in out["results"][name]


# --- 2. A rerun with other settings does not silently resume ------------------------------------

@pytest.mark.parametrize("flag, change", [
    ("--gin.LEARNING_RATE=0.5", "optimizer.learning_rate: 0.3 there, 0.5 here"),
    ("--gin.BATCH_SIZE=16", "BATCH_SIZE: 8 there, 16 here"),
    ("--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}",
     "TASK_FEATURE_LENGTHS.inputs: 32 there, 24 here"),
    ("--gin.runs.PromptInit.low=0.0", "PROMPT_INIT.low: -0.5 there, 0.0 here"),
    ("--gin.RANDOM_SEED=1", "RANDOM_SEED: 42 there, 1 here"),
    ("--gin.NUM_MICROBATCHES=2", "NUM_MICROBATCHES: 1 there, 2 here"),
])
def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path, trained, frozen_checkpoint,
                                                            flag, change):
  model_dir = _copy(trained, tmp_path)
  with pytest.raises(ValueError) as e:
    _train(model_dir, frozen_checkpoint, flag, steps=6)
  text = str(e.value).splitlines()[0]  # run_main prints this line (gin adds where it was called)
  assert f"holds checkpoint 3 of a run with other settings: {change}" in text
  assert "new --gin.MODEL_DIR" in text and "--gin.runs.train.allow_changed_settings=True" in text
  assert _committed(model_dir) == [3]


def test_a_rerun_may_change_steps_periods_logging_skipping_and_the_mesh(tmp_path, trained,
                                                                        frozen_checkpoint):
  model_dir = _copy(trained, tmp_path)
  result = _train(model_dir, frozen_checkpoint, "--gin.CHECKPOINT_PERIOD=2",
                  "--gin.KEEP_CHECKPOINTS=5", "--gin.EVAL_PERIOD=7", "--gin.EVAL_MAX_EXAMPLES=4",
                  "--gin.runs.train.log_period=2", "--gin.runs.train.skip_nonfinite=True",
                  "--gin.runs.PartitionConfig.num_devices=1",
                  "--gin.MODEL_RUNTIME={'remat_policy': 'full', 'scan_layers': True}", steps=4)
  assert result["step"] == 4 and _committed(model_dir) == [3, 4]


def test_allow_changed_settings_continues_and_the_new_settings_become_the_runs(
    tmp_path, trained, frozen_checkpoint, capsys):
  model_dir = _copy(trained, tmp_path)
  _train(model_dir, frozen_checkpoint, "--gin.LEARNING_RATE=0.5",
         "--gin.runs.train.allow_changed_settings=True", steps=4)
  assert ("with changed settings (allow_changed_settings=True): optimizer.learning_rate: 0.3 "
          "there, 0.5 here") in capsys.readouterr().out  # the entry points log to stdout
  meta = json.loads((model_dir / "checkpoints" / "4" / "metadata" / "metadata").read_text())
  assert meta["run_settings"]["training"]["optimizer"]["learning_rate"] == 0.5
  assert _train(model_dir, frozen_checkpoint, "--gin.LEARNING_RATE=0.5", steps=5)["step"] == 5


# --- 3. Exploding parameters stop the run -------------------------------------------------------

def test_exploding_parameters_stop_the_run_like_a_nan_loss(tmp_path, trained, frozen_checkpoint):
  """LR 1e30: each prompt value stays finite (about 1e30) but the norm overflows, and the run
  would go on forever with zero updates (the old code saved such checkpoints)."""
  with pytest.raises(guards.NonFiniteLossError) as e:
    _train(tmp_path / "fresh", frozen_checkpoint, "--gin.LEARNING_RATE=1e30")
  assert "became non-finite or too large at step 1" in str(e.value)
  assert "param_norm=inf" in str(e.value) and "No checkpoint was saved" in str(e.value)
  assert _committed(tmp_path / "fresh") == []

  model_dir = _copy(trained, tmp_path)
  with pytest.raises(guards.NonFiniteLossError, match="too large at step 4 .*Nothing was saved "
                                                       "after step 3; the last good checkpoint"):
    _train(model_dir, frozen_checkpoint, "--gin.LEARNING_RATE=1e30",
           "--gin.runs.train.allow_changed_settings=True", steps=6)
  assert _committed(model_dir) == [3]


# --- 4. Ctrl-C ----------------------------------------------------------------------------------

def _spawn(model_dir, checkpoint, *extra, env=None):
  cmd = [sys.executable, "-m", "prompt_tuning.train",
         *_flags(model_dir, checkpoint, NO_EVAL, *extra, steps=100000)]
  return subprocess.Popen(cmd, cwd=REPO, env={**_subprocess_env(), **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc, text, seen, timeout=240):
  deadline = time.time() + timeout
  for line in proc.stdout:
    seen.append(line)
    if text in line or time.time() > deadline:
      return
  raise AssertionError("".join(seen)[-3000:])


@pytest.mark.slow
def test_ctrl_c_saves_the_step_then_exits_with_one_line(tmp_path, frozen_checkpoint):
  model_dir = tmp_path / "int"
  proc = _spawn(model_dir, frozen_checkpoint, "--gin.CHECKPOINT_PERIOD=100000")
  seen = []
  _read_until(proc, "step 5/", seen)
  proc.send_signal(signal.SIGINT)
  rest, _ = proc.communicate(timeout=120)
  out = "".join(seen) + rest
  assert proc.returncode == 130, out[-3000:]
  [step] = _committed(model_dir)
  assert step >= 5 and f"SIGINT: saved step {step}" in rest
  assert json.loads(rest.strip().splitlines()[-1]) == {"preempted_at": step, "signal": "SIGINT"}
  assert "Traceback" not in out and "KeyboardInterrupt" not in out


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_the_save_and_leaves_no_half_checkpoint(tmp_path,
                                                                      frozen_checkpoint):
  """The save of checkpoint 3 is held open (test hook) for 60 s: the first Ctrl-C asks to save
  and exit, the second stops the process at once. Checkpoint 3 is not committed; the next run
  deletes the temporary folder and starts over."""
  model_dir = tmp_path / "int"
  proc = _spawn(model_dir, frozen_checkpoint, "--gin.CHECKPOINT_PERIOD=3",
                env={checkpoints.SLOW_SAVE_ENV: "3:60"})
  seen = []
  _read_until(proc, "pausing 60 s", seen)
  start = time.time()
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  rest, _ = proc.communicate(timeout=120)
  out = "".join(seen) + rest
  assert time.time() - start < 30, out[-3000:]  # did not wait for the held save
  assert proc.returncode == 130, out[-3000:]
  assert "interrupted: Ctrl-C during the save of checkpoint 3: stopped" in rest
  assert "Traceback" not in out
  assert _committed(model_dir) == []
  assert list((model_dir / "checkpoints").glob("3.orbax-checkpoint-tmp*"))

  _train(model_dir, frozen_checkpoint)
  assert _committed(model_dir) == [3]
  assert not list((model_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


# --- 5. Errors that name the real cause ---------------------------------------------------------

def _build(checkpoint, **kwargs):
  from prompt_tuning.training import optimizers
  return run_setup.build(
      model_config=None, prompt_config=PromptConfig(length=PROMPT_LENGTH),
      initial_checkpoint_path=str(checkpoint), partition=run_setup.PartitionConfig(num_devices=1),
      trainable_patterns=optimizers.PROMPT_PATTERNS,
      task_feature_lengths={"inputs": 8, "targets": 4}, random_seed=0, **kwargs)


def test_class_label_init_of_an_unknown_task_names_the_close_tasks(tmp_path, frozen_checkpoint):
  """Not "set CLASS_LABELS": the task name is wrong (eval and infer build this way too)."""
  with pytest.raises(ValueError) as e:
    _build(frozen_checkpoint, prompt_init=run_setup.PromptInit(kind="class_labels"),
           task_name="demo_taskless_lst", task_module="tasks.demo")
  assert "Unknown task or mixture 'demo_taskless_lst'" in str(e.value)
  assert "demo_taskless_last" in str(e.value) and "CLASS_LABELS" not in str(e.value)
  with pytest.raises(ValueError, match="Unknown task or mixture 'demo_taskless_lst'"):
    train_main.main([f for f in _flags(tmp_path / "run", frozen_checkpoint)
                     if "MIXTURE_OR_TASK_NAME" not in f]
                    + ["--gin_file=prompts/from_class_labels.gin",
                       "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_lst'"])


@pytest.fixture(scope="module")
def damaged_checkpoint(tmp_path_factory, frozen_checkpoint):
  """The tiny frozen model with 3 NaNs in one MLP weight (used by every token)."""
  model, params = pretrained.load_pretrained(frozen_checkpoint)
  kernel = np.array(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  kernel[0, :3] = np.nan
  params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] = kernel
  path = tmp_path_factory.mktemp("damaged") / "tiny_t5"
  pretrained.save_pretrained(path, model, params)
  return str(path)


def test_a_nan_in_a_frozen_weight_is_reported_at_load_as_a_damaged_checkpoint(
    tmp_path, damaged_checkpoint):
  """Not a NaN loss with learning-rate advice after some steps: refused before training, naming
  the parameter. allow_nonfinite_frozen=True goes on, and the NaN loss then names the cause."""
  model_dir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    _train(model_dir, damaged_checkpoint)
  text = str(e.value)
  assert (f"The frozen checkpoint {damaged_checkpoint} has NaN or Inf values in "
          "encoder/layers_0/mlp/wo/kernel (3 of 512 values): the checkpoint is damaged") in text
  assert "learning rate" not in text and "allow_nonfinite_frozen=True" in text
  assert not (model_dir / "metrics_train.jsonl").exists()
  with pytest.raises(ValueError, match=r"wo/kernel \(3 of 512 values\): the checkpoint is damaged"):
    eval_main.main([f for f in _eval_flags("unused", damaged_checkpoint) if "MODEL_DIR" not in f])

  with pytest.raises(guards.NonFiniteLossError, match="at step 1 .*The frozen model has NaN or "
                                                       "Inf values .* encoder/layers_0/mlp/wo"):
    _train(model_dir, damaged_checkpoint, "--gin.runs.train.allow_nonfinite_frozen=True")
