"""seqio postprocessors: decoded text -> values the metrics compare.

seqio calls `postprocess_fn(text, example=<numpy example>, is_target=<bool>)` once for each
target and each prediction; string fields of `example` are bytes. Targets usually come from
`example` (all SQuAD answers, MultiRC question ids), predictions from the decoded text.

`postprocess_with_examples` keeps the example's text next to each prediction so the
`_examples` tasks can show inputs, targets and predictions; `translate_labels` maps one task's
label words onto another's for zero-shot transfer (QQP "duplicate" <-> MRPC "equivalent").
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

# Keys of the dicts that `postprocess_with_examples` returns.
PREDICTION = "prediction"
PREDICTION_TEXT = "prediction_pretokenized"
INPUT_TEXT = "inputs_pretokenized"
TARGET_TEXT = "targets_pretokenized"

QQP_TO_MRPC = {"duplicate": "equivalent", "not_duplicate": "not_equivalent"}
MRPC_TO_QQP = {v: k for k, v in QQP_TO_MRPC.items()}


def as_text(value: Any) -> Any:
  """bytes -> str, arrays of bytes -> list of str; anything else unchanged."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype == object:
    return [as_text(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [as_text(v) for v in value]
  return value


def identity(text, *unused_args, **unused_kwargs):
  return text


def string_label_to_class_id(text, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs) -> int:
  """Index of `text` in `label_classes`, or `default` (-1: an invalid prediction)."""
  text = as_text(text)
  return list(label_classes).index(text) if text in label_classes else default


def string_to_float(text, default: float = -1.0, **unused_kwargs) -> float:
  try:
    return float(as_text(text))
  except ValueError:
    return default


def multirc(text, example=None, is_target: bool = False):
  """{"value": 0/1/-1} plus, for targets, the question id that groups answers for exact match."""
  out = {"value": string_label_to_class_id(text, ("False", "True"))}
  if is_target:
    out["group"] = int(example["idx/question"])
  return out


def record(text, example=None, is_target: bool = False):
  """Targets carry every gold answer and the (passage, query) id used to deduplicate."""
  if is_target:
    return {"value": as_text(example["answers"]),
            "group": (int(example["idx/passage"]), int(example["idx/query"]))}
  return {"value": as_text(text)}


def qa(text, example=None, is_target: bool = False):
  """Targets become the list of all gold answers; predictions stay text."""
  if is_target:
    return as_text(example["answers"])
  return as_text(text)


_DETERMINERS = frozenset({
    "a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some", "that",
    "the", "their", "these", "this", "those", "which", "whose", "your"})


def wsc_simple(text, example=None, is_target: bool = False) -> int:
  """1 if the prediction names the example's candidate referent (T5's loose match), else 0.

  The target is the example's label (is the candidate the referent?), so a correct "no" is a
  prediction that names something else.
  """
  if is_target:
    return int(example["label"])

  def clean(s):
    return " ".join(w for w in as_text(s).strip().lower().split(" ") if w not in _DETERMINERS)

  candidate = clean(example[TARGET_TEXT])
  prediction = clean(text)
  # "Bob" must not match "Bob's hat".
  if ("'" in prediction) != ("'" in candidate):
    return 0
  pred_words, cand_words = set(prediction.split(" ")), set(candidate.split(" "))
  # "fuzzy bunny" matches "bunny" and vice versa.
  return int(pred_words.issubset(cand_words) or cand_words.issubset(pred_words))


def translate_labels(text, mapping: Mapping[str, str], example=None, is_target: bool = False,
                     **unused_kwargs):
  """Rewrites a predicted label word through `mapping`; targets and unknown words pass through.

  Used for zero-shot transfer: a prompt trained on QQP predicts "duplicate", which MRPC's
  metrics must read as "equivalent".
  """
  if is_target:
    return text
  text = as_text(text)
  return mapping.get(text.strip(), text)


def qqp_to_mrpc(text, *unused_args, **kwargs):
  return translate_labels(text, QQP_TO_MRPC, **kwargs)


def mrpc_to_qqp(text, *unused_args, **kwargs):
  return translate_labels(text, MRPC_TO_QQP, **kwargs)


def sequential(*fns: Callable) -> Callable:
  """Chains postprocessors; each gets the previous output and the same other arguments.

  Extra positional arguments reach every function too, as in the original's `sequential`
  (seqio passes only keywords, but T5-era postprocessors may be called positionally).
  """

  def run(text, *args, **kwargs):
    for fn in fns:
      text = fn(text, *args, **kwargs)
    return text

  return run


def postprocess_with_examples(postprocess_fn: Callable, text, example=None,
                              is_target: bool = False,
                              example_fields: Sequence[str] = (INPUT_TEXT, TARGET_TEXT),
                              **kwargs):
  """Wraps `postprocess_fn` so each prediction keeps its text and its example's fields.

  Predictions become `{"prediction": <postprocessed>, "prediction_pretokenized": <text>,
  <field>: <example text>...}`; targets are postprocessed as usual, so the metrics in
  `metrics.metric_with_examples` only unwrap predictions.
  """
  value = postprocess_fn(text, example=example, is_target=is_target, **kwargs)
  if is_target:
    return value
  out = {PREDICTION: value, PREDICTION_TEXT: as_text(text)}
  example = example or {}
  for field in example_fields:
    out[field] = as_text(example.get(field))
  return out


def label_postprocessor(label_classes: Optional[Sequence[str]]) -> Callable:
  """Class labels -> `string_label_to_class_id`; no labels -> text unchanged."""
  if not label_classes:
    return identity
  labels = tuple(label_classes)

  def to_class_id(text, *unused_args, **kwargs):
    return string_label_to_class_id(text, labels, **kwargs)

  return to_class_id
