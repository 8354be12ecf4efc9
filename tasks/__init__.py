"""SeqIO task registrations. Import a submodule to register its tasks and mixtures.

- `tasks.glue`: GLUE (`glue_sst2_v200`, `taskless_glue_sst2_v200_examples`, ...)
- `tasks.super_glue`: SuperGLUE, incl. T5's "simple" WSC and DPR (`taskless_super_glue_boolq_v102`,
  `taskless_dpr_v001_simple`, ...)
- `tasks.glue_transfer`: QQP <-> MRPC zero-shot transfer (`glue_mrpc_from_qqp_zeroshot_v200`)
- `tasks.qa`: SQuAD v1.1 and MRQA (`squad_v010_allanswers`, `squad_to_mrqa`, ...)
- `tasks.all`: everything above (e.g. `MIXTURE_OR_TASK_MODULE = "tasks.all"`)

Names, variants and suffixes are explained in `prompt_tuning.data.registry`; tasks from your
own JSONL/TSV files come from `prompt_tuning.data.file_tasks.register_file_task`.
"""
from typing import Tuple

from prompt_tuning.data import registry as _registry


def class_labels(name: str) -> Tuple[str, ...]:
  """Label words for class-label prompt initialisation, e.g. `class_labels("glue_sst2")`.

  Takes a registered task or mixture name or a short dataset name (`glue_rte`,
  `super_glue_record`); registers the built-in tasks first if the name is not known yet.
  """
  try:
    return _registry.class_labels(name)
  except KeyError:
    import tasks.all  # noqa: F401  (registers every built-in task and its labels)
    return _registry.class_labels(name)
