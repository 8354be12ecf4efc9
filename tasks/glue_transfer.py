"""Zero-shot transfer between QQP and MRPC: train on one, evaluate on the other.

Both ask whether two texts are paraphrases but name the answer differently: QQP says
`duplicate`/`not_duplicate`, MRPC `equivalent`/`not_equivalent`. The evaluation tasks
`..glue_{target}_from_{source}_v200..` read the target dataset's validation split and translate
predictions from the source's label words before scoring with the target's metrics (targets stay
in the target's words). The mixtures `..glue_{target}_from_{source}_zeroshot_v200..` pair the
source's training task with that evaluation task.

Class labels of both are the source's words: that is what the prompt learns to produce.
"""
from __future__ import annotations

from typing import List, Tuple

from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import registry
import tasks.glue as glue

TRANSLATIONS = {("qqp", "mrpc"): pp.qqp_to_mrpc, ("mrpc", "qqp"): pp.mrpc_to_qqp}


def stem(target: str, source: str) -> str:
  return f"glue_{target}_from_{source}_{glue.VERSION}"


def register() -> Tuple[List[str], List[str]]:
  """Registers this module's tasks and mixtures; returns their names."""
  task_names, mixture_names = [], []
  for (source, target), translate in TRANSLATIONS.items():
    task_names += registry.register_variants(glue.spec(
        target,
        source_override=glue.source(target, splits=("validation",)),
        stem_override=stem(target, source),
        postprocess_override=pp.sequential(translate, glue.postprocess_fn(target)),
        class_labels=glue.LABELS[source],
    ))
    registry.register_class_labels(f"glue_{target}_from_{source}", glue.LABELS[source])
    mixture_names += registry.register_mixture_variants(
        f"glue_{target}_from_{source}_zeroshot_{glue.VERSION}",
        [glue.stem(source), stem(target, source)],
        class_labels=glue.LABELS[source])

  return task_names, mixture_names


TASK_NAMES, MIXTURE_NAMES = register()
