"""SuperGLUE in T5's text-to-text format (TFDS `super_glue/*:1.0.2`), in every variant.

Tasks: `{,taskless_,task_index_}super_glue_{name}_v102{,_examples}{,_mt5,_byt5}` for name in
boolq, cb, copa, multirc, record, rte, wic, axb, axg, and T5's "simple" WSC as two tasks:
`..super_glue_wsc_v102_simple_train..` (train split, correct referents only) and
`..super_glue_wsc_v102_simple_eval..` (validation/test, every candidate).

DPR, the Definite Pronoun Resolution dataset (TFDS `definite_pronoun_resolution:1.1.0`, splits
train and test), in T5's `dpr_v001_simple` format: WSC's text (`"wsc: ... *he* ..."` -> the
referent), so training on it helps WSC. Tasks `{,taskless_,task_index_}dpr_v001_simple..` (WSC's
task index, as the original), scored by exact-match `accuracy`.

Mixtures: `..super_glue_wsc_and_dev_v102_simple..` (WSC train + eval),
`..wsc_dpr_simple_proportional..` (T5's: DPR + WSC train + WSC eval),
`..super_glue_v102_proportional..` (all tasks weighted by training-set size; without DPR, as the
original's `task_index_super_glue_v102_examples_proportional`) and
`..super_glue_with_dpr_v102_proportional..` (with DPR, as the original's `..._with_dpr_...` and
T5's own `super_glue_v102_proportional`). The original's names
`task_index_super_glue{,_with_dpr}_v102_examples_proportional` are registered too.

The paper initialises ReCoRD and WSC prompts, whose answers are free text, from words about the
task rather than from labels; `class_labels` returns those words.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import tensorflow as tf

from prompt_tuning.data import metrics
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import registry
import seqio

VERSION = "v102"
TFDS_VERSION = "1.0.2"

LABELS = {
    "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"),
    # Free-text answers: the paper's task words (Lester et al. 2021, section 3.2 footnote).
    "record": ("commonsense", "reasoning", "reading", "comprehension"),
    "rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"),
    "wsc": ("commonsense", "pronoun", "resolution"),
    "axb": ("entailment", "not_entailment"),
    "axg": ("entailment", "not_entailment"),
}

# Text features in the order T5 writes them; None: sorted names.
FEATURES = {
    "boolq": ("passage", "question"),
    "cb": ("hypothesis", "premise"),
    "copa": ("choice1", "choice2", "premise", "question"),
    "multirc": ("question", "answer", "paragraph"),
    "rte": ("hypothesis", "premise"),
    # T5 leaves out the word's start/end offsets.
    "wic": ("sentence1", "sentence2", "word"),
    "axb": ("hypothesis", "premise"),
    "axg": ("hypothesis", "premise"),
}

# The diagnostics are RTE to the model; WSC's TFDS config is `wsc.fixed`.
BENCHMARK = {"axb": "rte", "axg": "rte"}
TASK_INDEX = registry.task_index_mapping(tuple(LABELS), BENCHMARK)

METRICS = {
    "boolq": [metrics.accuracy],
    "cb": [metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy],
    "copa": [metrics.accuracy],
    "multirc": [metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match],
    "record": [metrics.record],
    "rte": [metrics.accuracy],
    "wic": [metrics.accuracy],
    "axb": [],  # test split only
    "axg": [],
}

TRAIN_SIZES = {
    "super_glue_wsc_v102_simple_train": 259.,
    "super_glue_wsc_v102_simple_eval": 0.,
    "super_glue_boolq_v102": 9_427.,
    "super_glue_cb_v102": 250.,
    "super_glue_copa_v102": 400.,
    "super_glue_multirc_v102": 27_243.,
    "super_glue_record_v102": 138_854.,
    "super_glue_rte_v102": 2_490.,
    "super_glue_wic_v102": 5_428.,
    "super_glue_axb_v102": 0.,
    "super_glue_axg_v102": 0.,
}

WSC_TRAIN = f"super_glue_wsc_{VERSION}_simple_train"
WSC_EVAL = f"super_glue_wsc_{VERSION}_simple_eval"
DPR = "dpr_v001_simple"
DPR_TFDS = "definite_pronoun_resolution:1.1.0"
DPR_TRAIN_SIZE = 1_322.  # T5's weight for DPR in its SuperGLUE mixture
ORIGINAL_MIXTURE_NAMES = {
    f"task_index_super_glue_{VERSION}_examples_proportional":
        f"task_index_super_glue_{VERSION}_proportional_examples",
    f"task_index_super_glue_with_dpr_{VERSION}_examples_proportional":
        f"task_index_super_glue_with_dpr_{VERSION}_proportional_examples",
}


def stem(name: str) -> str:
  return f"super_glue_{name}_{VERSION}"


def source(config: str, splits) -> seqio.TfdsDataSource:
  return seqio.TfdsDataSource(tfds_name=f"super_glue/{config}:{TFDS_VERSION}", splits=splits)


def text_preprocessors(name: str):
  if name == "record":
    return [prep.record]
  steps = []
  if name == "axb":
    # AX-b calls its sentences sentence1/sentence2; RTE's names make it read as RTE.
    steps.append(prep.rekey({"premise": "sentence1", "hypothesis": "sentence2", "label": "label",
                             "idx": "idx"}))
  steps.append(functools.partial(prep.glue, benchmark_name=BENCHMARK.get(name, name),
                                 label_names=LABELS[name], feature_names=FEATURES[name]))
  return steps


def postprocess_fn(name: str):
  if name == "multirc":
    return pp.multirc
  if name == "record":
    return pp.record
  return pp.label_postprocessor(LABELS[name])


@seqio.map_over_dataset
def dpr_simple(x, label: str = "wsc:"):
  """T5's `dpr_v001_simple` text: `"wsc: Bob asked Tom if *he* ..."` -> the right candidate.

  Only the first occurrence of the pronoun as a word (after a space, before a space, `.` or `,`)
  is marked, as T5 does; the pronoun is matched literally (RE2 `\\Q...\\E`).
  """
  marked = tf.strings.regex_replace(
      x["sentence"], tf.strings.join([r" (\Q", x["pronoun"], r"\E)( |\.|,)"]), r" *\1*\2",
      replace_global=False)
  return {"inputs": tf.strings.join([label, marked], separator=" "),
          "targets": tf.gather(x["candidates"], tf.cast(x["label"], tf.int32))}


def register() -> Tuple[List[str], List[str]]:
  """Registers this module's tasks and mixtures; returns their names."""
  task_names, mixture_names = [], []
  for name in LABELS:
    registry.register_class_labels(f"super_glue_{name}", LABELS[name])
    if name == "wsc":
      continue
    splits = ("test",) if name in ("axb", "axg") else ("train", "validation", "test")
    task_names += registry.register_variants(registry.TaskSpec(
        stem=stem(name),
        source=source(name, splits),
        text_preprocessors=text_preprocessors(name),
        postprocess_fn=postprocess_fn(name),
        metric_fns=METRICS[name],
        task_index=TASK_INDEX[name],
        class_labels=LABELS[name],
        display_name=name,
    ))

  # T5's "simple" WSC: generate the referent. Train only on correct candidates; evaluate all
  # candidates, scoring whether the prediction names the candidate iff it is the referent.
  task_names += registry.register_variants(registry.TaskSpec(
      stem=WSC_TRAIN,
      source=source("wsc.fixed", ("train",)),
      text_preprocessors=[functools.partial(prep.wsc_simple, correct_referent_only=True)],
      task_index=TASK_INDEX["wsc"],
      class_labels=LABELS["wsc"],
      display_name="wsc",
  ), examples=(False,))
  task_names += registry.register_variants(registry.TaskSpec(
      stem=WSC_EVAL,
      source=source("wsc.fixed", ("validation", "test")),
      text_preprocessors=[functools.partial(prep.wsc_simple, correct_referent_only=False)],
      postprocess_fn=pp.wsc_simple,
      metric_fns=[metrics.accuracy],
      task_index=TASK_INDEX["wsc"],
      class_labels=LABELS["wsc"],
      display_name="wsc",
  ))

  # DPR in WSC's format; predictions are compared with the referent's text as they are.
  registry.register_class_labels("dpr", LABELS["wsc"])
  task_names += registry.register_variants(registry.TaskSpec(
      stem=DPR,
      source=seqio.TfdsDataSource(tfds_name=DPR_TFDS, splits=("train", "test")),
      text_preprocessors=[dpr_simple],
      metric_fns=[metrics.accuracy],
      task_index=TASK_INDEX["wsc"],
      class_labels=LABELS["wsc"],
      display_name="dpr",
  ))

  only_eval_shows_examples = lambda task_stem: task_stem != WSC_TRAIN  # noqa: E731
  mixture_names += registry.register_mixture_variants(
      f"super_glue_wsc_and_dev_{VERSION}_simple", [WSC_TRAIN, WSC_EVAL],
      class_labels=LABELS["wsc"], examples_tasks=only_eval_shows_examples)
  mixture_names += registry.register_mixture_variants(
      "wsc_dpr_simple_proportional",
      [(DPR, DPR_TRAIN_SIZE), (WSC_TRAIN, TRAIN_SIZES[WSC_TRAIN]),
       (WSC_EVAL, TRAIN_SIZES[WSC_EVAL])],
      class_labels=LABELS["wsc"], examples_tasks=only_eval_shows_examples)
  mixture_names += registry.register_mixture_variants(
      f"super_glue_{VERSION}_proportional", list(TRAIN_SIZES.items()),
      examples_tasks=only_eval_shows_examples)
  mixture_names += registry.register_mixture_variants(
      f"super_glue_with_dpr_{VERSION}_proportional",
      [(DPR, DPR_TRAIN_SIZE)] + list(TRAIN_SIZES.items()),
      examples_tasks=only_eval_shows_examples)
  # The original's names for the task-index `_examples` mixtures put `_examples` elsewhere.
  for original, ours in ORIGINAL_MIXTURE_NAMES.items():
    registry.add_mixture(original, [(task.name, seqio.get_mixture_or_task(ours).get_rate(task))
                                    for task in seqio.get_mixture_or_task(ours).tasks])
    mixture_names.append(original)

  return task_names, mixture_names


TASK_NAMES, MIXTURE_NAMES = register()
