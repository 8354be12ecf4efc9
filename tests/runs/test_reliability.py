"""Reliability: crashes (real SIGKILLs before and during a save), non-finite losses, bad input and
hostile files. Each test says what a user is promised; docs/guarantees.md lists them all.

Runs go through the command line (`prompt_tuning.train.main`, in process where no kill is needed)
on the bundled demo task and the tiny frozen model of tests/runs/test_loop.py. The kill after a
completed save is tests/runs/test_loop.py::test_sigkill_after_checkpoint_then_resume_is_bit_identical.
"""
import glob
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_tuning import T5
from prompt_tuning.training import checkpoints
from prompt_tuning.data import dataset
from prompt_tuning import eval as eval_main
from prompt_tuning.cli import flags as cli_flags
from prompt_tuning import infer as infer_main
from prompt_tuning.formats import hf as hf_format
from prompt_tuning.formats import pretrained
from prompt_tuning import train as train_main
from prompt_tuning.runs import run_log
from tests.conftest import fixture_path, hf_folder, tiny_config
from tests.runs.test_loop import PROMPT_LENGTH, REPO, _final_prompt, _flags, _subprocess_env
from tests.runs.test_loop import frozen_checkpoint  # pylint: disable=unused-import  (a fixture)

STEPS = 6  # checkpoints at 3 and 6 (CHECKPOINT_PERIOD=3 in _flags)
NO_EVAL = "--gin.runs.train.evaluation=None"  # eval is not what these tests exercise


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train(model_dir, checkpoint, *extra, steps=STEPS):
  gin.clear_config()
  return train_main.main(_flags(model_dir, checkpoint, NO_EVAL, *extra, steps=steps))


def _steps_logged(model_dir) -> list[int]:
  lines = (pathlib.Path(model_dir) / "metrics_train.jsonl").read_text().splitlines()
  return [json.loads(l)["step"] for l in lines]


def _committed(model_dir) -> list[int]:
  root = pathlib.Path(model_dir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, frozen_checkpoint):
  """An uninterrupted run: what every interrupted-and-resumed run must reproduce bit for bit."""
  model_dir = tmp_path_factory.mktemp("reference") / "run"
  _train(model_dir, frozen_checkpoint)
  gin.clear_config()
  return model_dir


# --- 1. Crash safety: SIGKILL at several points, then restart -----------------------------------

def _spawn(model_dir, checkpoint, log_path, **env):
  cmd = [sys.executable, "-m", "prompt_tuning.train",
         *_flags(model_dir, checkpoint, NO_EVAL, steps=STEPS)]
  log = open(log_path, "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env={**_subprocess_env(8), **env}, stdout=log,
                          stderr=subprocess.STDOUT)
  log.close()
  return proc


def _kill_when(proc, condition, log_path, timeout=240):
  deadline = time.time() + timeout
  while not condition() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert condition(), "the run never reached the kill point:\n" + log_path.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_before_the_first_save_then_restart_matches(tmp_path, frozen_checkpoint,
                                                            reference):
  """Killed mid-training before any checkpoint: the restart starts over and ends bit-identical.

  The save of step 3 is held open (test hook) so the kill lands before it can complete.
  """
  model_dir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = _spawn(model_dir, frozen_checkpoint, log,
                **{checkpoints.SLOW_SAVE_ENV: "3:120"})
  _kill_when(proc, lambda: "step 1/" in log.read_text(), log)
  assert _committed(model_dir) == []

  _train(model_dir, frozen_checkpoint)
  assert _steps_logged(model_dir) == list(range(1, STEPS + 1))  # the killed run's lines dropped
  assert _committed(model_dir) == [3, 6]
  assert _final_prompt(model_dir, STEPS).tobytes() == _final_prompt(reference, STEPS).tobytes()


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, frozen_checkpoint,
                                                                    reference):
  """Killed while orbax writes checkpoint 6 (its temporary folder exists, nothing committed):
  checkpoint 3 stays the latest, the restart resumes from it, removes the leftover folder and
  ends bit-identical to the uninterrupted run."""
  model_dir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = _spawn(model_dir, frozen_checkpoint, log,
                **{checkpoints.SLOW_SAVE_ENV: "6:120"})
  partial = lambda: glob.glob(str(model_dir / "checkpoints" / "6.orbax-checkpoint-tmp*"))
  _kill_when(proc, lambda: bool(partial()), log)
  assert _committed(model_dir) == [3]
  assert not (model_dir / "numpy_checkpoints" / "checkpoint_6").exists()
  assert _steps_logged(model_dir)[-1] > 3
  lines_up_to_3 = (model_dir / "metrics_train.jsonl").read_text().splitlines()[:3]

  _train(model_dir, frozen_checkpoint)
  lines = (model_dir / "metrics_train.jsonl").read_text().splitlines()
  assert lines[:3] == lines_up_to_3  # resumed after step 3: each step logged once
  assert _steps_logged(model_dir) == list(range(1, STEPS + 1))
  assert _committed(model_dir) == [3, 6] and not partial()
  assert _final_prompt(model_dir, STEPS).tobytes() == _final_prompt(reference, STEPS).tobytes()


