"""The trainer through its command lines: train -> checkpoint -> resume -> eval -> infer, resume
exactness after SIGKILL, SIGTERM, sharded and multi-process runs, and the errors users hit."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from prompt_tuning import T5
from prompt_tuning import eval as eval_main
from prompt_tuning import infer as infer_main
from prompt_tuning.formats import pretrained
from prompt_tuning import train as train_main
from tests.conftest import tiny_config, tiny_hf_t5

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT_LENGTH = 4


@pytest.fixture(scope="module")
def frozen_checkpoint(tmp_path_factory):
  """A tiny random byte-vocabulary T5 saved in this project's format (stands in for a real one)."""
  cfg = tiny_config(vocab_size=384)
  model = T5(cfg)
  x = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, x)["params"])
  path = tmp_path_factory.mktemp("frozen") / "tiny_t5"
  pretrained.save_pretrained(path, model, params)
  return str(path)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _flags(model_dir, checkpoint, *extra, steps=6):
  return [
      "--gin_file=models/from_checkpoint.gin",
      "--gin_file=runs/prompt_finetune.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'",
      "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.BATCH_SIZE=8",
      "--gin.EVAL_BATCH_SIZE=8",
      f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}",
      "--gin.CHECKPOINT_PERIOD=3",
      "--gin.EVAL_PERIOD=1000",
      "--gin.EVAL_MAX_EXAMPLES=8",
      "--gin.DROPOUT_RATE=0.0",
      "--gin.runs.train.log_period=1",
      *extra,
  ]


NO_EVAL = "--gin.runs.train.evaluation=None"  # tests of training mechanics skip decoding


def _eval_flags(model_dir, checkpoint):
  return [
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'", f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'", "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.EVAL_BATCH_SIZE=8",
      f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}", "--gin.EVAL_MAX_EXAMPLES=8"]


def _final_prompt(model_dir, step):
  return np.load(pathlib.Path(model_dir) / "numpy_checkpoints" / f"checkpoint_{step}" /
                 "encoder.prompt.prompt.npy")


