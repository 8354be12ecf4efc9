"""Metrics give hand-computed values (T5's names, percentages) on small known inputs."""
import math

import pytest
import seqio

from prompt_tuning.data import metrics
from prompt_tuning.data import postprocessors as pp


def test_accuracy():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
  assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}


def test_accuracy_rejects_length_mismatch():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.accuracy([0, 1], [0])


def test_f1_counts_invalid_predictions_as_wrong():
  # The -1 (unparseable label) on a positive becomes a false negative: tp=1, fp=1, fn=1.
  assert metrics.f1_score_with_invalid([0, 1, 1, 0], [0, 1, -1, 1]) == {"f1": 50.0}
  # On a negative it becomes a false positive: tp=1, fp=1, fn=0 -> 2/3.
  assert metrics.f1_score_with_invalid([1, 0], [1, -1])["f1"] == pytest.approx(200 / 3)
  assert metrics.f1_score_with_invalid([0, 0], [0, 0]) == {"f1": 0.0}


def test_matthews_corrcoef_binary_and_multiclass():
  # tp=2, tn=2, fp=1, fn=1: (4 - 1) / sqrt(3^4) = 1/3.
  value = metrics.matthews_corrcoef([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1])
  assert value["matthews_corrcoef"] == pytest.approx(100 / 3)
  # sklearn's documented example: -0.33.
  assert metrics.matthews_corrcoef([1, 1, 1, -1], [1, -1, 1, 1])["matthews_corrcoef"] == (
      pytest.approx(-100 / 3))
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 0, 1])["matthews_corrcoef"] == pytest.approx(100)
  # Constant predictions have no correlation (0, not NaN).
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1]) == {"matthews_corrcoef": 0.0}
  # An invalid prediction (-1) is a class of its own, as with sklearn on T5's outputs. Over
  # labels (-1, 0, 1): true counts (0, 1, 3), predicted (1, 1, 2), 3 of 4 right:
  # (3*4 - 7) / sqrt((16 - 6) * (16 - 10)) = 5 / sqrt(60).
  value = metrics.matthews_corrcoef([0, 1, 1, 1], [0, 1, -1, 1])["matthews_corrcoef"]
  assert value == pytest.approx(100 * 5 / math.sqrt(60))


def test_pearson_and_spearman():
  assert metrics.pearson_corrcoef([1, 2, 3, 4], [2, 4, 6, 8])["pearson_corrcoef"] == (
      pytest.approx(100))
  assert metrics.pearson_corrcoef([1, 2, 3, 4], [1, 3, 2, 4])["pearson_corrcoef"] == (
      pytest.approx(80))
  assert metrics.spearman_corrcoef([1, 2, 3, 4], [1, 3, 2, 4])["spearman_corrcoef"] == (
      pytest.approx(80))
  assert metrics.spearman_corrcoef([1, 2, 3], [1, 4, 9])["spearman_corrcoef"] == pytest.approx(100)


def test_mean_multiclass_f1():
  # Class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2: never seen -> 0.
  value = metrics.mean_multiclass_f1(3)([0, 0, 1], [0, 1, 1])
  assert value == {"mean_3class_f1": pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)}


def test_normalize_squad():
  assert metrics.normalize_squad("The  Cat's, hat!") == "cats hat"
  assert metrics.normalize_squad("an apple a day") == "apple day"