def test_crash_between_commit_and_numpy_export_is_repaired_on_restart(tmp_path, frozen_checkpoint,
                                                                      reference):
  """A kill after orbax committed step 6 but before its .npy export leaves exactly this state;
  the restart (nothing left to train) writes the missing export from the checkpoint."""
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  shutil.rmtree(model_dir / "numpy_checkpoints" / "checkpoint_6")
  assert _train(model_dir, frozen_checkpoint)["step"] == STEPS
  assert _final_prompt(model_dir, STEPS).tobytes() == _final_prompt(reference, STEPS).tobytes()


def test_resume_drops_replayed_and_partial_metric_lines(tmp_path, frozen_checkpoint, reference):
  """A run killed after checkpoint 6 had logged steps up to 10 and half a line of 11 (written
  here by hand). The restart from 6 keeps lines 1..6 as they were, drops the rest and appends
  the steps it trains: each step once, in order, in the train and the eval JSONL."""
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  rows = lambda steps: "".join(json.dumps({"step": s, "loss": -s}) + "\n" for s in steps)
  (model_dir / "metrics_train.jsonl").write_text(rows(range(1, 11)) + '{"step": 11, "lo')
  (model_dir / "metrics_eval.jsonl").write_text(rows([3, 6, 9]) + '{"st')

  _train(model_dir, frozen_checkpoint, steps=8)
  lines = (model_dir / "metrics_train.jsonl").read_text().splitlines()
  assert lines[:6] == rows(range(1, 7)).splitlines()
  assert _steps_logged(model_dir) == list(range(1, 9))
  assert all(json.loads(l)["loss"] > 0 for l in lines[6:])  # logged by the resumed run
  assert (model_dir / "metrics_eval.jsonl").read_text() == rows([3, 6])
  assert not list(model_dir.glob("*.tmp"))


@pytest.mark.parametrize("last_step, text, want", [
    (6, "".join(f'{{"step": {s}}}\n' for s in range(1, 11)) + '{"step": 11, "lo',
     "".join(f'{{"step": {s}}}\n' for s in range(1, 7))),
    (3, '{"step": 1}\n{"step": 2, "a{"step": 2}\n[]\n\n{"step": 3}', '{"step": 1}\n{"step": 3}\n'),
    (None, '{"step": 0}\n{"step": 1}\n', ""),
])
def test_truncate_metrics(tmp_path, last_step, text, want):
  """Rows after `last_step` go (all of them for a fresh run, None), so do lines that are not
  whole rows; kept rows stay byte for byte, in order."""
  path = tmp_path / "metrics_train.jsonl"
  path.write_text(text)
  dropped = run_log.truncate_metrics(path, last_step)
  assert path.read_text() == want
  assert dropped == len(text.splitlines()) - len(want.splitlines())
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_truncate_metrics_leaves_a_clean_file_untouched(tmp_path):
  path = tmp_path / "metrics_train.jsonl"
  assert run_log.truncate_metrics(path, 3) == 0 and not path.exists()
  path.write_text('{"step": 1}\n{"step": 2}\n')
  before = path.stat().st_mtime_ns, path.stat().st_ino
  assert run_log.truncate_metrics(path, 2) == 0
  assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


# --- 2. Non-finite losses -----------------------------------------------------------------------

