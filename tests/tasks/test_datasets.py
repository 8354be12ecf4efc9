"""Every task's data pipeline yields tokenised examples under `tfds.testing.mock_data`.

Running 537 pipelines would take minutes, so `test_every_task_pipeline` runs each distinct
pipeline once (a dataset in one format: 91) and checks that the other tasks (other vocabulary,
`_examples`) are that same pipeline; `test_representative_tasks` runs a sample in every
vocabulary. Set PROMPT_TUNING_TEST_ALL_TASKS=1 to run literally every task (slow).
"""
import functools
import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks.all
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import registry
from prompt_tuning.data import vocabularies
import tasks.glue as glue
import tasks.super_glue as super_glue

EOS = 1
VOCAB_ROTATION = ("t5", "mt5", "byt5")


@pytest.fixture(scope="module")
def mock_data():
  with tfds.testing.mock_data(num_examples=2):
    yield


@pytest.fixture
def data(mock_data, t5_vocab_file):
  """Mock TFDS data and the local T5 vocabulary (stands in for mT5's too)."""
  del mock_data, t5_vocab_file


def first_examples(name, split=None, num=1):
  provider = seqio.get_mixture_or_task(name)
  if split is None:
    split = "validation" if "validation" in provider.splits else list(provider.splits)[0]
  dataset = provider.get_dataset(None, split=split, shuffle=False, use_cached=False,
                                 try_in_mem_cache=False)
  return list(dataset.take(num).as_numpy_iterator())


def check_tokenised(name, example):
  for key in ("inputs", "targets"):
    ids = example[key]
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) >= 2, (name, key, ids)
    assert ids[-1] == EOS and EOS not in ids[:-1].tolist(), (name, key, ids)
    assert isinstance(example[f"{key}_pretokenized"], bytes), (name, key)


def parse_name(name):
  """Task name -> (stem, format, examples, vocabulary); round-trips through variant_name."""
  vocab = next((v for v, s in vocabularies.VOCAB_SUFFIXES.items() if s and name.endswith(s)),
               "t5")
  rest = name[:len(name) - len(vocabularies.VOCAB_SUFFIXES[vocab])]
  examples = rest.endswith(registry.EXAMPLES_SUFFIX)
  rest = rest[:-len(registry.EXAMPLES_SUFFIX)] if examples else rest
  fmt = next((f for f, p in registry.FORMAT_PREFIXES.items() if p and rest.startswith(p)),
             "plain")
  stem = rest[len(registry.FORMAT_PREFIXES[fmt]):]
  assert registry.variant_name(stem, fmt, examples, vocab) == name
  return stem, fmt, examples, vocab


def describe_pipeline(task):
  """The parts of a task that decide its data; vocabulary aside."""
  steps = []
  for step in task.preprocessors:
    if isinstance(step, functools.partial):
      steps.append((step.func, step.args, step.keywords))
    elif isinstance(step, seqio.CacheDatasetPlaceholder):
      steps.append(seqio.CacheDatasetPlaceholder)
    else:
      steps.append(step)
  return task.source, steps


def task_word_and_index(stem):
  """The task-name word that the taskless format drops, and the task-index sentinel offset."""
  if stem == super_glue.DPR:  # DPR is written as WSC
    return "wsc:", super_glue.TASK_INDEX["wsc"]
  if stem.startswith("super_glue_"):
    name = stem.split("_")[2]
    word = "wsc:" if name == "wsc" else super_glue.BENCHMARK.get(name, name)
    return word, super_glue.TASK_INDEX[name]
  if stem.startswith("glue_"):
    name = stem[len("glue_"):].split(f"_{glue.VERSION}")[0].split("_from_")[0]
    return glue.BENCHMARK.get(name, name), glue.TASK_INDEX[name]
  return None, None  # QA: no task-name word


def test_every_task_pipeline(data):
  names = sorted(tasks.all.TASK_NAMES)
  groups = {}
  for name in names:
    stem, fmt, _, _ = parse_name(name)
    groups.setdefault(stem, {}).setdefault(fmt, []).append(name)

  checked = 0
  for i, (stem, formats) in enumerate(sorted(groups.items())):
    vocab = VOCAB_ROTATION[i % len(VOCAB_ROTATION)]
    first = {}
    for fmt, members in formats.items():
      rep = registry.variant_name(stem, fmt, False, vocab)
      rep_task = seqio.get_mixture_or_task(rep)
      (example,) = first_examples(rep)
      check_tokenised(rep, example)
      first[fmt] = example
      for member in members:
        assert describe_pipeline(seqio.get_mixture_or_task(member)) == (
            describe_pipeline(rep_task)), (member, rep)
        checked += 1

    word, index = task_word_and_index(stem)
    if set(first) == {"plain"}:
      assert word is None, stem
      continue
    # The taskless format is the plain one minus the task-name word, in text and in tokens.
    plain, taskless = first["plain"], first["taskless"]
    assert plain["inputs_pretokenized"] == (
        f"{word} ".encode() + taskless["inputs_pretokenized"]), stem
    vocabulary = vocabularies.VOCABULARIES[vocab]()
    word_ids = vocabulary.encode(word + " " if vocab == "byt5" else word)
    assert plain["inputs"].tolist() == word_ids + taskless["inputs"].tolist(), stem
    np.testing.assert_array_equal(plain["targets"], taskless["targets"])
    # task_index: one sentinel, then the taskless tokens.
    sentinel = vocabulary.vocab_size - 1 - index
    assert first["task_index"]["inputs"].tolist() == [sentinel] + taskless["inputs"].tolist()
  assert checked == len(names) == 537