def test_squad_em_and_f1_take_the_best_gold_answer():
  value = metrics.squad([["The cat", "a dog"], ["Barack Obama"]], ["cat", "Obama"])
  # Example 1 matches "The cat" exactly; example 2: precision 1, recall 1/2 -> F1 2/3.
  assert value["em"] == pytest.approx(50.0)
  assert value["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
  assert metrics.squad([[]], ["x"]) == {"em": 0.0, "f1": 0.0}


def test_multirc_f1a_and_exact_match():
  targets = [{"value": 1, "group": 0}, {"value": 0, "group": 0}, {"value": 1, "group": 1}]
  predictions = [{"value": 1}, {"value": 0}, {"value": 0}]
  # F1a over all answers: tp=1, fn=1 -> 2/3. EM: question 0 all right, question 1 wrong.
  assert metrics.multirc_f1_over_all_answers(targets, predictions)["f1"] == pytest.approx(200 / 3)
  assert metrics.multirc_exact_match(targets, predictions) == {"exact_match": 50.0}


def test_record_scores_each_query_once():
  targets = [{"value": ["a b", "c"], "group": (0, 0)}, {"value": ["a b", "c"], "group": (0, 0)},
             {"value": ["d e"], "group": (0, 1)}]
  predictions = [{"value": "c"}, {"value": "wrong"}, {"value": "d"}]
  value = metrics.record(targets, predictions)
  # The second copy of query (0, 0) is ignored; query (0, 1): F1 2/3.
  assert value["em"] == pytest.approx(50.0)
  assert value["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_metrics_with_examples_unwrap_predictions():
  wrapped = [pp.postprocess_with_examples(pp.identity, p, example={}) for p in ("a", "b")]
  assert metrics.with_examples(metrics.accuracy)(["a", "c"], wrapped) == {"accuracy": 50.0}
  texts = metrics.text_examples(["a", "c"], wrapped, task_name="toy", num_examples=1)
  assert set(texts) == {"toy samples", "toy wrong samples"}
  assert all(isinstance(v, seqio.metrics.Text) for v in texts.values())
  assert "prediction: b" in texts["toy wrong samples"].textdata


def test_text_examples_minus_one_shows_every_example():
  """`num_examples=-1` means all examples (the original's convention), not a sample of -1."""
  wrapped = [pp.postprocess_with_examples(pp.identity, p, example={}) for p in "abcdefghij"]
  texts = metrics.text_examples(list("abcdefghiz"), wrapped, task_name="toy", num_examples=-1)
  samples = texts["toy samples"].textdata
  assert [f"prediction: {p}" in samples for p in "abcdefghij"] == [True] * 10
  assert texts["toy wrong samples"].textdata.count("prediction:") == 1
  assert metrics.text_examples(list("abcdefghij"), wrapped, task_name="toy",
                               num_examples=3)["toy samples"].textdata.count("prediction:") == 3
  with pytest.raises(ValueError, match="-1 for all"):
    metrics.text_examples(["a"], wrapped[:1], task_name="toy", num_examples=-2)


def test_metric_signatures_are_accepted_by_seqio():
  """seqio sorts metric functions by their positional arguments; all must be predict metrics."""
  import functools
  import inspect
  fns = [metrics.accuracy, metrics.squad, metrics.record, metrics.mean_multiclass_f1(3),
         metrics.with_examples(metrics.squad),
         functools.partial(metrics.text_examples, task_name="x")]
  for fn in fns:
    positional = [k for k, p in inspect.signature(fn).parameters.items()
                  if p.default is inspect.Parameter.empty
                  and p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["targets", "predictions"], fn


def test_task_metrics_are_percentages():
  """docs/metrics.md: every task metric is 0-100 (T5's scale), the bundled demo's too; a perfect
  prediction scores 100, not 1."""
  import tasks.demo
  labels = [0, 1, 1, 0]
  perfect = {
      "accuracy": (labels, labels), "sequence_accuracy": (["a", "b"], ["a", "b"]),
      "f1": (labels, labels), "mcc": (labels, labels),
      "pearson": ([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]), "spearman": ([1, 2, 3], [1, 2, 3]),
      "squad": ([["x"], ["b c"]], ["x", "b c"]),
  }
  assert set(perfect) == set(metrics.METRICS_BY_NAME)
  for name, (targets, predictions) in perfect.items():
    values = metrics.METRICS_BY_NAME[name](targets, predictions)
    assert all(v == pytest.approx(100.0) for v in values.values()), (name, values)
  assert metrics.mean_multiclass_f1(3)([0, 1, 2], [0, 1, 2]) == {"mean_3class_f1": 100.0}
  assert tasks.demo.exact_match(["x", "y"], ["x", "z"]) == {"exact_match": 50.0}