def _data_tokens(steps):
  """Token ids each training step's batch feeds through the embedding (encoder + decoder)."""
  cfg = dataset.DatasetConfig("demo_taskless_last", {"inputs": 32, "targets": 8}, batch_size=8,
                              seed=42, module="tasks.demo")
  batches = dataset.TrainBatches(cfg, shard_info=seqio.ShardInfo(0, 1))
  return [set(np.unique(b["encoder_input_tokens"])) | set(np.unique(b["decoder_input_tokens"]))
          for b in (next(batches) for _ in range(steps))]


SKIP_STEPS = 8  # the skip_nonfinite run goes on past the poisoned steps


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, frozen_checkpoint):
  """The frozen model with one embedding row set to NaN: a token absent from the first 3 batches
  and present in some later ones, so the loss is NaN at known steps after checkpoint 3."""
  tokens = _data_tokens(SKIP_STEPS)
  bad = {t: [i + 1 for i, ts in enumerate(tokens) if t in ts]
         for t in set().union(*tokens[3:]) - set().union(*tokens[:3]) - {0, 1}}
  # Prefer a token whose batches are followed by a clean one: training goes on after a skip.
  token = max(bad, key=lambda t: (len(set(range(bad[t][0], SKIP_STEPS + 1)) - set(bad[t])), -t))
  model, params = pretrained.load_pretrained(frozen_checkpoint)
  embedding = np.array(params["token_embedder"]["embedding"])
  embedding[token] = np.nan
  params["token_embedder"]["embedding"] = embedding
  path = tmp_path_factory.mktemp("poisoned") / "tiny_t5"
  pretrained.save_pretrained(path, model, params)
  return str(path), bad[token]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, poisoned,
                                                                           capsys):
  """The run stops at the first non-finite step with a message naming it and the fix; checkpoint
  3 is kept, nothing later is written, and every exported prompt is finite. Then the option
  skip_nonfinite resumes from checkpoint 3, skips exactly the poisoned batches and trains on."""
  checkpoint, bad_steps = poisoned
  assert 3 < bad_steps[0] <= STEPS
  model_dir = tmp_path / "run"
  # A NaN in a frozen weight is refused at load (a damaged checkpoint) unless allowed.
  allow = "--gin.runs.train.allow_nonfinite_frozen=True"
  with pytest.raises(SystemExit):  # through the entry point: one line, no traceback
    cli_flags.run_main(lambda: _train(model_dir, checkpoint, allow))
  err = capsys.readouterr().err
  assert f"error: Non-finite loss or gradient at step {bad_steps[0]}" in err
  assert "last good checkpoint is kept" in err and "skip_nonfinite=True" in err
  assert "The frozen model has NaN or Inf values" in err and "token_embedder/embedding" in err
  assert _committed(model_dir) == [3]
  exports = sorted((model_dir / "numpy_checkpoints").iterdir())
  assert [p.name for p in exports] == ["checkpoint_3"]
  assert np.isfinite(_final_prompt(model_dir, 3)).all()

  _train(model_dir, checkpoint, allow, "--gin.runs.train.skip_nonfinite=True",
         "--gin.CHECKPOINT_PERIOD=1", steps=SKIP_STEPS)
  rows = [json.loads(l) for l in (model_dir / "metrics_train.jsonl").read_text().splitlines()]
  resumed = {r["step"]: r for r in rows[-(SKIP_STEPS - 3):]}
  assert sorted(resumed) == list(range(4, SKIP_STEPS + 1))
  assert [s for s, r in sorted(resumed.items()) if r["finite"] == 0.0] == bad_steps
  for step in range(4, SKIP_STEPS + 1):  # a skipped step leaves the prompt exactly as it was
    prompt = _final_prompt(model_dir, step)
    assert (prompt.tobytes() == _final_prompt(model_dir, step - 1).tobytes()) == (step in bad_steps)
    assert np.isfinite(prompt).all()


