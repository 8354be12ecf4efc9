"""SQuAD v1.1 and the MRQA 2019 dev sets in T5's QA format, for domain-transfer experiments.

Inputs are `"question: <q> context: <c>"` (punctuation padded, as T5), targets the first gold
answer; metrics are SQuAD EM/F1 over all gold answers. This format has no task-name word, so
there are no taskless/task_index variants: the plain task already is the paper's format.

Tasks: `squad_v010_allanswers{,_examples}{,_mt5,_byt5}` (TFDS `squad/v1.1:3.0.0`) and
`mrqa_{name}_v100{,_examples}{,_mt5,_byt5}` (TFDS `mrqa/*:1.0.0`) for the in-domain sets
(squad, newsqa, triviaqa, searchqa, hotpotqa, naturalquestions: train + validation) and the
out-of-domain sets of the paper's Table 2 (textbookqa, bioasq, race, relation_extraction, duorc,
drop: TFDS has them as `test`; `validation` names the same data, so evaluation finds it).

Mixtures: `squad_to_{name}..` (train on SQuAD, evaluate on one out-of-domain set),
`squad_to_mrqa..` (all six) and `squad_to_mrqa_in_domain..`.
"""
from __future__ import annotations

from typing import List, Tuple

from prompt_tuning.data import metrics
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import registry
import seqio

SQUAD = "squad_v010_allanswers"
MRQA_VERSION = "v100"
MRQA_TFDS_VERSION = "1.0.0"

# Our name -> TFDS config.
MRQA_IN_DOMAIN = {
    "squad": "squad", "newsqa": "news_qa", "triviaqa": "trivia_qa", "searchqa": "search_qa",
    "hotpotqa": "hotpot_qa", "naturalquestions": "natural_questions",
}
MRQA_OUT_OF_DOMAIN = {
    "textbookqa": "textbook_qa", "bioasq": "bio_asq", "race": "race",
    "relation_extraction": "relation_extraction", "duorc": "duo_rc", "drop": "drop",
}

QA_FIELDS = (pp.TARGET_TEXT, "context", "question", "answers")


def format_qa(examples) -> str:
  return "\n\n".join(
      f"context: {ex.get('context')}\nquestion: {ex.get('question')}\n"
      f"answers: {'; '.join(sorted(set(ex.get('answers') or [])))}\n"
      f"prediction: {ex.get(pp.PREDICTION_TEXT)}" for ex in examples)


def mrqa_stem(name: str) -> str:
  return f"mrqa_{name}_{MRQA_VERSION}"


def _qa_spec(stem: str, source, preprocessor, display_name: str) -> registry.TaskSpec:
  return registry.TaskSpec(
      stem=stem, source=source, text_preprocessors=[preprocessor],
      postprocess_fn=pp.qa, metric_fns=[metrics.squad], class_labels=(),
      display_name=display_name, formats=("plain",), example_fields=QA_FIELDS,
      examples_format_fn=format_qa)


def register() -> Tuple[List[str], List[str]]:
  """Registers this module's tasks and mixtures; returns their names."""
  task_names, mixture_names = [], []
  task_names += registry.register_variants(_qa_spec(
      SQUAD, seqio.TfdsDataSource(tfds_name="squad/v1.1:3.0.0", splits=("train", "validation")),
      prep.squad, "squad"))
  registry.register_class_labels("squad", ())

  for name, config in {**MRQA_IN_DOMAIN, **MRQA_OUT_OF_DOMAIN}.items():
    if name in MRQA_IN_DOMAIN:
      splits = {"train": "train", "validation": "validation"}
    else:
      splits = {"validation": "test", "test": "test"}
    task_names += registry.register_variants(_qa_spec(
        mrqa_stem(name),
        seqio.TfdsDataSource(tfds_name=f"mrqa/{config}:{MRQA_TFDS_VERSION}", splits=splits),
        prep.mrqa, f"mrqa {name}"))
    registry.register_class_labels(f"mrqa_{name}", ())

  for name in MRQA_OUT_OF_DOMAIN:
    mixture_names += registry.register_mixture_variants(
        f"squad_to_{name}", [SQUAD, mrqa_stem(name)], formats=("plain",), class_labels=())
  mixture_names += registry.register_mixture_variants(
      "squad_to_mrqa", [SQUAD] + [mrqa_stem(n) for n in MRQA_OUT_OF_DOMAIN],
      formats=("plain",), class_labels=())
  mixture_names += registry.register_mixture_variants(
      "squad_to_mrqa_in_domain", [SQUAD] + [mrqa_stem(n) for n in MRQA_IN_DOMAIN if n != "squad"],
      formats=("plain",), class_labels=())

  return task_names, mixture_names


TASK_NAMES, MIXTURE_NAMES = register()
