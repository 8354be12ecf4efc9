"""seqio preprocessors: T5's text-to-text formats and the prompt-tuning variants built on them.

Text preprocessors (run before tokenisation) turn raw TFDS examples into `inputs`/`targets`
strings in exactly T5's format, e.g. SST-2 becomes `"sst2 sentence: <text>"` -> `"positive"`.
`remove_first_text_token` then drops the task-name word to give the paper's "taskless" format, and
the token preprocessor `add_sentinel_to_beginning` puts a task-index sentinel first for
multi-task prompts. `text_to_text` renders `{field}` templates for datasets read from files.
"""
from __future__ import annotations

import functools
import string
from typing import Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def _pad_punctuation(text):
  """T5's SQuAD normalisation: spaces around every non-word character, whitespace collapsed."""
  text = tf.strings.regex_replace(text, r"(\W)", r" \1 ")
  return tf.strings.regex_replace(text, r"\s+", " ")


def _string_join(parts):
  return tf.strings.regex_replace(tf.strings.join(parts, separator=" "), r"\s+", " ")


# ========== Prompt-tuning variants ==========
@seqio.map_over_dataset
def remove_first_text_token(x, key: str = "inputs"):
  """Drops the first space-separated word of `x[key]` (T5's task name: "taskless" format)."""
  x = dict(x)
  # Autograph cannot split/slice/join a scalar string cheaply; an anchored regex does the same.
  x[key] = tf.strings.regex_replace(x[key], r"^[^ ]* ", "", replace_global=False)
  return x


def add_sentinel_to_beginning(dataset, output_features, field: str = "inputs", offset: int = 0):
  """Token preprocessor: puts `<extra_id_{offset}>` (id `vocab_size - 1 - offset`) first in `field`.

  Used as a task index for multi-task prompts. ByT5 has no sentinel pieces; like the original
  implementation this then uses the top byte ids, counting down.
  """
  vocab = output_features[field].vocabulary
  # Read the size lazily (it loads the vocabulary), when the dataset is built, not at registration.
  token_id = vocab.vocab_size - 1 - offset

  @seqio.map_over_dataset
  def add(x):
    x = dict(x)
    x[field] = tf.concat([tf.constant([token_id], x[field].dtype), x[field]], axis=0)
    return x

  return add(dataset)


# ========== Trimming that stays visible ==========
def untrimmed_length_key(feature: str) -> str:
  """The feature holding `feature`'s token count before `append_eos_after_trim` (EOS included)."""
  return f"{feature}_untrimmed_length"


def append_eos_after_trim(dataset, output_features, sequence_length=None):
  """seqio's `append_eos_after_trim`, recording each feature's length before the trim.

  Trimming to `sequence_length - 1` and then appending EOS keeps EOS on sequences that are too
  long (right for training), but hides the cut from any count taken later.
  `{feature}_untrimmed_length` (int32, the length the sequence would have with EOS) is what
  `prompt_tuning.data.dataset` counts truncated examples from.
  """

  @seqio.map_over_dataset
  def record(x):
    x = dict(x)
    for key, feature in output_features.items():
      if key in x:
        eos = 1 if feature.add_eos else 0
        x[untrimmed_length_key(key)] = tf.size(x[key], out_type=tf.int32) + eos
    return x

  return seqio.preprocessors.append_eos_after_trim(record(dataset), output_features,
                                                   sequence_length=sequence_length)


# ========== Generic text-to-text ==========
def parse_template(template: str) -> list[tuple[str, Optional[str]]]:
  """Splits `"question: {q} context: {c}"` into (literal, field-or-None) pairs."""
  parts = []
  for literal, field, spec, conversion in string.Formatter().parse(template):
    if spec or conversion:
      raise ValueError(f"template {template!r}: only plain {{field}} placeholders are supported")
    if field is not None and (not field or not field.isidentifier()):
      raise ValueError(f"template {template!r}: bad placeholder {{{field}}}")
    parts.append((literal, field))
  return parts


def template_fields(template: str) -> list[str]:
  return [field for _, field in parse_template(template) if field is not None]