@pytest.mark.parametrize("name", [
    "glue_cola_v200", "taskless_glue_stsb_v200_examples_mt5", "task_index_glue_mnli_v200_byt5",
    "glue_mnli_mismatched_v200_byt5", "taskless_super_glue_multirc_v102_examples",
    "task_index_super_glue_record_v102_mt5", "super_glue_axb_v102_byt5",
    "taskless_super_glue_wsc_v102_simple_train_mt5", "super_glue_wsc_v102_simple_eval_examples",
    "taskless_glue_mrpc_from_qqp_v200_byt5", "squad_v010_allanswers_examples_mt5",
    "mrqa_duorc_v100_byt5",
])
def test_representative_tasks(data, name):
  examples = first_examples(name, num=2)
  assert examples, name
  for example in examples:
    check_tokenised(name, example)
  if name.endswith("_byt5"):
    # Bytes round-trip exactly: ids are the UTF-8 bytes shifted by the 3 special ids.
    text = examples[0]["inputs_pretokenized"]
    ids = examples[0]["inputs"].tolist()[:-1]
    if "task_index" in name:
      ids = ids[1:]
    assert ids == [b + 3 for b in text]


def test_dpr_in_t5s_simple_format(data):
  """T5's `dpr_v001_simple`: `"wsc: ... *pronoun* ..."` -> the right candidate's text, from TFDS
  `definite_pronoun_resolution` (train and test); scored by exact-match accuracy."""
  import tensorflow as tf
  raw = tf.data.Dataset.from_tensors({
      "sentence": "Bob asked Tom if he can lend some money, he said.", "pronoun": "he",
      "candidates": ["Bob", "Tom"], "label": 1})
  (example,) = list(super_glue.dpr_simple(raw).as_numpy_iterator())
  assert example == {"inputs": b"wsc: Bob asked Tom if *he* can lend some money, he said.",
                     "targets": b"Tom"}

  task = seqio.get_mixture_or_task("dpr_v001_simple")
  assert task.source.tfds_dataset.name == "definite_pronoun_resolution:1.1.0"
  assert set(task.splits) == {"train", "test"}
  for split in ("train", "test"):
    (example,) = first_examples(task.name, split)
    check_tokenised(task.name, example)
    assert example["inputs_pretokenized"].startswith(b"wsc: ")
  target = example["targets_pretokenized"].decode()
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn([target, target], [target, target + " not"]))
  assert scores == {"accuracy": 50.0}
  wrapped = seqio.get_mixture_or_task("taskless_dpr_v001_simple_examples")
  out = wrapped.postprocess_fn(target, example=example, is_target=False)
  assert out[pp.PREDICTION] == target
  # T5's WSC + DPR mixture trains on DPR and WSC's correct referents.
  mixture = seqio.get_mixture_or_task("taskless_wsc_dpr_simple_proportional")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "taskless_dpr_v001_simple": 1322.0, "taskless_super_glue_wsc_v102_simple_train": 259.0,
      "taskless_super_glue_wsc_v102_simple_eval": 0.0}
  with_dpr = seqio.get_mixture_or_task("super_glue_with_dpr_v102_proportional")
  assert {t.name for t in with_dpr.tasks} == (
      {t.name for t in seqio.get_mixture_or_task("super_glue_v102_proportional").tasks}
      | {"dpr_v001_simple"})
  # The original's name for the task-index mixture with DPR: same tasks, same rates.
  ours = seqio.get_mixture_or_task("task_index_super_glue_with_dpr_v102_proportional_examples")
  original = seqio.get_mixture_or_task("task_index_super_glue_with_dpr_v102_examples_proportional")
  assert [(t.name, original.get_rate(t)) for t in original.tasks] == [
      (t.name, ours.get_rate(t)) for t in ours.tasks]
  assert ("task_index_dpr_v001_simple_examples", 1322.0) in [
      (t.name, ours.get_rate(t)) for t in ours.tasks]


