"""Run folders on gs:// against a real GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).

Every library that touches a run folder is exercised on a bucket exactly as on a local disk:
orbax checkpoints through our Checkpointer (tensorstore arrays, epath folders, the commit
marker), numpy exports, TensorBoard events, tf.data iterator states, frozen checkpoints
(INITIAL_CHECKPOINT_PATH) in our orbax format and in HF format; then whole runs (train, a
SIGKILL mid-save and the resume, eval, infer, export_prompt) with MODEL_DIR on gs://. Nothing is
mocked: the emulator speaks the GCS JSON API to the same clients a real bucket would get.
"""
import json
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from prompt_tuning.training import checkpoints
from prompt_tuning.data import dataset
from prompt_tuning import eval as eval_main
from prompt_tuning import infer as infer_main
from prompt_tuning.formats import pretrained
from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import storage
from prompt_tuning import train as train_main
from prompt_tuning.training import step as train_lib
from prompt_tuning.scripts import export_prompt
from tests.runs.test_reliability import NO_EVAL, STEPS, _final_prompt, _kill_when
from tests.runs.test_reliability import reference  # noqa: F401  pylint: disable=unused-import
from tests.runs.test_loop import PROMPT_LENGTH, REPO, _eval_flags, _flags, _subprocess_env
from tests.runs.test_loop import frozen_checkpoint  # noqa: F401  pylint: disable=unused-import

import tasks.demo  # noqa: F401  (registers demo_taskless_last)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {"encoder": {"prompt": {"prompt": jnp.asarray(rng.standard_normal((4, 16)),
                                                         jnp.float32)}}}
  return train_lib.TrainState(step=jnp.asarray(seed, jnp.int32), params=params,
                              opt_state={"m": jnp.asarray(rng.standard_normal(16), jnp.float32)})


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)


def test_checkpointer_saves_restores_and_prunes_on_gs(gcs_dir, gcs_emulator):
  """orbax on a bucket: each step committed with `commit_success.txt` (no folder rename), old
  steps pruned, the trees restored bit for bit by a new Checkpointer (as eval opens one), and
  each numpy export complete with its marker."""
  ckpt = checkpoints.Checkpointer(gcs_dir, keep=2, cleanup_tmp=True)
  states = {step: _state(step) for step in (1, 2, 3)}
  for step, state in states.items():
    ckpt.save(step, state, {"data_position": step})
  ckpt.close()
  prefix = gcs_dir.split("/", 3)[3] + "/"
  objects = gcs_emulator.objects(prefix)
  assert f"{prefix}checkpoints/3/commit_success.txt" in objects
  assert not any(o.startswith(f"{prefix}checkpoints/1/") for o in objects)  # pruned

  reader = checkpoints.Checkpointer(gcs_dir, keep=None)
  assert reader.all_steps() == [2, 3] and reader.latest_step() == 3
  restored, meta, _ = reader.restore(3, _abstract(states[3]))
  for got, want in zip(jax.tree_util.tree_leaves(restored),
                       jax.tree_util.tree_leaves({**checkpoints._state_tree(states[3]),
                                                  "params": states[3].params})):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  assert meta["data_position"] == 3 and reader.read_metadata(3)["step"] == 3
  reader.close()

  export = ckpt.numpy_export_dir(3)
  assert storage.is_complete(export)
  for name in ("encoder.prompt.prompt.npy", "encoder.prompt.prompt"):
    assert prompt_io.load_prompt(export / name).tobytes() == \
        np.asarray(states[3].params["encoder"]["prompt"]["prompt"]).tobytes()


def test_a_step_without_its_commit_marker_is_not_restored(gcs_dir):
  """On object storage a step is written in place; until orbax writes its marker (a kill in
  between leaves exactly this) the step is invisible and the previous one is the latest."""
  ckpt = checkpoints.Checkpointer(gcs_dir, keep=None)
  for step in (1, 2):
    ckpt.save(step, _state(step), {})
  ckpt.close()
  (storage.path(gcs_dir) / "checkpoints" / "2" / "commit_success.txt").unlink()
  reader = checkpoints.Checkpointer(gcs_dir, keep=None)
  assert reader.latest_step() == 1
  reader.close()


