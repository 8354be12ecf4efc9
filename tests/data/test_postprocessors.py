"""Postprocessors: label ids, T5's special cases, kept examples and label translation."""
import numpy as np

from prompt_tuning.data import postprocessors as pp


def test_string_label_to_class_id():
  labels = ("negative", "positive")
  assert pp.string_label_to_class_id("positive", labels) == 1
  assert pp.string_label_to_class_id(b"negative", labels) == 0
  assert pp.string_label_to_class_id("great", labels) == -1
  to_id = pp.label_postprocessor(labels)
  assert to_id("positive", example={}, is_target=True) == 1
  assert pp.label_postprocessor(None) is pp.identity


def test_string_to_float():
  assert pp.string_to_float("3.4") == 3.4
  assert pp.string_to_float("three") == -1.0


def test_multirc_record_qa_read_targets_from_the_example():
  example = {"idx/question": np.int32(7), "idx/passage": np.int32(3), "idx/query": np.int32(4),
             "answers": np.array([b"Paris", b"the city of Paris"], dtype=object)}
  assert pp.multirc("True", example=example, is_target=True) == {"value": 1, "group": 7}
  assert pp.multirc("maybe", example=example) == {"value": -1}
  assert pp.record("x", example=example, is_target=True) == {
      "value": ["Paris", "the city of Paris"], "group": (3, 4)}
  assert pp.record("Paris", example=example) == {"value": "Paris"}
  assert pp.qa("ignored", example=example, is_target=True) == ["Paris", "the city of Paris"]
  assert pp.qa("Paris", example=example) == "Paris"


def test_wsc_simple_matches_the_candidate_loosely():
  example = {pp.TARGET_TEXT: b"the fuzzy bunny", "label": np.int64(1)}
  assert pp.wsc_simple("x", example=example, is_target=True) == 1
  assert pp.wsc_simple("The bunny", example=example) == 1  # determiners ignored, subset
  assert pp.wsc_simple("the fuzzy bunny rabbit", example=example) == 1
  assert pp.wsc_simple("the dog", example=example) == 0
  # "Bob" does not name "Bob's hat".
  assert pp.wsc_simple("Bob", example={pp.TARGET_TEXT: b"Bob's hat"}) == 0


def test_translate_labels_qqp_mrpc():
  assert pp.qqp_to_mrpc("duplicate") == "equivalent"
  assert pp.qqp_to_mrpc("not_duplicate") == "not_equivalent"
  assert pp.mrpc_to_qqp("equivalent") == "duplicate"
  assert pp.mrpc_to_qqp(b"not_equivalent") == "not_duplicate"
  assert pp.qqp_to_mrpc("something else") == "something else"
  # Targets are already in the evaluated task's words.
  assert pp.qqp_to_mrpc("duplicate", is_target=True) == "duplicate"
  chain = pp.sequential(pp.qqp_to_mrpc,
                        pp.label_postprocessor(("not_equivalent", "equivalent")))
  assert chain("duplicate", example={}, is_target=False) == 1
  assert chain("not_duplicate", example={}, is_target=False) == 0
  assert chain("equivalent", example={}, is_target=True) == 1


def test_postprocess_with_examples_keeps_text():
  example = {pp.INPUT_TEXT: b"sst2 sentence: fine", pp.TARGET_TEXT: b"positive"}
  to_id = pp.label_postprocessor(("negative", "positive"))
  out = pp.postprocess_with_examples(to_id, "positive", example=example)
  assert out == {pp.PREDICTION: 1, pp.PREDICTION_TEXT: "positive",
                 pp.INPUT_TEXT: "sst2 sentence: fine", pp.TARGET_TEXT: "positive"}
  assert pp.postprocess_with_examples(to_id, "positive", example=example, is_target=True) == 1


def test_sequential_passes_extra_positional_arguments_to_every_function():
  """As the original's `sequential`: positional arguments after the text reach each function."""
  seen = []

  def record_args(text, *args, **kwargs):
    seen.append((text, args, kwargs))
    return text + "!"

  chain = pp.sequential(record_args, pp.identity, record_args)
  assert chain("a", "extra", 3, is_target=False) == "a!!"
  assert seen == [("a", ("extra", 3), {"is_target": False}),
                  ("a!", ("extra", 3), {"is_target": False})]
  # Our own postprocessors accept (and ignore) them, so they chain with such functions.
  chain = pp.sequential(pp.qqp_to_mrpc, pp.label_postprocessor(("not_equivalent", "equivalent")))
  assert chain("duplicate", "extra", example={}, is_target=False) == 1