def test_glue_splits(data):
  assert list(seqio.get_mixture_or_task("glue_ax_v200").splits) == ["test"]
  mnli = seqio.get_mixture_or_task("glue_mnli_v200")
  assert "validation_matched" in mnli.splits
  (example,) = first_examples("glue_mnli_v200", "validation_mismatched")
  check_tokenised("glue_mnli_v200", example)
  (example,) = first_examples("glue_ax_v200", "test")
  assert example["inputs_pretokenized"].startswith(b"mnli hypothesis: ")


def test_mrqa_out_of_domain_validation_is_the_tfds_test_split(data):
  task = seqio.get_mixture_or_task("mrqa_bioasq_v100")
  assert set(task.splits) == {"validation", "test"}
  # seqio keeps the split mapping in its (private) TFDS loader.
  assert task.source.tfds_dataset._map_split("validation") == "test"
  assert "train" in seqio.get_mixture_or_task("mrqa_newsqa_v100").splits


def test_every_mixture_resolves():
  for name in tasks.all.MIXTURE_NAMES:
    mixture = seqio.get_mixture_or_task(name)
    assert mixture.tasks, name
    suffix = parse_name(name)[3]
    for task in mixture.tasks:
      assert parse_name(task.name)[3] == suffix, (name, task.name)


@pytest.mark.parametrize("name, first_words", [
    ("taskless_glue_mnli_and_dev_v200", b"hypothesis:"),
    ("glue_mrpc_from_qqp_zeroshot_v200_examples", b"qqp question1:"),
    ("task_index_super_glue_wsc_and_dev_v102_simple_byt5", None),
    ("wsc_dpr_simple_proportional_mt5", b"wsc: "),
    ("squad_to_mrqa_mt5", b"question:"),
])
def test_mixtures_train_on_their_training_task(data, name, first_words):
  mixture = seqio.get_mixture_or_task(name)
  dataset = mixture.get_dataset(None, split="train", shuffle=False, use_cached=False,
                                try_in_mem_cache=False, copy_pretokenized=True, num_epochs=1)
  (example,) = list(dataset.take(1).as_numpy_iterator())
  check_tokenised(name, example)
  if first_words is not None:
    assert example["inputs_pretokenized"].startswith(first_words)


def test_zero_shot_transfer_translates_predictions(data):
  task = seqio.get_mixture_or_task("glue_mrpc_from_qqp_v200")
  assert list(task.splits) == ["validation"]
  (example,) = first_examples(task.name)
  assert example["inputs_pretokenized"].startswith(b"mrpc sentence1: ")
  assert example["targets_pretokenized"] in (b"equivalent", b"not_equivalent")
  target = task.postprocess_fn(example["targets_pretokenized"].decode(), example=example,
                               is_target=True)
  # A QQP-trained prompt answers in QQP's words; MRPC's metrics see MRPC class ids.
  predictions = [task.postprocess_fn(p, example=example, is_target=False)
                 for p in ("duplicate", "not_duplicate", "equivalent", "maybe")]
  assert predictions == [1, 0, 1, -1]
  right = "duplicate" if target == 1 else "not_duplicate"
  prediction = task.postprocess_fn(right, example=example, is_target=False)
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn([target], [prediction]))
  assert scores["accuracy"] == 100.0 and set(scores) == {"accuracy", "f1"}
  reverse = seqio.get_mixture_or_task("glue_qqp_from_mrpc_v200_examples")
  wrapped = reverse.postprocess_fn("equivalent", example=example, is_target=False)
  assert wrapped[pp.PREDICTION] == 1 and wrapped[pp.PREDICTION_TEXT] == "equivalent"


@pytest.mark.skipif(not os.environ.get("PROMPT_TUNING_TEST_ALL_TASKS"),
                    reason="slow: set PROMPT_TUNING_TEST_ALL_TASKS=1 to run every task")
def test_literally_every_task(data):
  for name in sorted(tasks.all.TASK_NAMES):
    (example,) = first_examples(name)
    check_tokenised(name, example)


def test_seqio_evaluator_scores_qqp_answers_on_mrpc(data, monkeypatch):
  """End to end through seqio's Evaluator: a QQP-trained model that answers every MRPC example
  correctly, in QQP's words, scores 100."""
  # Mock data has no split sizes; the Evaluator asks for them to decide on in-memory caching.
  monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
  name = "taskless_glue_mrpc_from_qqp_v200_examples"
  evaluator = seqio.Evaluator(name, seqio.EncDecFeatureConverter(pack=False),
                              sequence_length={"inputs": 128, "targets": 8},
                              use_memory_cache=False)
  vocab = vocabularies.t5_vocabulary()

  def predict_fn(dataset):
    outputs = []
    for index, example in dataset.as_numpy_iterator():
      target = vocab.decode(example["decoder_target_tokens"].tolist())
      outputs.append((index, vocab.encode(pp.MRPC_TO_QQP[target])))
    return outputs

  results, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  scores = results.result()[name]
  assert scores["accuracy"] == 100.0 and scores["f1"] in (0.0, 100.0)
  assert "prediction: " in scores["mrpc samples"].textdata