def test_a_re_export_on_gs_keeps_the_old_one_as_a_complete_backup(gcs_dir):
  ckpt = checkpoints.Checkpointer(gcs_dir, keep=None)
  old, new = _state(1).params, _state(2).params
  ckpt._export_numpy(5, old)
  ckpt._export_numpy(5, new)
  ckpt.close()
  backups = list(ckpt.numpy_dir.glob("backup_checkpoint_5_*"))
  assert len(backups) == 1 and storage.is_complete(backups[0])
  load = lambda folder: prompt_io.load_prompt(folder / "encoder.prompt.prompt.npy").tobytes()
  assert load(backups[0]) == np.asarray(old["encoder"]["prompt"]["prompt"]).tobytes()
  assert load(ckpt.numpy_export_dir(5)) == np.asarray(new["encoder"]["prompt"]["prompt"]).tobytes()


def test_an_export_killed_before_its_marker_is_written_again_on_resume(gcs_dir):
  """Files of an export without the marker (a kill mid-export): the resume path rewrites it."""
  ckpt = checkpoints.Checkpointer(gcs_dir, keep=None)
  params = _state(3).params
  folder = ckpt.numpy_export_dir(4)
  for name in checkpoints._export_names(params):
    prompt_io.save_prompt_npy(folder / name, np.zeros((4, 16), np.float32))
  assert not storage.is_complete(folder)
  ckpt.ensure_numpy_export(4, params)
  ckpt.close()
  assert storage.is_complete(folder)
  assert prompt_io.load_prompt(folder / "encoder.prompt.prompt").tobytes() == \
      np.asarray(params["encoder"]["prompt"]["prompt"]).tobytes()


def test_data_iterator_state_saves_and_restores_on_gs(gcs_dir, caplog):
  """The tf.data iterator checkpoint (tf.train.Checkpoint through TF's GCS filesystem)."""
  cfg = dataset.DatasetConfig("demo_taskless_last", {"inputs": 32, "targets": 8}, batch_size=8,
                              seed=7, module="tasks.demo")
  shard = seqio.ShardInfo(0, 1)
  state_dir = storage.join(gcs_dir, "data_state", "host_0", "3")
  batches = dataset.TrainBatches(cfg, shard_info=shard)
  for _ in range(3):
    next(batches)
  assert batches.save_state(str(state_dir))
  following = [next(batches) for _ in range(3)]
  caplog.set_level("INFO")
  restored = dataset.TrainBatches(cfg, start_position=3, shard_info=shard,
                                  state_dir=str(state_dir))
  assert "Restored the input pipeline at batch 3" in caplog.text
  for want in following:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("fmt", ["ours", "hf"])
def test_initial_checkpoint_on_gs(tmp_path, gcs_dir, frozen_checkpoint, fmt):
  """INITIAL_CHECKPOINT_PATH=gs://...: our orbax format (save_pretrained, then uploaded) and an
  HF folder (config.json + model.safetensors) load exactly as their local copies."""
  model, params = pretrained.load_pretrained(frozen_checkpoint)
  local = tmp_path / fmt
  if fmt == "ours":
    pretrained.save_pretrained(local, model, params)
  else:
    pretrained.export_hf(local, model.config, params)
  storage.copytree(local, gcs_dir)
  assert pretrained.detect_format(gcs_dir) == (fmt, gcs_dir)
  want_model, want = pretrained.load_pretrained(local)
  got_model, got = pretrained.load_pretrained(gcs_dir)
  assert got_model.config == want_model.config
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(flat_got) == len(flat_want)
  for key, value in flat_got:
    assert value.tobytes() == flat_want[key].tobytes(), key


def test_train_into_a_missing_bucket_fails_before_any_step(gcs_emulator, frozen_checkpoint,
                                                           capsys):
  """The start-up probe: one line naming MODEL_DIR, the object it tried and the fix; exit 2."""
  from prompt_tuning.cli import flags as cli_flags
  with pytest.raises(SystemExit) as e:
    cli_flags.run_main(lambda: train_main.main(
        _flags("gs://no-such-bucket-here/run", frozen_checkpoint, NO_EVAL)))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "MODEL_DIR 'gs://no-such-bucket-here/run' is not writable: writing the probe object" in err
  assert "gcloud storage buckets create gs://no-such-bucket-here" in err, err