def _render(template: str, x) -> tf.Tensor:
  pieces = []
  for literal, field in parse_template(template):
    if literal:
      pieces.append(tf.constant(literal))
    if field is not None:
      value = x[field]
      pieces.append(value if value.dtype == tf.string else tf.strings.as_string(value))
  if not pieces:
    return tf.constant("")
  return tf.strings.join(pieces)


@seqio.map_over_dataset
def text_to_text(x, inputs_template: str, targets_template: str,
                 keep_fields: Union[Sequence[str], Mapping[str, str]] = ()):
  """Renders `{field}` templates over a dict of fields: the generic JSONL/TSV -> text-to-text step.

  `keep_fields` are passed through (e.g. `answers` for SQuAD metrics); a mapping renames them
  (new name -> field).
  """
  if not isinstance(keep_fields, Mapping):
    keep_fields = {key: key for key in keep_fields}
  out = {new: x[old] for new, old in keep_fields.items()}
  out["inputs"] = _render(inputs_template, x)
  out["targets"] = _render(targets_template, x)
  return out


@seqio.map_over_dataset
def parse_tsv(line, field_names: Sequence[str], field_delim: str = "\t"):
  """Splits one TSV line (from `seqio.TextLineDataSource`) into named string fields."""
  values = tf.io.decode_csv(line, record_defaults=[""] * len(field_names),
                            field_delim=field_delim, use_quote_delim=False)
  return dict(zip(field_names, values))


# ========== T5's GLUE / SuperGLUE formats ==========
@seqio.map_over_dataset
def glue(x, benchmark_name: str, label_names: Sequence[str],
         feature_names: Optional[Sequence[str]] = None, id_key: Optional[str] = "idx"):
  """T5's GLUE format: `"<benchmark> <key1>: <text1> <key2>: <text2>"` -> label name.

  Features are written in `feature_names` order (default: sorted names, as T5 does). A missing
  label (-1, test splits) becomes `"<unk>"`.
  """
  keys = feature_names or sorted(set(x.keys()) - {"label", "idx"})
  parts = [benchmark_name]
  for key in keys:
    parts += [f"{key}:", x[key]]
  inputs = tf.strings.join(parts, separator=" ")
  label = tf.cond(tf.equal(x["label"], -1), lambda: tf.constant("<unk>"),
                  lambda: tf.gather(tf.constant(list(label_names)), x["label"]))
  out = {}
  if benchmark_name == "multirc":
    inputs = tf.strings.regex_replace(inputs, "<br>", " ")
    inputs = tf.strings.regex_replace(inputs, "<(/)?b>", "")
    # MultiRC's exact-match metric groups answers by question, so keep the ids.
    for key in ("paragraph", "question", "answer"):
      out[f"idx/{key}"] = x["idx"][key]
  elif id_key:
    out["idx"] = x[id_key]
  out["inputs"] = inputs
  out["targets"] = label
  return out