def test_train_checkpoint_resume_eval_infer(tmp_path, frozen_checkpoint, capsys):
  model_dir = tmp_path / "run"
  data_states = lambda: sorted(int(p.name) for p in (model_dir / "data_state" / "host_0").iterdir())
  result = train_main.main(_flags(model_dir, frozen_checkpoint, "--gin.BEST_METRIC='exact_match'",
                                  steps=3))
  assert result["step"] == 3
  best = json.loads((model_dir / "best" / "best.json").read_text())
  assert best["step"] == 3 and best["metric"] == "exact_match"
  assert (model_dir / "best" / "numpy_checkpoints" / "checkpoint_3").is_dir()
  assert result["trainable_params"] == PROMPT_LENGTH * 16
  assert (model_dir / "checkpoints" / "3").is_dir()
  assert _final_prompt(model_dir, 3).shape == (PROMPT_LENGTH, 16)
  assert list((model_dir / "train").glob("events.out.tfevents.*"))
  lines = (model_dir / "metrics_train.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
  assert {"loss", "steps_per_sec", "learning_rate", "tokens_per_sec"} <= set(json.loads(lines[0]))

  assert data_states() == [3]  # the input pipeline's state beside each checkpoint

  gin.clear_config()  # resume: same command, more steps; continues from step 3
  capsys.readouterr()
  result = train_main.main(_flags(model_dir, frozen_checkpoint, steps=6))
  assert result["step"] == 6
  # No replay of 3 batches (the entry points log to stdout).
  assert "Restored the input pipeline at batch 3" in capsys.readouterr().out
  assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()) == [3, 6]
  assert data_states() == [3, 6]
  meta = json.loads((model_dir / "checkpoints" / "6" / "metadata" / "metadata").read_text())
  assert meta["data_position"] == 6 and meta["initial_checkpoint_path"] == frozen_checkpoint

  gin.clear_config()
  out = eval_main.main(_eval_flags(model_dir, frozen_checkpoint))
  assert out["checkpoint_step"] == 6
  metrics = out["results"]["demo_taskless_last"]
  assert 0.0 <= metrics["exact_match"] <= 100.0 and np.isfinite(metrics["loss"])
  assert (model_dir / "eval_results_greedy.json").exists()

  gin.clear_config()
  paths = infer_main.main([
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_infer.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{frozen_checkpoint}'", f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'", "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
      f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}", "--gin.INFER_MAX_EXAMPLES=5",
      f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"])
  rows = [json.loads(l) for l in pathlib.Path(paths[0]).read_text().splitlines()]
  assert len(rows) == 5 and {"inputs", "prediction", "score", "target"} <= set(rows[0])


def test_sharded_run_matches_single_device(tmp_path, frozen_checkpoint):
  """Mesh data 4 x model 2 over 8 simulated devices trains the same prompt as 1 device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  train_main.main(_flags(tmp_path / "one", frozen_checkpoint, NO_EVAL,
                         "--gin.runs.PartitionConfig.mesh_shape=(1, 1)", steps=3)
                  + ["--gin.runs.PartitionConfig.num_devices=1"])
  gin.clear_config()
  train_main.main(_flags(tmp_path / "eight", frozen_checkpoint, NO_EVAL,
                         "--gin.runs.PartitionConfig.mesh_shape=(4, 2)",
                         "--gin.runs.PartitionConfig.parameter_partitioning_dims=2", steps=3))
  np.testing.assert_allclose(_final_prompt(tmp_path / "eight", 3),
                             _final_prompt(tmp_path / "one", 3), atol=1e-5)
  # Without an eval dataset there are train summaries and no (empty) eval summary folder.
  assert (tmp_path / "one" / "train").is_dir() and not (tmp_path / "one" / "eval").exists()


def _subprocess_env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["PYTHONPATH"] = str(REPO)
  return env


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path, frozen_checkpoint,
                                                              capsys):
  steps = 12
  cmd = [sys.executable, "-m", "prompt_tuning.train",
         *_flags(tmp_path / "killed", frozen_checkpoint, NO_EVAL, steps=steps)]
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(8), stdout=log,
                          stderr=subprocess.STDOUT)
  marker = tmp_path / "killed" / "checkpoints" / "3" / "commit_success.txt"
  deadline = time.time() + 240
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), ("the run never wrote its first checkpoint:\n" +
                           (tmp_path / "killed.log").read_text()[-3000:])

  capsys.readouterr()
  train_main.main(_flags(tmp_path / "killed", frozen_checkpoint, NO_EVAL, steps=steps))
  # The resumed data stream comes from the saved input pipeline state, not a replay.
  assert re.search(r"Restored the input pipeline at batch \d+", capsys.readouterr().out)
  gin.clear_config()
  train_main.main(_flags(tmp_path / "straight", frozen_checkpoint, NO_EVAL, steps=steps))
  resumed = _final_prompt(tmp_path / "killed", steps)
  straight = _final_prompt(tmp_path / "straight", steps)
  assert resumed.tobytes() == straight.tobytes()


@pytest.mark.slow
def test_sigterm_saves_then_exits_cleanly(tmp_path, frozen_checkpoint):
  model_dir = tmp_path / "term"
  cmd = [sys.executable, "-m", "prompt_tuning.train",
         *_flags(model_dir, frozen_checkpoint, NO_EVAL, "--gin.CHECKPOINT_PERIOD=100000",
                 steps=100000)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  seen = []
  for line in proc.stdout:  # wait until training is under way
    seen.append(line)
    if "step 5/" in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, "".join(seen) + rest
  steps = [int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 5
  assert "preempted_at" in rest


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_save_and_one_restores(tmp_path, frozen_checkpoint):
  """jax.distributed on localhost: 2 processes x 2 CPU devices train and save collectively."""
  port = _free_port()
  model_dir = tmp_path / "multi"
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "prompt_tuning.train",
           f"--coordinator_address=127.0.0.1:{port}", "--process_count=2",
           f"--process_index={i}", *_flags(model_dir, frozen_checkpoint, NO_EVAL, steps=3)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(2),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert (model_dir / "checkpoints" / "3").is_dir()
  # One process alone restores what the pair saved, and evaluates it.
  out = eval_main.main(_eval_flags(model_dir, frozen_checkpoint))
  assert out["checkpoint_step"] == 3
  np.testing.assert_equal(_final_prompt(model_dir, 3).shape, (PROMPT_LENGTH, 16))


def test_scanned_layers_train_the_same_prompt(tmp_path, frozen_checkpoint):
  """scan_layers=True loads the per-layer checkpoint, stacks it, and trains the same prompt."""
  from prompt_tuning.data import dataset
  from prompt_tuning.model.prompt import PromptConfig
  from prompt_tuning.runs import loop
  data = dataset.DatasetConfig("demo_taskless_last", {"inputs": 32, "targets": 8}, batch_size=8,
                               module="tasks.demo")
  prompts = {}
  for scan in (False, True):
    loop.train(model_dir=str(tmp_path / f"scan_{scan}"), train_dataset=data, train_steps=2,
               model_config=tiny_config(vocab_size=384, scan_layers=scan),
               prompt_config=PromptConfig(length=PROMPT_LENGTH),
               initial_checkpoint_path=frozen_checkpoint,
               checkpoints=loop.CheckpointConfig(period=2))
    prompts[scan] = _final_prompt(tmp_path / f"scan_{scan}", 2)
  np.testing.assert_allclose(prompts[True], prompts[False], atol=1e-5)


# --- MODEL_RUNTIME: how a checkpoint that carries its own architecture runs ---------------------

def _build(checkpoint, model_config=None, model_runtime=None):
  from prompt_tuning.training import optimizers
  from prompt_tuning.model.prompt import PromptConfig
  from prompt_tuning.runs import loop
  from prompt_tuning.runs import setup as run_setup
  return run_setup.build(
      model_config=model_config, prompt_config=PromptConfig(length=PROMPT_LENGTH),
      initial_checkpoint_path=str(checkpoint), partition=run_setup.PartitionConfig(num_devices=1),
      trainable_patterns=optimizers.PROMPT_PATTERNS,
      task_feature_lengths={"inputs": 8, "targets": 4}, prompt_init=run_setup.PromptInit(),
      random_seed=0, model_runtime=model_runtime)


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_model_runtime_sets_runtime_fields_of_a_checkpoints_own_config(tmp_path,
                                                                       frozen_checkpoint, kind):
  """With no MODEL_CONFIG (models/from_checkpoint.gin) the checkpoint gives the architecture and
  MODEL_RUNTIME the runtime fields it names; the others keep the checkpoint's values."""
  checkpoint = frozen_checkpoint
  if kind == "hf":
    checkpoint = tmp_path / "hf"
    tiny_hf_t5().save_pretrained(checkpoint)
  own = _build(checkpoint).module.config
  config = _build(checkpoint, model_runtime={"matmul_dtype": "bfloat16",
                                             "remat_policy": "full"}).module.config
  assert (config.matmul_dtype, config.remat_policy) == ("bfloat16", "full")
  assert config == own.replace(matmul_dtype="bfloat16", remat_policy="full")


def test_model_runtime_wins_over_model_config(frozen_checkpoint):
  config = _build(frozen_checkpoint,
                  model_config=tiny_config(vocab_size=384, remat_policy="dots",
                                           matmul_dtype="bfloat16"),
                  model_runtime={"remat_policy": "full"}).module.config
  assert (config.remat_policy, config.matmul_dtype) == ("full", "bfloat16")


def test_model_runtime_through_gin_reaches_the_trained_model(tmp_path, frozen_checkpoint):
  model_dir = tmp_path / "run"
  runtime = "{'matmul_dtype': 'bfloat16', 'remat_policy': 'full', 'scan_layers': True}"
  train_main.main(_flags(model_dir, frozen_checkpoint, NO_EVAL, f"--gin.MODEL_RUNTIME={runtime}",
                         steps=1))
  meta = json.loads((model_dir / "checkpoints" / "1" / "metadata" / "metadata").read_text())
  assert {k: meta["model_config"][k] for k in ("matmul_dtype", "remat_policy", "scan_layers")} == {
      "matmul_dtype": "bfloat16", "remat_policy": "full", "scan_layers": True}


@pytest.mark.parametrize("runtime, match", [
    ({"d_model": 32}, r"only the runtime fields \['dtype', 'dropout_rate', 'remat_policy', "
                      r"'matmul_dtype', 'scan_layers'\]; got \['d_model'\] \(\['d_model'\] "
                      r"describe the architecture"),
    ({"no_such_field": 1}, r"runtime fields .*got \['no_such_field'\]"),
    ({"remat_policy": "sometimes"}, "remat_policy must be"),
    ({"scan_layers": "True"}, "scan_layers must be True or False"),
])
def test_model_runtime_refuses_architecture_and_unknown_keys(tmp_path, frozen_checkpoint, runtime,
                                                             match):
  """Through the eval command line, before any checkpoint is read."""
  with pytest.raises(ValueError, match=match):
    eval_main.main(_eval_flags(tmp_path / "run", frozen_checkpoint)
                   + [f"--gin.MODEL_RUNTIME={runtime!r}"])


# --- Errors users hit ---------------------------------------------------------------------------

def test_unknown_task_suggests_close_names(tmp_path, frozen_checkpoint):
  flags = _flags(tmp_path / "x", frozen_checkpoint)
  flags = [f for f in flags if "MIXTURE_OR_TASK_NAME" not in f]
  with pytest.raises(ValueError, match="demo_taskless_last"):
    train_main.main(flags + ["--gin.MIXTURE_OR_TASK_NAME='demo_taskless_lst'"])


def test_bad_gin_binding_is_named(tmp_path, frozen_checkpoint):
  with pytest.raises(ValueError, match="NOT_A_MACRO|runs.train.no_such_arg"):
    train_main.main(_flags(tmp_path / "x", frozen_checkpoint,
                           "--gin.runs.train.no_such_arg=3"))


def test_missing_model_dir_is_a_clear_error(frozen_checkpoint):
  flags = [f for f in _flags("unused", frozen_checkpoint) if "MODEL_DIR" not in f]
  with pytest.raises(ValueError, match="MODEL_DIR"):
    train_main.main(flags)


def test_unwritable_model_dir(tmp_path, frozen_checkpoint):
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(ValueError, match="not writable"):
    train_main.main(_flags(blocked / "run", frozen_checkpoint))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
    train_main.main(_flags(tmp_path / "x", str(tmp_path / "nowhere")))


# --- seqio metric functions of every kind ---------------------------------------------------------

def test_eval_calls_score_and_aux_metric_fns_as_seqio_does(frozen_checkpoint):
  """`score_metric_fns(targets, scores)` get each target's log-likelihood, and
  `predict_with_aux_metric_fns(targets, predictions, aux_values)` each prediction's score."""
  import seqio
  from prompt_tuning.data import dataset
  from prompt_tuning.inference import decoding
  from prompt_tuning.training import optimizers
  from prompt_tuning.model.prompt import PromptConfig
  from prompt_tuning.runs import loop
  from prompt_tuning.runs import setup as run_setup
  from prompt_tuning.inference import evaluation as evaluation_lib
  import tasks.demo  # noqa: F401  (registers demo_taskless_last)
  base = seqio.get_mixture_or_task("demo_taskless_last")
  seen = {}

  def target_ll(targets, scores):
    seen["targets"], seen["target_scores"] = list(targets), np.asarray(scores)
    return {"mean_target_ll": float(np.mean(scores))}

  def prediction_ll(targets, predictions, aux_values):
    seen["predictions"], seen["scores"] = list(predictions), np.asarray(aux_values["scores"])
    return {"mean_prediction_ll": float(np.mean(aux_values["scores"]))}

  name = "test_demo_last_score_metrics"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=base.source, preprocessors=base.preprocessors,
                         output_features=base.output_features,
                         metric_fns=list(base.predict_metric_fns) + [target_ll, prediction_ll])
  lengths = {"inputs": 32, "targets": 8}
  setup = run_setup.build(
      model_config=None, prompt_config=PromptConfig(length=PROMPT_LENGTH),
      initial_checkpoint_path=frozen_checkpoint, partition=run_setup.PartitionConfig(num_devices=1),
      trainable_patterns=optimizers.PROMPT_PATTERNS, task_feature_lengths=lengths,
      prompt_init=run_setup.PromptInit(), random_seed=0)
  cfg = dataset.DatasetConfig(name, lengths, batch_size=4)
  evaluation = evaluation_lib.Evaluation(setup, cfg, max_examples=6)
  results = evaluation.run(setup.trainable)[name].metrics
  data = evaluation.tasks[0]
  tokens, scores = evaluation.predict(setup.trainable, data)
  assert len(seen["target_scores"]) == len(seen["scores"]) == len(data) == 6
  # Prediction scores are the decoder's, in example order.
  np.testing.assert_allclose(seen["scores"], scores, rtol=1e-6)
  assert seen["predictions"] == [data.vocabulary.decode(t.tolist()) for t in tokens]
  assert seen["targets"] == [ex["targets_pretokenized"].decode() for ex in data.examples]
  # Target scores equal an independent teacher-forced scoring of the same examples.
  params = optimizers.merge_params(setup.trainable, setup.frozen)
  expected = decoding.score_targets(
      setup.module, params, data.features["encoder_input_tokens"],
      data.features["decoder_input_tokens"], data.features["decoder_target_tokens"])
  np.testing.assert_allclose(seen["target_scores"], expected, rtol=1e-5, atol=1e-5)
  assert np.all(seen["target_scores"] < 0)
  assert results["mean_target_ll"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
  assert "exact_match" in results and "mean_prediction_ll" in results
