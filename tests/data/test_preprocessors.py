"""Preprocessors produce T5's exact text formats and the prompt-tuning variants."""
import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import vocabularies


def run(preprocessor, examples, **kwargs):
  """Applies a dataset-level preprocessor to a list of example dicts; returns numpy dicts."""
  dataset = tf.data.Dataset.from_tensors(examples[0])
  for ex in examples[1:]:
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(ex))
  return list(preprocessor(dataset, **kwargs).as_numpy_iterator())


def test_remove_first_text_token():
  out = run(prep.remove_first_text_token,
            [{"inputs": "sst2 sentence: a fine film", "targets": "positive"}])
  assert out[0]["inputs"] == b"sentence: a fine film"
  assert out[0]["targets"] == b"positive"


def test_glue_format_sst2_and_unknown_label():
  glue = functools.partial(prep.glue, benchmark_name="sst2", label_names=("negative", "positive"))
  out = run(glue, [{"sentence": "a fine film", "label": tf.constant(1, tf.int64), "idx": 5},
                   {"sentence": "test set", "label": tf.constant(-1, tf.int64), "idx": 6}])
  assert out[0] == {"inputs": b"sst2 sentence: a fine film", "targets": b"positive", "idx": 5}
  assert out[1]["targets"] == b"<unk>"


def test_glue_sorts_features_like_t5():
  glue = functools.partial(prep.glue, benchmark_name="mnli",
                           label_names=("entailment", "neutral", "contradiction"))
  out = run(glue, [{"premise": "P.", "hypothesis": "H.", "label": tf.constant(2, tf.int64),
                    "idx": 0}])
  assert out[0]["inputs"] == b"mnli hypothesis: H. premise: P."
  assert out[0]["targets"] == b"contradiction"


def test_glue_multirc_strips_html_and_keeps_ids():
  glue = functools.partial(prep.glue, benchmark_name="multirc", label_names=("False", "True"),
                           feature_names=("question", "answer", "paragraph"))
  out = run(glue, [{"question": "Q?", "answer": "A", "paragraph": "<b>Sent 1: </b>x<br>y",
                    "label": tf.constant(1, tf.int64),
                    "idx": {"paragraph": 1, "question": 2, "answer": 3}}])
  assert out[0]["inputs"] == b"multirc question: Q? answer: A paragraph: Sent 1: x y"
  assert (out[0]["idx/paragraph"], out[0]["idx/question"], out[0]["idx/answer"]) == (1, 2, 3)


def test_stsb_rounds_to_fifths():
  out = run(prep.stsb, [{"sentence1": "a", "sentence2": "b", "label": 3.35, "idx": 0},
                        {"sentence1": "a", "sentence2": "b", "label": 0.0, "idx": 1}])
  assert out[0]["inputs"] == b"stsb sentence1: a sentence2: b"
  assert [o["targets"] for o in out] == [b"3.4", b"0.0"]


def test_record_one_example_per_answer():
  example = {"passage": "Rain today.\n@highlight\nSun tomorrow", "query": "@placeholder wins",
             "entities": ["Rain", "Sun"], "answers": ["Sun", "Rain"],
             "idx": {"passage": 1, "query": 2}}
  out = run(prep.record, [example])
  assert [o["targets"] for o in out] == [b"Sun", b"Rain"]
  assert out[0]["inputs"] == (b"record query: @placeholder wins entities: Rain, Sun passage: "
                              b"Rain today. Sun tomorrow")
  assert list(out[0]["answers"]) == [b"Sun", b"Rain"]
  assert (out[0]["idx/passage"], out[0]["idx/query"]) == (1, 2)
  no_answer = dict(example, answers=tf.constant([], tf.string))
  assert [o["targets"] for o in run(prep.record, [no_answer])] == [b"<unk>"]


def wsc_example(text, index, pronoun, candidate, label):
  return {"text": text, "span1_index": 0, "span1_text": candidate, "span2_index": index,
          "span2_text": pronoun, "label": tf.constant(label, tf.int64), "idx": 0}


def test_wsc_simple_marks_the_pronoun():
  examples = [wsc_example("Mitchell asked Tom if he could lend some money.", 4, "he", "Tom", 1),
              wsc_example("Mitchell asked Tom if he could lend some money.", 4, "he",
                          "Mitchell", 0)]
  out = run(prep.wsc_simple, examples)
  assert out[0]["inputs"] == b"wsc: Mitchell asked Tom if *he* could lend some money."
  assert [o["targets"] for o in out] == [b"Tom", b"Mitchell"]
  assert [o["label"] for o in out] == [1, 0]
  # Training keeps only correct candidates.
  train = run(functools.partial(prep.wsc_simple, correct_referent_only=True), examples)
  assert [o["targets"] for o in train] == [b"Tom"]