@seqio.map_over_dataset
def stsb(x):
  """T5's STS-B format: the score rounded to the nearest 0.2 and written as text ("3.4")."""
  inputs = tf.strings.join(["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]],
                           separator=" ")
  label = tf.as_string(tf.round(tf.cast(x["label"], tf.float32) * 5) / 5, precision=1)
  return {"inputs": inputs, "targets": label, "idx": x["idx"]}


def record(dataset):
  """T5's ReCoRD format: one example per answer (train), all answers kept for the metric.

  `"record query: <query> entities: <e1>, <e2> passage: <passage>"` -> answer text.
  """

  def one_per_answer(x):
    num_answers = tf.size(x["answers"])
    copies = tf.maximum(num_answers, 1)

    def repeat(t):
      return tf.broadcast_to(t, tf.concat([[copies], tf.shape(t)], axis=0))

    out = {k: repeat(v) for k, v in x.items() if k != "idx"}
    out["targets"] = tf.cond(num_answers > 0, lambda: x["answers"], lambda: tf.constant(["<unk>"]))
    out["idx"] = {"passage": repeat(x["idx"]["passage"]), "query": repeat(x["idx"]["query"])}
    return out

  def to_text(x):
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join(
        ["record query:", x["query"], "entities:",
         tf.strings.reduce_join(x["entities"], separator=", "), "passage:", passage],
        separator=" ")
    return {"idx/passage": x["idx"]["passage"], "idx/query": x["idx"]["query"],
            "inputs": inputs, "targets": x["targets"], "answers": x["answers"]}

  dataset = dataset.map(one_per_answer, num_parallel_calls=AUTOTUNE).unbatch()
  return dataset.map(to_text, num_parallel_calls=AUTOTUNE)


# Two WSC texts whose span2_index does not point at the pronoun (T5 special-cases them too):
# text -> (words before the pronoun, words after it).
_WSC_TEXT_FIXES = {
    ("The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
     "out quite loud. \"Good for him,\" he said. "):
        ("The boy continued to whip the pony , and eventually the pony threw him over. John "
         "laughed out quite loud. \"Good for", ",\" he said."),
    ("When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
     "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
     "could they wish for?"):
        ("When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
         "magic pebble in an iron safe . Some day they might want to use",
         ", but really for now, what more could they wish for?"),
}


def wsc_simple(dataset, label: str = "wsc:", correct_referent_only: bool = False):
  """T5's "simple" WSC: `"wsc: ... *he* ..."` -> the candidate referent's text.

  The target is always span1 (the candidate), right or wrong; the label says whether it is the
  referent. Train only on correct referents (`correct_referent_only=True`); evaluation keeps
  all examples and the `wsc_simple` postprocessor compares the prediction with the candidate.
  """

  def to_text(x):
    marked = tf.strings.join(["*", x["span2_text"], "*"])
    words = tf.strings.split(x["text"], sep=" ")
    # Clamp so a malformed index cannot fail the pipeline (real data is in range).
    i = tf.clip_by_value(tf.cast(x["span2_index"], tf.int32), 0,
                         tf.maximum(tf.size(words) - 1, 0))
    text = tf.strings.reduce_join(tf.concat([words[:i], [marked], words[i + 1:]], axis=0),
                                  separator=" ")
    for original, (before, after) in _WSC_TEXT_FIXES.items():
      fixed = tf.strings.join([before, marked, after], separator=" ")
      text = tf.where(tf.equal(x["text"], original), fixed, text)
    return {
        "inputs": tf.strings.join([label, text], separator=" "),
        "targets": tf.reshape(x["span1_text"], []),
        "label": x.get("label", tf.constant(0, tf.int64)),
        "idx": x["idx"],
    }

  if correct_referent_only:
    dataset = dataset.filter(lambda x: tf.cast(x.get("label", False), tf.bool))
  return dataset.map(to_text, num_parallel_calls=AUTOTUNE)


# ========== Question answering ==========
def _qa_example(qid, question, context, answers):
  answers = _pad_punctuation(answers)
  question = _pad_punctuation(question)
  context = _pad_punctuation(context)
  # Some examples (and mock data) have no answer; train on an empty target rather than fail.
  first = tf.cond(tf.size(answers) > 0, lambda: answers[0], lambda: tf.constant(""))
  return {
      "inputs": _string_join(["question:", question, "context:", context]),
      "targets": first,
      "id": qid,
      "question": question,
      "context": context,
      "answers": answers,
  }


@seqio.map_over_dataset
def squad(x):
  """T5's SQuAD format: `"question: <q> context: <c>"` -> first answer; all answers kept."""
  return _qa_example(x["id"], x["question"], x["context"], x["answers"]["text"])


@seqio.map_over_dataset
def mrqa(x):
  """MRQA 2019 examples in T5's SQuAD format (same text as `squad`)."""
  return _qa_example(x["qid"], x["question"], x["context"], x["answers"])


def rekey(key_map: Mapping[str, str]):
  """seqio's rekey with the mapping bound: new name -> old name."""
  return functools.partial(seqio.preprocessors.rekey, key_map=dict(key_map))