def test_eval_of_an_empty_gs_model_dir_is_refused(gcs_dir, frozen_checkpoint):
  """A gs:// MODEL_DIR is looked up, not turned into a local folder: a typo is an error, never
  the evaluation of a fresh prompt."""
  with pytest.raises(ValueError, match=f"MODEL_DIR {gcs_dir} does not exist"):
    eval_main.main(_eval_flags(gcs_dir, frozen_checkpoint))


# --- Whole runs with MODEL_DIR on gs:// ---------------------------------------------------------
# The tiny frozen model and flags of tests/runs/test_loop.py; the local uninterrupted run of
# tests/runs/test_reliability.py is the reference each gs:// run must reproduce bit for bit.


def _prefix(url):
  return url.split("/", 3)[3] + "/"


def _steps_logged(model_dir):
  text = (storage.path(model_dir) / "metrics_train.jsonl").read_text()
  return [json.loads(line)["step"] for line in text.splitlines()]


def _committed(model_dir):
  ckpt = checkpoints.Checkpointer(model_dir, keep=None)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _gs_prompt(model_dir, step):
  folder = storage.path(model_dir) / "numpy_checkpoints" / f"checkpoint_{step}"
  assert storage.is_complete(folder)
  return prompt_io.load_prompt(folder / "encoder.prompt.prompt.npy")


@pytest.fixture(scope="module")
def gs_run(tmp_path_factory, gcs_emulator, frozen_checkpoint):
  """A run with MODEL_DIR and INITIAL_CHECKPOINT_PATH on gs://, SIGKILLed while orbax writes
  checkpoint 6 into the bucket (the test hook holds that save open after its data are written),
  then rerun to the end, with an eval at step 6. What the kill left is recorded in `killed`."""
  import types
  import uuid
  base = gcs_emulator.url("tests", f"gs_run-{uuid.uuid4().hex[:8]}")
  frozen, model_dir = f"{base}/frozen", f"{base}/run"
  storage.copytree(frozen_checkpoint, frozen)
  log = tmp_path_factory.mktemp("gs_run") / "killed.log"
  cmd = [sys.executable, "-m", "prompt_tuning.train",
         *_flags(model_dir, frozen, NO_EVAL, steps=STEPS)]
  with open(log, "w") as out:  # os.environ holds the emulator's variables: the child inherits
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**_subprocess_env(8), checkpoints.SLOW_SAVE_ENV: "6:120"})
  step_6 = _prefix(model_dir) + "checkpoints/6/"
  _kill_when(proc, lambda: ("pausing 120 s before committing" in log.read_text()
                            and bool(gcs_emulator.objects(step_6))), log)
  killed = types.SimpleNamespace(
      step_6_objects=gcs_emulator.objects(step_6), committed=_committed(model_dir),
      export_6=(storage.path(model_dir) / "numpy_checkpoints" / "checkpoint_6").exists(),
      logged=_steps_logged(model_dir))
  gin.clear_config()
  result = train_main.main(_flags(model_dir, frozen, steps=STEPS))
  gin.clear_config()
  return types.SimpleNamespace(model_dir=model_dir, frozen=frozen, killed=killed, result=result)


@pytest.mark.slow
def test_sigkill_during_a_save_to_gs_resumes_bit_identical(gs_run, reference):
  """Killed mid-save of checkpoint 6 (its objects are in the bucket, its commit_success.txt is
  not): checkpoint 3 stayed the latest, the rerun resumed from it, and the final prompt equals
  the uninterrupted local run's bit for bit; each step is logged once; the run folder holds
  everything a local one does."""
  killed, model_dir = gs_run.killed, gs_run.model_dir
  assert killed.step_6_objects
  assert _prefix(model_dir) + "checkpoints/6/commit_success.txt" not in killed.step_6_objects
  assert killed.committed == [3] and not killed.export_6 and killed.logged[-1] > 3

  assert gs_run.result["step"] == STEPS and _committed(model_dir) == [3, 6]
  assert _steps_logged(model_dir) == list(range(1, STEPS + 1))
  assert _gs_prompt(model_dir, STEPS).tobytes() == _final_prompt(reference, STEPS).tobytes()
  run = storage.path(model_dir)
  assert (run / "data_state" / "host_0" / "6" / "state.json").exists()
  assert [json.loads(l)["step"] for l in (run / "metrics_eval.jsonl").read_text().splitlines()] \
      == [STEPS]