def test_wsc_simple_fixes_the_two_known_bad_indices():
  text = next(iter(prep._WSC_TEXT_FIXES))
  out = run(prep.wsc_simple, [wsc_example(text, 3, "him", "John", 1)])
  assert out[0]["inputs"].decode().endswith('"Good for *him* ," he said.')


def test_squad_format_pads_punctuation():
  example = {"id": "q1", "question": "What's up?", "context": "The sky (blue).",
             "answers": {"text": ["The sky", "sky"], "answer_start": [0, 4]}, "title": "t"}
  out = run(prep.squad, [example])[0]
  assert out["inputs"] == b"question: What ' s up ? context: The sky ( blue ) . "
  assert out["targets"] == b"The sky"
  assert list(out["answers"]) == [b"The sky", b"sky"]
  assert out["id"] == b"q1"


def test_mrqa_uses_the_squad_format():
  example = {"qid": "q", "question": "Who?", "context": "Ann.", "answers": ["Ann"]}
  out = run(prep.mrqa, [example])[0]
  assert out["inputs"] == b"question: Who ? context: Ann . "
  assert out["targets"] == b"Ann"


def test_text_to_text_renders_templates():
  pre = functools.partial(prep.text_to_text, inputs_template="review: {text} ({stars} stars)",
                          targets_template="{label}", keep_fields={"gold": "label"})
  out = run(pre, [{"text": "fine", "stars": tf.constant(4), "label": "positive"}])[0]
  assert out == {"inputs": b"review: fine (4 stars)", "targets": b"positive",
                 "gold": b"positive"}


def test_parse_template_rejects_format_specs():
  assert prep.template_fields("q: {question} c: {context}") == ["question", "context"]
  with pytest.raises(ValueError, match="only plain"):
    prep.parse_template("{x:>10}")
  with pytest.raises(ValueError, match="bad placeholder"):
    prep.parse_template("{}")


def test_parse_tsv():
  out = run(functools.partial(prep.parse_tsv, field_names=("a", "b")), [tf.constant("x\ty z")])
  assert out[0] == {"a": b"x", "b": b"y z"}


def test_add_sentinel_to_beginning_byte_vocabulary():
  features = vocabularies.output_features("byt5")
  dataset = tf.data.Dataset.from_tensors({"inputs": tf.constant([10, 11], tf.int32)})
  out = next(prep.add_sentinel_to_beginning(dataset, features, offset=2).as_numpy_iterator())
  np.testing.assert_array_equal(out["inputs"], [259 - 1 - 2, 10, 11])


def test_add_sentinel_to_beginning_is_extra_id(t5_vocab_file):
  features = vocabularies.output_features("t5")
  vocab = features["inputs"].vocabulary
  dataset = tf.data.Dataset.from_tensors({"inputs": tf.constant([10], tf.int32)})
  out = next(prep.add_sentinel_to_beginning(dataset, features, offset=3).as_numpy_iterator())
  assert vocab.decode([int(out["inputs"][0])]) == "<extra_id_3>"
  assert isinstance(vocab, seqio.SentencePieceVocabulary)


def test_append_eos_after_trim_records_the_untrimmed_lengths():
  """Same tokens as seqio's `append_eos_after_trim`, plus each feature's length before the cut
  (with EOS), so truncation stays countable."""
  features = vocabularies.output_features("byt5")
  examples = [{"inputs": tf.constant([5, 6, 7, 8, 9], tf.int32),
               "targets": tf.constant([4], tf.int32)}]
  lengths = {"inputs": 3, "targets": 4}
  ours = run(prep.append_eos_after_trim, examples, output_features=features,
             sequence_length=lengths)
  seqios = run(seqio.preprocessors.append_eos_after_trim, examples, output_features=features,
               sequence_length=lengths)
  assert ours[0]["inputs"].tolist() == seqios[0]["inputs"].tolist() == [5, 6, 1]
  assert ours[0]["targets"].tolist() == seqios[0]["targets"].tolist() == [4, 1]
  assert ours[0][prep.untrimmed_length_key("inputs")] == 6
  assert ours[0][prep.untrimmed_length_key("targets")] == 2
  untrimmed = run(prep.append_eos_after_trim, examples, output_features=features)
  assert untrimmed[0]["inputs"].tolist() == [5, 6, 7, 8, 9, 1]
