"""Resuming the input pipeline from its saved tf.data state gives the batches a replay gives."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest
import seqio

from prompt_tuning.data import dataset

import tasks.demo  # noqa: F401  (registers demo_taskless_last)

CFG = dataset.DatasetConfig("demo_taskless_last", {"inputs": 32, "targets": 8}, batch_size=8,
                            seed=7, module="tasks.demo")
SHARD = seqio.ShardInfo(0, 1)


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A pipeline run 5 batches, its state saved there, and the 4 batches that followed."""
  state_dir = str(tmp_path_factory.mktemp("data_state") / "5")
  batches = dataset.TrainBatches(CFG, shard_info=SHARD)
  _take(batches, 5)
  assert batches.save_state(state_dir)
  return state_dir, _take(batches, 4)


def test_restored_pipeline_continues_where_the_saved_one_was(saved, caplog):
  state_dir, following = saved
  caplog.set_level("INFO")
  restored = dataset.TrainBatches(CFG, start_position=5, shard_info=SHARD, state_dir=state_dir)
  assert "Restored the input pipeline at batch 5" in caplog.text
  _assert_same(_take(restored, 4), following)
  replayed = dataset.TrainBatches(CFG, start_position=5, shard_info=SHARD)
  _assert_same(_take(replayed, 4), following)
  assert json.loads((pathlib.Path(state_dir) / "state.json").read_text())["position"] == 5


@pytest.mark.parametrize("change", ["seed", "position", "corrupt", "no_marker"])
def test_unusable_state_falls_back_to_replaying(saved, tmp_path, change, caplog):
  """A state for another configuration or position, a damaged one, or one whose marker was
  never written (killed mid-save) is ignored: the stream is replayed instead."""
  import shutil
  state_dir = tmp_path / "state"
  shutil.copytree(saved[0], state_dir)
  cfg, position = CFG, 5
  if change == "seed":
    cfg = dataclasses.replace(CFG, seed=8)
  elif change == "position":
    position = 6
  elif change == "corrupt":
    for f in state_dir.glob("iterator.data*"):
      f.write_bytes(b"\0" * 64)
  else:
    (state_dir / "state.json").unlink()
  caplog.set_level("INFO")
  got = _take(dataset.TrainBatches(cfg, start_position=position, shard_info=SHARD,
                                   state_dir=str(state_dir)), 3)
  assert "Restored the input pipeline" not in caplog.text
  _assert_same(got, _take(dataset.TrainBatches(cfg, start_position=position, shard_info=SHARD), 3))
  if change != "no_marker":
    assert "replaying" in caplog.text


def test_restored_pipeline_reshuffles_later_epochs_as_the_original(tmp_path):
  """A 12-example task read 8 at a time: the saved state sits mid-epoch, and the epochs after
  it are shuffled as they are in the uninterrupted stream."""
  import tensorflow as tf
  name = "test_tiny_12_examples"
  if name not in seqio.TaskRegistry.names():
    words = [f"w{i}" for i in range(12)]
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files=False, seed=None: tf.data.Dataset.from_tensor_slices(
                {"inputs": words, "targets": words}), splits=("train",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=seqio.get_mixture_or_task("demo_taskless_last").output_features)
  cfg = dataclasses.replace(CFG, mixture_or_task_name=name, module=None)
  straight = _take(dataset.TrainBatches(cfg, shard_info=SHARD), 9)
  first = dataset.TrainBatches(cfg, shard_info=SHARD)
  _take(first, 5)
  assert first.save_state(str(tmp_path / "5"))
  restored = dataset.TrainBatches(cfg, start_position=5, shard_info=SHARD,
                                  state_dir=str(tmp_path / "5"))
  _assert_same(_take(restored, 4), straight[5:])
  # Later epochs really are reshuffled (so the comparison above covers the shuffle state).
  epochs = np.concatenate([b["encoder_input_tokens"] for b in straight])[:72].reshape(6, 12, -1)
  assert len({e.tobytes() for e in epochs}) > 1


def test_a_pipeline_tf_data_cannot_checkpoint_is_replayed(tmp_path, caplog):
  """Python-generator sources have no saveable state: one warning, then resumes replay."""
  import tensorflow as tf
  name = "test_generator_source"
  if name not in seqio.TaskRegistry.names():
    def make(split, shuffle_files=False, seed=None):
      def gen():
        for i in range(50):
          yield {"inputs": f"x{i}", "targets": f"y{i}"}
      spec = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string)}
      return tf.data.Dataset.from_generator(gen, output_signature=spec)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(make, splits=("train",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=seqio.get_mixture_or_task("demo_taskless_last").output_features)
  cfg = dataclasses.replace(CFG, mixture_or_task_name=name, module=None)
  batches = dataset.TrainBatches(cfg, shard_info=SHARD)
  _take(batches, 2)
  caplog.set_level("INFO")
  assert not batches.save_state(str(tmp_path / "2"))
  assert "Cannot save the input pipeline's state" in caplog.text
  assert not batches.save_state(str(tmp_path / "3"))  # no second attempt, no second warning
  assert caplog.text.count("Cannot save") == 1
  following = _take(batches, 2)
  resumed = dataset.TrainBatches(cfg, start_position=2, shard_info=SHARD,
                                 state_dir=str(tmp_path / "2"))
  _assert_same(_take(resumed, 2), following)
