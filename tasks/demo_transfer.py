"""Taskless versions of the demo's other skills, for prompt transfer (SPoT) on the demo model.

`tasks.demo` holds the frozen model's four prefixed skills and one held-out taskless task,
`demo_taskless_last`. Here the other three skills get taskless versions too: bare word lists,
so the prompt has to stand in for the missing instruction, as for `demo_taskless_last`.
- `demo_taskless_copy`, `demo_taskless_upper`, `demo_taskless_first`: one skill each;
- `demo_taskless_sources`: the three mixed, the source mixture of SPoT's recipe on the demo
  (`runs/spot_finetune.gin`: train a prompt on it, then start `demo_taskless_last` from it).
"""
import seqio

from tasks import demo

SOURCE_SKILLS = ("copy", "upper", "first")
TASK_NAMES = [f"demo_taskless_{skill}" for skill in SOURCE_SKILLS]
MIXTURE_NAMES = ["demo_taskless_sources"]

for _i, _skill in enumerate(SOURCE_SKILLS):
  # Seed offsets of their own: word lists unlike those of any tasks.demo task.
  demo._register(f"demo_taskless_{_skill}", _skill, prefix=False,  # pylint: disable=protected-access
                 seed_offset=200 + _i)

if "demo_taskless_sources" not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add("demo_taskless_sources", TASK_NAMES, default_rate=1.0)
