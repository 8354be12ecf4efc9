"""Task-index versions of the demo's four taskless skills, for multi-task prompts on the demo.

`task_index_demo_taskless_{skill}` is `demo_taskless_{skill}` (`tasks.demo` / `tasks.demo_transfer`)
with the task sentinel `<extra_id_t>` put first, as the `task_index_` variants of GLUE and
SuperGLUE do (`data.preprocessors.add_sentinel_to_beginning`). The byte vocabulary has no
sentinel pieces, so task t is byte id 258 - t (task 0 is 258: PromptConfig.task_token_base).
Task indices follow the sorted skill names (`registry.task_index_mapping`).
- `task_index_demo_taskless_mixture`: the four mixed, trained with one shared prompt and a
  prompt per task (`runs/multitask_prompt_finetune.gin`).
"""
import functools

import seqio

from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import registry
from tasks import demo
from tasks import demo_transfer

SKILLS = tuple(sorted(demo.SKILLS))
TASK_INDEX = registry.task_index_mapping(SKILLS)
TASK_TOKEN_BASE = demo.VOCABULARY.vocab_size - 1
TASK_NAMES = [f"task_index_demo_taskless_{skill}" for skill in SKILLS]
MIXTURE_NAMES = ["task_index_demo_taskless_mixture"]

for _skill, _name in zip(SKILLS, TASK_NAMES):
  _plain = seqio.get_mixture_or_task(f"demo_taskless_{_skill}")
  registry.add_task(
      _name, source=_plain.source, output_features=demo.OUTPUT_FEATURES,
      preprocessors=[seqio.preprocessors.tokenize,
                     functools.partial(prep.add_sentinel_to_beginning, field="inputs",
                                       offset=TASK_INDEX[_skill]),
                     seqio.preprocessors.append_eos],
      metric_fns=[demo.exact_match])

registry.add_mixture(MIXTURE_NAMES[0], TASK_NAMES, default_rate=1.0)
del demo_transfer  # imported for the demo_taskless_{copy,upper,first} tasks it registers
