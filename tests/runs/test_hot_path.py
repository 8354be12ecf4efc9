"""The training loop's hot path: no host sync per step, and evaluation compiled once per run."""
import jax
import gin
import numpy as np
import pytest

from prompt_tuning.model import partitioning
from prompt_tuning import train as train_main
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.model import partitioning
from prompt_tuning.runs import setup as run_setup
from tests.runs.test_loop import _flags, frozen_checkpoint  # noqa: F401  (module fixture)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _host_fetches(monkeypatch, tmp_path, checkpoint, steps):
  calls = []
  real = partitioning.to_host

  def counting(x):
    calls.append(1)
    return real(x)

  monkeypatch.setattr(partitioning, "to_host", counting)
  gin.clear_config()
  flags = _flags(tmp_path / f"run{steps}", checkpoint, "--gin.runs.train.evaluation=None",
                 steps=steps)
  # One log and one checkpoint, at the last step, whatever the number of steps.
  flags = [f for f in flags if "log_period" not in f and "CHECKPOINT_PERIOD" not in f]
  train_main.main(flags + [f"--gin.runs.train.log_period={steps}",
                           f"--gin.CHECKPOINT_PERIOD={steps}"])
  return len(calls)


def test_training_fetches_nothing_from_the_device_per_step(monkeypatch, tmp_path,
                                                           frozen_checkpoint):
  """`bool(metrics["finite"])` synced host and device at every step; the non-finite check now
  stays on the device until the next log, save or evaluation: as many fetches for 8 steps as
  for 2."""
  assert (_host_fetches(monkeypatch, tmp_path, frozen_checkpoint, 2)
          == _host_fetches(monkeypatch, tmp_path, frozen_checkpoint, 8))


def test_evaluation_compiles_once_per_run(frozen_checkpoint):
  """Two evaluation periods: the second compiles nothing (a fresh `jax.jit(lambda)` per call
  used to recompile the eval, predict and score functions every period)."""
  from prompt_tuning.data import dataset
  from prompt_tuning.inference import evaluation
  from prompt_tuning.training import optimizers
  import tasks.demo  # noqa: F401
  lengths = {"inputs": 32, "targets": 8}
  setup = run_setup.build(
      model_config=None, prompt_config=PromptConfig(length=4),
      initial_checkpoint_path=frozen_checkpoint, partition=run_setup.PartitionConfig(num_devices=1),
      trainable_patterns=optimizers.PROMPT_PATTERNS, task_feature_lengths=lengths,
      prompt_init=run_setup.PromptInit(), random_seed=0)
  ev = evaluation.Evaluation(setup, dataset.DatasetConfig("demo_taskless_last", lengths,
                                                          split="validation", batch_size=4),
                             max_examples=8)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
  first = ev.run(setup.trainable, step=1)
  moved = jax.tree_util.tree_map(lambda x: x + 0.1, setup.trainable)  # another prompt, same shapes
  jax.block_until_ready(moved)
  n_first = len(compiles)
  second = ev.run(moved, step=2)
  assert n_first > 0 and len(compiles) == n_first
  assert first["demo_taskless_last"].metrics["loss"] != second["demo_taskless_last"].metrics["loss"]
  assert np.isfinite(second["demo_taskless_last"].metrics["loss"])
