"""Metric functions in seqio's `(targets, predictions) -> {name: value}` form, numpy/scipy only.

Values and names follow T5's metrics (percentages, e.g. `{"accuracy": 95.1}`; the trainer's
token accuracy is a fraction, see docs/metrics.md), so numbers compare directly with T5/T5X runs
and the paper: accuracy, binary F1 with invalid predictions
counted wrong, Matthews correlation, Pearson/Spearman, CB's macro F1, SQuAD EM/F1 (max over gold
answers after SQuAD normalisation), MultiRC F1a/EM and ReCoRD EM/F1.

`metric_with_examples` and `text_examples` read the dict predictions of
`postprocessors.postprocess_with_examples`.
"""
from __future__ import annotations

import collections
import random
import re
import string
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import scipy.stats
import seqio

from prompt_tuning.data import postprocessors as pp

MetricFn = Callable[..., Dict[str, Any]]


# ========== Classification ==========
def accuracy(targets, predictions) -> Dict[str, float]:
  _check_lengths(targets, predictions)
  return {"accuracy": 100 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def sequence_accuracy(targets, predictions) -> Dict[str, float]:
  """Exact string match after stripping whitespace."""
  _check_lengths(targets, predictions)
  hits = [str(t).strip() == str(p).strip() for t, p in zip(targets, predictions)]
  return {"sequence_accuracy": 100 * float(np.mean(hits))}


def _binary_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
  tp = np.sum((predictions == 1) & (targets == 1))
  fp = np.sum((predictions == 1) & (targets != 1))
  fn = np.sum((predictions != 1) & (targets == 1))
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def f1_score_with_invalid(targets, predictions) -> Dict[str, float]:
  """Binary F1 (positive class 1); a prediction other than 0/1 counts as the wrong class."""
  _check_lengths(targets, predictions)
  targets = np.asarray(targets, dtype=np.int64)
  predictions = np.asarray(predictions, dtype=np.int64).copy()
  invalid = (predictions != 0) & (predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {"f1": 100 * _binary_f1(targets, predictions)}


def _confusion(targets, predictions, labels=None):
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  if labels is None:
    labels = np.union1d(targets, predictions)
  index = {label: i for i, label in enumerate(np.asarray(labels).tolist())}
  matrix = np.zeros((len(index), len(index)), dtype=np.int64)
  for t, p in zip(targets.tolist(), predictions.tolist()):
    if t in index and p in index:
      matrix[index[t], index[p]] += 1
  return matrix


def matthews_corrcoef(targets, predictions) -> Dict[str, float]:
  """Matthews correlation x100 (multiclass form, as sklearn: invalid predictions are a class)."""
  _check_lengths(targets, predictions)
  c = _confusion(targets, predictions).astype(np.float64)
  true_k, pred_k = c.sum(axis=1), c.sum(axis=0)
  correct, total = np.trace(c), c.sum()
  cov_yp = correct * total - true_k @ pred_k
  cov_pp = total ** 2 - pred_k @ pred_k
  cov_yy = total ** 2 - true_k @ true_k
  denominator = np.sqrt(cov_pp * cov_yy)
  return {"matthews_corrcoef": 100 * float(cov_yp / denominator) if denominator else 0.0}


def mean_multiclass_f1(num_classes: int) -> MetricFn:
  """Unweighted mean of per-class F1 over classes 0..num_classes-1 (CB's metric)."""

  def mean_f1(targets, predictions) -> Dict[str, float]:
    _check_lengths(targets, predictions)
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    scores = [_binary_f1((targets == k).astype(int), (predictions == k).astype(int))
              for k in range(num_classes)]
    return {f"mean_{num_classes}class_f1": 100 * float(np.mean(scores))}

  return mean_f1


# ========== Regression ==========
def pearson_corrcoef(targets, predictions) -> Dict[str, float]:
  _check_lengths(targets, predictions)
  return {"pearson_corrcoef": 100 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets, predictions) -> Dict[str, float]:
  _check_lengths(targets, predictions)
  return {"spearman_corrcoef": 100 * float(scipy.stats.spearmanr(targets, predictions)[0])}


# ========== Question answering ==========
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
  """The official SQuAD v1.1 normalisation: lower case, no punctuation/articles/extra spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens, prediction_tokens = target.split(), prediction.split()
  common = collections.Counter(target_tokens) & collections.Counter(prediction_tokens)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(prediction_tokens)
  recall = overlap / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> Dict[str, float]:
  """SQuAD exact match and token F1 (x100), each maximised over an example's gold answers."""
  _check_lengths(targets, predictions)
  em, f1 = [], []
  for answers, prediction in zip(targets, predictions):
    answers = [normalize_squad(a) for a in answers]
    prediction = normalize_squad(prediction)
    # An example without gold answers scores 0 rather than crashing the evaluation.
    em.append(max((float(a == prediction) for a in answers), default=0.0))
    f1.append(max((_token_f1(a, prediction) for a in answers), default=0.0))
  return {"em": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}


def all_match(targets, predictions) -> Dict[str, float]:
  return {"exact_match": 100 * float(np.array_equal(targets, predictions))}


def mean_group_metric(metric_fn: MetricFn, group_key: str = "group",
                      value_key: str = "value") -> MetricFn:
  """Averages `metric_fn` over groups of examples (targets carry the group id)."""

  def grouped(targets, predictions) -> Dict[str, float]:
    _check_lengths(targets, predictions)
    groups = collections.defaultdict(lambda: ([], []))
    for t, p in zip(targets, predictions):
      groups[t[group_key]][0].append(t[value_key])
      groups[t[group_key]][1].append(p[value_key])
    scores = collections.defaultdict(list)
    for group_targets, group_predictions in groups.values():
      for name, value in metric_fn(group_targets, group_predictions).items():
        scores[name].append(value)
    return {name: float(np.mean(values)) for name, values in scores.items()}

  return grouped


def deduplicate_metric(metric_fn: MetricFn, group_key: str = "group",
                       value_key: str = "value") -> MetricFn:
  """Scores only the first example of each group (ReCoRD repeats an input once per answer)."""

  def deduplicated(targets, predictions) -> Dict[str, float]:
    _check_lengths(targets, predictions)
    seen, kept_targets, kept_predictions = set(), [], []
    for t, p in zip(targets, predictions):
      if t[group_key] in seen:
        continue
      seen.add(t[group_key])
      kept_targets.append(t[value_key])
      kept_predictions.append(p[value_key])
    return metric_fn(kept_targets, kept_predictions)

  return deduplicated


def multirc_f1_over_all_answers(targets, predictions) -> Dict[str, float]:
  """MultiRC F1a: binary F1 over every answer option."""
  return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets, predictions) -> Dict[str, float]:
  """MultiRC EM: share of questions whose answer options are all labelled right."""
  return mean_group_metric(all_match)(targets, predictions)


record = deduplicate_metric(squad)
record.__doc__ = "ReCoRD EM/F1: SQuAD metrics over one copy of each (passage, query)."


# ========== Keeping examples ==========
def metric_with_examples(metric_fn: MetricFn, targets, predictions,
                         prediction_field: str = pp.PREDICTION) -> Dict[str, Any]:
  """Runs `metric_fn` on predictions that `postprocess_with_examples` wrapped in dicts."""
  return metric_fn(targets, [p[prediction_field] for p in predictions])


def with_examples(metric_fn: MetricFn) -> MetricFn:
  """`metric_with_examples` bound to `metric_fn`, with seqio's (targets, predictions) signature."""

  def wrapped(targets, predictions):
    return metric_with_examples(metric_fn, targets, predictions)

  wrapped.__name__ = getattr(metric_fn, "__name__", "metric") + "_with_examples"
  return wrapped


def format_classification(examples: Sequence[Mapping[str, Any]]) -> str:
  return "\n\n".join(
      f"input: {ex.get(pp.INPUT_TEXT)}\n\ntarget: {ex.get(pp.TARGET_TEXT)}\n\n"
      f"prediction: {ex.get(pp.PREDICTION_TEXT)}" for ex in examples)


def text_examples(targets, predictions, task_name: str, num_examples: int = 8,
                  seed: Optional[int] = 0,
                  format_fn: Callable[[Sequence[Mapping[str, Any]]], str] = format_classification,
                  ) -> Dict[str, seqio.metrics.Text]:
  """A sample of predictions, and of wrong ones, as text summaries (e.g. for TensorBoard).

  `num_examples=-1` shows every example (as in the original). "Wrong" compares the
  postprocessed prediction with the target, so for tasks whose target is a list (SQuAD) every
  example counts as wrong.
  """
  _check_lengths(targets, predictions)
  if not isinstance(num_examples, int) or num_examples < -1:
    raise ValueError(f"num_examples must be a count >= 0, or -1 for all, got {num_examples!r}")
  rng = random.Random(seed)

  def sample(items):
    items = list(items)
    if num_examples == -1 or len(items) <= num_examples:
      return items
    return rng.sample(items, num_examples)

  wrong = [p for p, t in zip(predictions, targets) if p[pp.PREDICTION] != t]
  return {
      f"{task_name} samples": seqio.metrics.Text(textdata=format_fn(sample(predictions))),
      f"{task_name} wrong samples": seqio.metrics.Text(textdata=format_fn(sample(wrong))),
  }


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


# Metric names a file task (see `file_tasks`) may ask for.
METRICS_BY_NAME: Mapping[str, MetricFn] = {
    "accuracy": accuracy,
    "sequence_accuracy": sequence_accuracy,
    "f1": f1_score_with_invalid,
    "mcc": matthews_corrcoef,
    "pearson": pearson_corrcoef,
    "spearman": spearman_corrcoef,
    "squad": squad,
}