def test_checkpointer_refuses_to_save_a_non_finite_prompt(tmp_path):
  """Whoever calls it, the checkpointer never writes NaN/Inf parameters (checkpoint or .npy)."""
  ckpt = checkpoints.Checkpointer(tmp_path / "run")
  prompt = np.zeros((PROMPT_LENGTH, 16), np.float32)
  prompt[1, 2] = np.inf
  state = type("State", (), {"step": jnp.asarray(1), "opt_state": {},
                             "params": {"encoder": {"prompt": {"prompt": jnp.asarray(prompt)}}}})
  with pytest.raises(checkpoints.NonFiniteCheckpointError, match="Refusing to save checkpoint 1"):
    ckpt.save(1, state, {})
  assert ckpt.all_steps() == [] and not (tmp_path / "run" / "numpy_checkpoints").exists()
  ckpt.close()


# --- 3. Bad input: each a clear error that names the fix ----------------------------------------

def test_frozen_checkpoint_of_another_model_size(tmp_path, frozen_checkpoint):
  with pytest.raises(ValueError, match="another model size") as e:
    gin.clear_config()
    train_main.main([f for f in _flags(tmp_path / "run", frozen_checkpoint)
                     if "from_checkpoint" not in f] + ["--gin_file=models/t5_1_1_small.gin"])
  assert "wrong shape" in str(e.value) and "gin/models" in str(e.value)


def test_model_dir_of_a_run_with_another_prompt_length(tmp_path, frozen_checkpoint, reference):
  """Reusing a MODEL_DIR with a changed PROMPT_LENGTH names both settings, not 'corruption'."""
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  with pytest.raises(ValueError, match=r"PROMPT_LENGTH 4 there, 6 here") as e:
    _train(model_dir, frozen_checkpoint, "--gin.PROMPT_LENGTH=6", steps=9)
  assert "new --gin.MODEL_DIR" in str(e.value) and "corrupt" not in str(e.value)


class Planted:
  """Unpickling this creates `marker`: proof that a loader ran a stranger's code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("content, message", [
    (np.zeros((PROMPT_LENGTH + 1, 16), np.float32), f"set PROMPT_LENGTH = {PROMPT_LENGTH + 1}"),
    (np.zeros((PROMPT_LENGTH, 768), np.float32), "T5 1.1 base"),
    (np.zeros((PROMPT_LENGTH, 16), np.int32), "expected a floating-point prompt"),
    ("pickle", "pickle files are never loaded"),
], ids=["length", "d_model", "dtype", "pickle"])
def test_prompt_file_of_the_wrong_shape_dtype_or_format(tmp_path, frozen_checkpoint, content,
                                                        message):
  path = tmp_path / "prompt.npy"
  marker = tmp_path / "ran"
  if isinstance(content, str):
    path.write_bytes(pickle.dumps(Planted(marker)))
  else:
    np.save(path, content)
  with pytest.raises(ValueError, match=message) as e:
    _train(tmp_path / "run", frozen_checkpoint, "--gin_file=prompts/from_file.gin",
           f"--gin.PROMPT_FILE='{path}'")
  assert str(path) in str(e.value)
  assert not marker.exists()


def test_task_vocabulary_larger_than_the_model_embedding(tmp_path):
  """The demo task's byte vocabulary (259 ids) on a model with a 64-row embedding."""
  cfg = tiny_config(vocab_size=64)
  module = T5(cfg)
  x = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), x, x)["params"])
  small = tmp_path / "vocab64"
  pretrained.save_pretrained(small, module, params)
  with pytest.raises(ValueError, match="259 ids but the model's embedding has 64 rows") as e:
    _train(tmp_path / "run", str(small))
  assert "vocabulary" in str(e.value)


def test_inputs_longer_than_task_feature_lengths_are_counted_and_reported(tmp_path,
                                                                         frozen_checkpoint,
                                                                         capsys):
  model_dir = tmp_path / "run"
  result = _train(model_dir, frozen_checkpoint,
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 6, 'targets': 8}", steps=2)
  assert 0 < result["truncated_examples"] <= 16
  rows = [json.loads(l) for l in (model_dir / "metrics_train.jsonl").read_text().splitlines()]
  assert rows[-1]["truncated_examples"] == result["truncated_examples"]
  out = capsys.readouterr().out
  assert (f"{result['truncated_examples']} of 16 training examples were longer than "
          "TASK_FEATURE_LENGTHS and were truncated: inputs "
          f"{result['truncated_examples']} (longest ") in out
  assert "tokens, limit 6), targets 0 (longest" in out
  meta = json.loads((model_dir / "checkpoints" / "2" / "metadata" / "metadata").read_text())
  assert meta["truncated_examples"] == result["truncated_examples"]