@pytest.mark.slow
def test_tensorboard_events_read_back_from_the_bucket(gs_run):
  """Each train loss TensorBoard shows equals the JSONL row of its step (the steps the killed run
  had logged and the rerun replayed hold the same value in both event files)."""
  import tensorflow as tf
  model_dir = gs_run.model_dir
  files = sorted(tf.io.gfile.glob(f"{model_dir}/train/events.out.tfevents.*"))
  assert len(files) == 2  # the killed run's and the resumed run's
  losses = {}
  for f in files:
    for event in tf.compat.v1.train.summary_iterator(f):
      for value in event.summary.value:
        if value.tag == "loss":
          losses.setdefault(event.step, []).append(float(tf.make_ndarray(value.tensor)))
  rows = [json.loads(l) for l in
          (storage.path(model_dir) / "metrics_train.jsonl").read_text().splitlines()]
  assert sorted(losses) == [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for r in rows:  # steps the killed run logged and the resumed run replayed: the same loss
    assert set(losses[r["step"]]) == {float(np.float32(r["loss"]))}


@pytest.mark.slow
def test_eval_and_infer_read_a_gs_model_dir_and_write_there(gs_run):
  """eval and infer restore the trained prompt from the bucket and write their outputs into it;
  eval's results equal those the training run computed for the same prompt at its last step."""
  model_dir, frozen = gs_run.model_dir, gs_run.frozen
  out = eval_main.main(_eval_flags(model_dir, frozen))
  assert out["checkpoint_step"] == STEPS and out["results"] == gs_run.result["eval"]
  written = json.loads((storage.path(model_dir) / "eval_results_greedy.json").read_text())
  assert written["results"] == out["results"]
  assert tf_events(f"{model_dir}/eval_greedy")

  gin.clear_config()
  infer_dir = f"{model_dir}/infer"
  paths = infer_main.main([
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_infer.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{frozen}'", f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'", "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
      f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}", "--gin.INFER_MAX_EXAMPLES=5",
      f"--gin.INFER_OUTPUT_DIR='{infer_dir}'"])
  assert [str(p) for p in paths] == [f"{infer_dir}/demo_taskless_last-{STEPS}.jsonl"]
  rows = [json.loads(l) for l in storage.path(paths[0]).read_text().splitlines()]
  assert len(rows) == 5 and {"inputs", "prediction", "score", "target"} <= set(rows[0])


def tf_events(folder):
  import tensorflow as tf
  return tf.io.gfile.glob(f"{folder}/**/events.out.tfevents.*") + tf.io.gfile.glob(
      f"{folder}/events.out.tfevents.*")


@pytest.mark.slow
def test_export_prompt_from_and_to_gs(gs_run):
  """export_prompt reads the bucket's run folder and writes prompt.npy and a complete PEFT
  adapter folder (with its marker) back to the bucket; a second export replaces it."""
  model_dir = gs_run.model_dir
  out_dir = f"{model_dir}/export"
  for _ in range(2):
    out = export_prompt.main(["--model_dir", model_dir, "--output_dir", out_dir])
  assert out["step"] == STEPS and out["npy"] == f"{out_dir}/prompt.npy"
  want = _gs_prompt(model_dir, STEPS).tobytes()
  assert prompt_io.load_prompt(out["npy"]).tobytes() == want
  adapter = storage.path(out["peft_adapter"])
  assert storage.is_complete(adapter)
  assert sorted(p.name for p in adapter.iterdir()) == [
      "adapter_config.json", "adapter_model.safetensors", "commit_success.txt"]
  assert prompt_io.load_prompt(adapter).tobytes() == want
