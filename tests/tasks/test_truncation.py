"""Examples longer than TASK_FEATURE_LENGTHS are counted on every task family, before trimming.

GLUE, SuperGLUE, QA and file tasks trim in their preprocessing (`append_eos_after_trim`, which
keeps EOS on a cut sequence), so a count taken on what the pipeline yields saw nothing. The
reference here is each example's length from the same task read with no sequence length (no
trimming at all), under `tfds.testing.mock_data` and the real T5 vocabulary.
"""
import json
import logging

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks.all  # noqa: F401  (GLUE, SuperGLUE, QA)
import tasks.demo  # noqa: F401
from prompt_tuning.data import dataset
from prompt_tuning.inference import evaluation
from prompt_tuning.data import file_tasks

FEATURES = ("inputs", "targets")


@pytest.fixture(scope="module")
def mock_data():
  with tfds.testing.mock_data(num_examples=4):
    yield


@pytest.fixture
def data(mock_data, t5_vocab_file, monkeypatch):
  """Mock TFDS data has no split metadata; seqio asks for it to decide on sharding and caching."""
  del mock_data, t5_vocab_file
  monkeypatch.setattr(seqio.TfdsDataSource, "list_shards", lambda self, split: [split])
  monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)


@pytest.fixture
def file_task(tmp_path):
  rows = [{"text": " ".join(["word"] * n), "label": label}
          for n, label in ((3, "positive"), (12, "negative"), (30, "positive"), (7, "negative"))]
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  name = file_tasks.register_file_task(
      "truncation_file_task", train=str(path), validation=str(path), inputs="review: {text}",
      targets="{label}", class_labels=["negative", "positive"])
  yield name
  seqio.TaskRegistry.remove(name)
  file_tasks._FILE_TASKS.pop(name, None)


FAMILIES = {
    "glue": "taskless_glue_rte_v200",
    "super_glue": "task_index_super_glue_boolq_v102",
    "qa": "squad_v010_allanswers",
    "demo": "demo_taskless_last",
    "file": None,  # the file_task fixture
}


def untrimmed_lengths(name, split, n=None):
  """[N, 2] lengths of inputs/targets with EOS, from the task read without any sequence length."""
  ds = seqio.get_mixture_or_task(name).get_dataset(
      None, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False,
      trim_output_features=False, num_epochs=1)
  if n is not None:
    ds = ds.take(n)
  return np.array([[len(ex[f]) for f in FEATURES] for ex in ds.as_numpy_iterator()])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_counts_truncation_before_trimming(data, request, family, caplog):
  name = FAMILIES[family] or request.getfixturevalue("file_task")
  reference = untrimmed_lengths(name, "train", n=4)
  assert len(reference) == 4
  # Some inputs over the limit and some not; no target over its limit.
  limits = {"inputs": int(reference[:, 0].min()), "targets": int(reference[:, 1].max())}
  over = reference[:, 0] > limits["inputs"]
  assert over.any()
  cfg = dataset.DatasetConfig(name, limits, batch_size=4, shuffle=False)
  batches = dataset.TrainBatches(cfg, shard_info=seqio.ShardInfo(0, 1))
  batch = next(batches)
  assert batch["encoder_input_tokens"].shape == (4, limits["inputs"])
  t = batches.truncation
  assert (t.examples, t.truncated, batches.truncated_examples) == (4, over.sum(), over.sum())
  assert t.per_feature == {"inputs": over.sum(), "targets": 0}
  assert t.longest == {"inputs": reference[:, 0].max(), "targets": reference[:, 1].max()}
  assert (f"Batch 1: {over.sum()} of 4 training examples so far were longer than "
          f"TASK_FEATURE_LENGTHS and were truncated: inputs {over.sum()} (longest "
          f"{reference[:, 0].max()} tokens, limit {limits['inputs']}), targets 0") in caplog.text
  # What the model sees is still correctly trimmed: EOS kept where the task keeps it.
  if family != "demo":
    assert (batch["encoder_input_tokens"][over, -1] == 1).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluation_counts_truncated_targets(data, request, family, caplog):
  """`targets: 1` makes every target a lone EOS (token accuracy then reads 1.0): reported."""
  name = FAMILIES[family] or request.getfixturevalue("file_task")
  reference = untrimmed_lengths(name, "validation")
  limits = {"inputs": int(reference[:, 0].max()), "targets": 1}
  caplog.set_level(logging.WARNING)
  ev = evaluation.load_task_data(name, dataset.DatasetConfig(name, limits, split="validation",
                                                              shuffle=False))
  n = len(reference)
  assert len(ev.examples) == n and ev.truncated_examples == n
  assert ev.truncation.per_feature == {"inputs": 0, "targets": n}
  assert ev.truncation.longest["targets"] == reference[:, 1].max()
  if family != "demo":  # append_eos_after_trim keeps EOS: the lone target token
    assert (ev.features["decoder_target_tokens"] == 1).all()
  assert (f"Evaluation of {name!r} (validation): {n} of {n} examples were longer than "
          "TASK_FEATURE_LENGTHS and were truncated: inputs 0") in caplog.text
  assert (f"targets {n} (longest {reference[:, 1].max()} tokens, limit 1); loss and token "
          "accuracy see the trimmed targets") in caplog.text


def test_a_mixture_counts_truncation_of_its_tasks(data):
  """Mixtures keep only output features; the recorded lengths are passed through."""
  name = "taskless_glue_mnli_and_dev_v200"
  cfg = dataset.DatasetConfig(name, {"inputs": 4, "targets": 8}, batch_size=4, shuffle=False)
  batches = dataset.TrainBatches(cfg, shard_info=seqio.ShardInfo(0, 1))
  next(batches)
  reference = untrimmed_lengths("taskless_glue_mnli_v200", "train", n=4)
  assert (reference[:, 0] > 4).all()
  assert batches.truncation.per_feature["inputs"] == 4
  assert batches.truncation.longest["inputs"] == reference[:, 0].max()


def test_a_task_that_trims_with_seqios_own_preprocessor_is_named(caplog):
  """Its truncation cannot be counted: the warning names the task and the replacement."""
  import tensorflow as tf
  name = "truncation_hidden_probe"

  def source(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": ["a long input"] * 4,
                                               "targets": ["target"] * 4})

  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(source, splits=("train",)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=tasks.demo.OUTPUT_FEATURES)
  try:
    cfg = dataset.DatasetConfig(name, {"inputs": 4, "targets": 8}, batch_size=4, shuffle=False)
    batches = dataset.TrainBatches(cfg, shard_info=seqio.ShardInfo(0, 1))
    next(batches)
  finally:
    seqio.TaskRegistry.remove(name)
  assert batches.truncated_examples == 0  # seqio trimmed them before anything could count
  assert (f"Tasks ['{name}'] trim inputs/targets in their preprocessing with "
          "seqio.preprocessors.append_eos_after_trim, so examples longer than "
          "TASK_FEATURE_LENGTHS cannot be counted; use "
          "prompt_tuning.data.preprocessors.append_eos_after_trim instead") in caplog.text