@pytest.fixture
def empty_task():
  name = "reliability_empty_split"

  def source(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": tf.constant([], tf.string),
                                               "targets": tf.constant([], tf.string)})

  from tasks import demo
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(source, splits=("train",)),
                         preprocessors=[seqio.preprocessors.tokenize,
                                        seqio.preprocessors.append_eos],
                         output_features=demo.OUTPUT_FEATURES)
  yield name
  seqio.TaskRegistry.remove(name)


def test_empty_split(tmp_path, frozen_checkpoint, empty_task):
  with pytest.raises(ValueError, match="yielded no examples") as e:
    _train(tmp_path / "run", frozen_checkpoint, f"--gin.MIXTURE_OR_TASK_NAME='{empty_task}'",
           "--gin.MIXTURE_OR_TASK_MODULE=None")
  assert "Split 'train'" in str(e.value) and "data source" in str(e.value)


def test_batch_size_not_divisible_by_the_data_parallel_devices(tmp_path, frozen_checkpoint):
  if jax.device_count() != 8:
    pytest.skip("needs the 8 simulated devices of conftest.py")
  with pytest.raises(ValueError, match="BATCH_SIZE 6 is not divisible by the 8 data-parallel "
                                       "devices; use a multiple of it"):
    _train(tmp_path / "run", frozen_checkpoint, "--gin.BATCH_SIZE=6")


