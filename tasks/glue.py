"""GLUE in T5's text-to-text format (TFDS `glue/*:2.0.0`), in every prompt-tuning variant.

Tasks: `{,taskless_,task_index_}glue_{name}_v200{,_examples}{,_mt5,_byt5}` for name in cola,
sst2, mrpc, qqp, stsb, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax. See
`prompt_tuning.data.registry` for what the decorations mean.

Mixtures: `..glue_mnli_and_dev_v200..` (MNLI train + matched/mismatched validation) and
`..glue_v200_proportional..` (all of GLUE but WNLI, weighted by training-set size, as T5).

MNLI's TFDS splits are `validation_matched`/`validation_mismatched`; evaluate on the
`mnli_matched`/`mnli_mismatched` tasks (split `validation`). AX has only a test split.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

from prompt_tuning.data import metrics
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import registry
import seqio

VERSION = "v200"
TFDS_VERSION = "2.0.0"

# Label words in TFDS class order (the postprocessor maps a word back to its index).
LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    # T5 rounds STS-B scores to 0.2 steps and writes them as text.
    "stsb": tuple(f"{i / 5:.1f}" for i in range(26)),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mnli_matched": ("entailment", "neutral", "contradiction"),
    "mnli_mismatched": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
    "ax": ("entailment", "neutral", "contradiction"),
}

# Text features in the order T5 writes them (sorted names).
FEATURES = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("hypothesis", "premise"),
    "mnli_matched": ("hypothesis", "premise"),
    "mnli_mismatched": ("hypothesis", "premise"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ax": ("hypothesis", "premise"),
}

SPLITS = {
    "mnli": ("train", "validation_matched", "validation_mismatched", "test_matched",
             "test_mismatched"),
    "mnli_matched": ("validation", "test"),
    "mnli_mismatched": ("validation", "test"),
    "ax": ("test",),
}
DEFAULT_SPLITS = ("train", "validation", "test")

# The diagnostic and the MNLI dev sets are MNLI to the model: same task name, same task index.
BENCHMARK = {"ax": "mnli", "mnli_matched": "mnli", "mnli_mismatched": "mnli"}
TASK_INDEX = registry.task_index_mapping(tuple(LABELS), BENCHMARK)

METRICS = {
    "cola": [metrics.matthews_corrcoef],
    "sst2": [metrics.accuracy],
    "mrpc": [metrics.f1_score_with_invalid, metrics.accuracy],
    "qqp": [metrics.f1_score_with_invalid, metrics.accuracy],
    "stsb": [metrics.pearson_corrcoef, metrics.spearman_corrcoef],
    "mnli": [metrics.accuracy],
    "mnli_matched": [metrics.accuracy],
    "mnli_mismatched": [metrics.accuracy],
    "qnli": [metrics.accuracy],
    "rte": [metrics.accuracy],
    "wnli": [metrics.accuracy],
    "ax": [],  # test split only: no labels
}

# Training-set sizes: T5's mixing rates. WNLI is left out, as in T5 (which trains on WSC).
TRAIN_SIZES = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "qqp": 363_849, "stsb": 5_749,
               "mnli": 392_702, "qnli": 104_743, "rte": 2_490, "mnli_matched": 0,
               "mnli_mismatched": 0, "ax": 0}


def stem(name: str) -> str:
  return f"glue_{name}_{VERSION}"


def source(name: str, splits=None) -> seqio.TfdsDataSource:
  return seqio.TfdsDataSource(tfds_name=f"glue/{name}:{TFDS_VERSION}",
                              splits=splits or SPLITS.get(name, DEFAULT_SPLITS))


def text_preprocessor(name: str):
  """T5's text format for one GLUE dataset."""
  if name == "stsb":
    return prep.stsb
  return functools.partial(prep.glue, benchmark_name=BENCHMARK.get(name, name),
                           label_names=LABELS[name], feature_names=FEATURES[name])


def postprocess_fn(name: str):
  if name == "stsb":
    return pp.string_to_float
  return pp.label_postprocessor(LABELS[name])


def spec(name: str, source_override=None, stem_override=None, postprocess_override=None,
         class_labels=None) -> registry.TaskSpec:
  """The TaskSpec of one GLUE dataset (overrides serve the zero-shot transfer tasks)."""
  return registry.TaskSpec(
      stem=stem_override or stem(name),
      source=source_override or source(name),
      text_preprocessors=[text_preprocessor(name)],
      postprocess_fn=postprocess_override or postprocess_fn(name),
      metric_fns=METRICS[name],
      task_index=TASK_INDEX[name],
      class_labels=class_labels if class_labels is not None else LABELS[name],
      display_name=name,
  )


def register() -> Tuple[List[str], List[str]]:
  """Registers this module's tasks and mixtures; returns their names."""
  task_names, mixture_names = [], []
  for name in LABELS:
    task_names += registry.register_variants(spec(name))
    registry.register_class_labels(f"glue_{name}", LABELS[name])

  mixture_names += registry.register_mixture_variants(
      f"glue_mnli_and_dev_{VERSION}",
      [stem("mnli"), stem("mnli_matched"), stem("mnli_mismatched")],
      class_labels=LABELS["mnli"])
  mixture_names += registry.register_mixture_variants(
      f"glue_{VERSION}_proportional",
      [(stem(name), float(size)) for name, size in TRAIN_SIZES.items()])

  return task_names, mixture_names


TASK_NAMES, MIXTURE_NAMES = register()