def _corrupt(model_dir, what):
  step_dir = model_dir / "checkpoints" / "6"
  if what == "params_data":  # one flipped bit in the prompt's data file
    path = pathlib.Path(glob.glob(str(step_dir / "params" / "d" / "*"))[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
  elif what == "state_truncated":  # optimizer state cut short (a copy that stopped early)
    for path in glob.glob(str(step_dir / "state" / "d" / "*")):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif what == "metadata_json":
    (step_dir / "metadata" / "metadata").write_text('{"data_position": ')
  elif what == "params_missing":  # a partial checkpoint: one item gone
    shutil.rmtree(step_dir / "params")


@pytest.mark.parametrize("what", ["params_data", "state_truncated", "metadata_json",
                                  "params_missing"])
def test_corrupted_checkpoint_names_the_folder_and_the_fix(tmp_path, frozen_checkpoint,
                                                           reference, what):
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  _corrupt(model_dir, what)
  with pytest.raises(ValueError) as e:
    _train(model_dir, frozen_checkpoint)
  text = str(e.value)
  assert f"Checkpoint {model_dir / 'checkpoints' / '6'} cannot be read" in text
  assert f"mv {model_dir / 'checkpoints' / '6'}" in text
  assert "resumes from checkpoint 3" in text


def test_moving_a_corrupted_checkpoint_aside_resumes_from_the_previous_one(
    tmp_path, frozen_checkpoint, reference):
  """Following the error's advice recovers the run exactly: same final prompt as never broken."""
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  _corrupt(model_dir, "params_data")
  shutil.move(model_dir / "checkpoints" / "6", model_dir / "corrupt_checkpoint_6")
  _train(model_dir, frozen_checkpoint)
  assert _steps_logged(model_dir) == list(range(1, STEPS + 1))
  assert _final_prompt(model_dir, STEPS).tobytes() == _final_prompt(reference, STEPS).tobytes()


def test_partial_frozen_checkpoint_lists_the_missing_parameters(tmp_path, frozen_checkpoint):
  """An HF folder with tensors missing: every missing parameter is listed by name."""
  from safetensors.numpy import load_file, save_file
  model, params = pretrained.load_pretrained(frozen_checkpoint)
  folder = tmp_path / "hf"
  pretrained.export_hf(folder, model.config, params)
  tensors = load_file(folder / hf_format.HF_SAFETENSORS)
  del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  del tensors["decoder.final_layer_norm.weight"]
  save_file(tensors, folder / hf_format.HF_SAFETENSORS, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing \(2\)") as e:
    _train(tmp_path / "run", str(folder))
  assert "encoder/layers_1/mlp/wo/kernel" in str(e.value)
  assert "decoder/decoder_norm/scale" in str(e.value)


@pytest.mark.parametrize("kind", ["missing", "syntax"])
def test_bad_gin_file_is_named(tmp_path, frozen_checkpoint, kind):
  path = tmp_path / "bad.gin"
  if kind == "syntax":
    path.write_text("TRAIN_STEPS = = 3\n")
  with pytest.raises((ValueError, FileNotFoundError), match="bad.gin"):
    train_main.main(_flags(tmp_path / "run", frozen_checkpoint) + [f"--gin_file={path}"])


def test_cli_prints_one_line_errors_for_user_mistakes(tmp_path, frozen_checkpoint, capsys,
                                                     monkeypatch):
  """What `python -m prompt_tuning.train` does with a user error: `error: ...`, exit status 2."""
  monkeypatch.delenv("PROMPT_TUNING_TRACEBACK", raising=False)
  with pytest.raises(SystemExit) as e:
    cli_flags.run_main(lambda: train_main.main(
        _flags(tmp_path / "run", frozen_checkpoint, "--gin.BATCH_SIZE=0")))
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error: BATCH_SIZE must be positive, got 0")


def _readme_hf_command(checkpoint, model_dir) -> list[str]:
  """README.md's "From an HF checkpoint folder" command, on `checkpoint` and `model_dir`."""
  import shlex
  readme = (REPO / "README.md").read_text()
  block = readme[readme.index("From an HF checkpoint folder"):]
  block = block[block.index("```sh\n") + 6:]
  args = shlex.split(block[:block.index("```")].replace("\\\n", " "))
  assert args[:3] == ["python", "-m", "prompt_tuning.train"], args
  out = []
  for arg in args[3:]:
    if arg.startswith("--gin.INITIAL_CHECKPOINT_PATH="):
      arg = f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'"
    elif arg.startswith("--gin.MODEL_DIR="):
      arg = f"--gin.MODEL_DIR='{model_dir}'"
    out.append(arg)
  return out


def test_readme_hf_command_offline_without_a_vocabulary_is_one_line_and_creates_nothing(
    tmp_path, capsys, fresh_vocabularies, offline_gcs):
  """A new user's first run: an HF folder without spiece.model, no network. One `error:` line
  that names both fixes, exit status 2, and no MODEL_DIR left behind."""
  checkpoint, model_dir = hf_folder(tmp_path), tmp_path / "prompt_rte_hf"
  capsys.readouterr()  # transformers' progress bar
  with pytest.raises(SystemExit) as e:
    cli_flags.run_main(lambda: train_main.main(_readme_hf_command(checkpoint, model_dir)))
  assert e.value.code == 2
  err = capsys.readouterr().err
  line = err.splitlines()[0]
  assert line.startswith("error: Cannot read the T5 vocabulary "
                         "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model ("), err
  assert "Point $PROMPT_TUNING_T5_VOCAB at a local copy of that file" in line
  assert "put the model's spiece.model" in line and "Traceback" not in err
  assert not model_dir.exists()


def test_readme_hf_command_offline_uses_the_folders_spiece_model(tmp_path, capsys,
                                                                fresh_vocabularies, offline_gcs):
  """The same folder with HF's spiece.model: the tasks' vocabulary is that file, no setting, no
  network. The tiny model (64 embedding rows) cannot hold T5's ids, so the run stops at the next
  check, the class-label ids, which proves the labels were tokenised with the folder's file."""
  checkpoint = hf_folder(tmp_path, fixture_path("t5_sentencepiece.model"))
  model_dir = tmp_path / "prompt_rte_hf"
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli_flags.run_main(lambda: train_main.main(_readme_hf_command(checkpoint, model_dir)))
  assert e.value.code == 2
  captured = capsys.readouterr()
  assert (f"T5 vocabulary: {checkpoint / 'spiece.model'} (INITIAL_CHECKPOINT_PATH's "
          "spiece.model; 32100 ids)") in captured.out
  assert captured.err.startswith("error: The class label 'entailment' has token ids [5756, 297] "
                                 "outside the embedding table of 64 rows"), captured.err
  assert not model_dir.exists()


def test_check_writable_creates_nothing(tmp_path):
  """MODEL_DIR is created by the first write, so a run that fails before it leaves no folder."""
  model_dir = tmp_path / "new" / "run"
  checkpoints.check_writable(model_dir)
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "ro").mkdir(mode=0o555)
  if os.access(tmp_path / "ro", os.W_OK):
    pytest.skip("running as a user who can write anywhere (root)")
  with pytest.raises(ValueError, match="not writable"):
    checkpoints.check_writable(tmp_path / "ro" / "run")


# --- 4. Hostile files ---------------------------------------------------------------------------

def test_frozen_torch_bin_that_runs_code_is_refused(tmp_path):
  """A `pytorch_model.bin` is a pickle: read with weights_only=True, its code never runs."""
  torch = pytest.importorskip("torch")
  folder, marker = tmp_path / "hf", tmp_path / "ran"
  folder.mkdir()
  (folder / hf_format.HF_CONFIG).write_text(json.dumps(tiny_config().to_hf_dict()))
  torch.save({"shared.weight": Planted(marker)}, folder / hf_format.HF_TORCH)
  with pytest.raises(ValueError, match=r"Refusing to load .*pytorch_model\.bin.*weights_only"):
    pretrained.load_pretrained(folder)
  assert not marker.exists()


def test_frozen_safetensors_with_an_absurd_header_is_refused(tmp_path):
  """A header that claims 2**60 bytes is refused before anything is allocated."""
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / hf_format.HF_CONFIG).write_text(json.dumps(tiny_config().to_hf_dict()))
  (folder / hf_format.HF_SAFETENSORS).write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
  with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"
                                       r".*header too large"):
    pretrained.load_pretrained(folder)


@pytest.mark.parametrize("entry", ["train", "eval", "infer"])
def test_a_url_model_dir_is_refused_not_turned_into_a_local_folder(tmp_path, frozen_checkpoint,
                                                                  entry, monkeypatch, capsys):
  """`pathlib` would make `s3://bucket/run` the local folder `s3:/bucket/run`: train would write
  there and eval would find no checkpoint and evaluate a fresh prompt. A URL scheme other than
  gs:// (written natively, tests/formats/test_gcs.py) is refused, naming the schemes that work."""
  monkeypatch.chdir(tmp_path)
  flags = _flags(tmp_path / "unused", frozen_checkpoint)
  flags = [f for f in flags if not f.startswith("--gin.MODEL_DIR")]
  flags.append("--gin.MODEL_DIR='s3://bucket/run'")
  # Only the flags the eval/infer run files use: a macro no loaded file uses is refused.
  train_only = ("--gin.TRAIN_STEPS", "--gin.CHECKPOINT_PERIOD", "--gin.EVAL_PERIOD",
                "--gin.runs.train.")
  if entry == "eval":
    flags = [f.replace("runs/prompt_finetune.gin", "runs/prompt_eval.gin") for f in flags
             if not f.startswith(train_only + ("--gin.BATCH_SIZE",))]
    main = eval_main.main
  elif entry == "infer":
    flags = [f.replace("runs/prompt_finetune.gin", "runs/prompt_infer.gin") for f in flags
             if not f.startswith(train_only + ("--gin.EVAL_",))]
    flags.append(f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'out'}'")
    main = infer_main.main
  else:
    main = train_main.main
  with pytest.raises(SystemExit) as e:
    cli_flags.run_main(lambda: main(flags))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "MODEL_DIR 's3://bucket/run' is a s3:// URL, which we cannot read or write" in err
  assert "Supported URL schemes: gs://" in err
  assert not (tmp_path / "s3:").exists()


def test_hosts_checking_model_dir_at_once_do_not_trip_each_other(tmp_path):
  """Every host runs `check_writable` on the same MODEL_DIR at start-up; their probes must not
  collide (a shared probe file made one host fail with 'No such file or directory')."""
  import multiprocessing
  import time
  model_dir = tmp_path / "shared"
  ctx = multiprocessing.get_context("spawn")
  start = time.time() + 8  # all four hammer the folder during the same 2 seconds
  procs = [ctx.Process(target=_check_writable_repeatedly, args=(str(model_dir), start))
           for _ in range(4)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0] * 4
  assert not list(tmp_path.rglob(".write_test*"))


def _check_writable_repeatedly(model_dir, start):
  import time
  time.sleep(max(0.0, start - time.time()))
  while time.time() < start + 2:
    checkpoints.check_writable(model_dir)
