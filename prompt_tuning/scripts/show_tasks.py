r"""Lists registered seqio tasks and mixtures, or prints examples of one.

    python -m prompt_tuning.scripts.show_tasks                      # every task and mixture
    python -m prompt_tuning.scripts.show_tasks --filter taskless_glue
    python -m prompt_tuning.scripts.show_tasks --task taskless_glue_sst2_v200 --split validation
    python -m prompt_tuning.scripts.show_tasks --module my_project.tasks --task my_task

`--module` (repeatable) names modules that register tasks; the default is `tasks.all` (every
built-in task). Showing examples reads the real dataset (TFDS data must be prepared) and the
vocabulary (see `prompt_tuning.data.vocabularies` for local copies).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence, TextIO

import numpy as np
import seqio

from prompt_tuning.data import registry


def list_registered(pattern: str = "", out: Optional[TextIO] = None) -> None:
  out = out or sys.stdout
  tasks = sorted(n for n in seqio.TaskRegistry.names() if pattern in n)
  mixtures = sorted(n for n in seqio.MixtureRegistry.names() if pattern in n)
  print(f"# {len(tasks)} tasks", file=out)
  for name in tasks:
    print(name, file=out)
  print(f"\n# {len(mixtures)} mixtures", file=out)
  for name in mixtures:
    print(name, file=out)


def _format_value(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray) and value.dtype == object:
    return repr([_format_value(v) for v in value.tolist()])
  if isinstance(value, np.ndarray):
    return np.array2string(value, threshold=64, max_line_width=100)
  return repr(value)


def show_examples(name: str, split: str = "validation", num_examples: int = 2,
                  out: Optional[TextIO] = None, **get_dataset_kwargs) -> None:
  """Prints the first examples of `split`, text and token ids, with the class labels."""
  out = out or sys.stdout
  provider = seqio.get_mixture_or_task(name)
  try:
    labels = registry.class_labels(name)
  except KeyError:
    labels = None
  print(f"{name}: splits {list(provider.splits)}; class labels {labels}", file=out)
  dataset = provider.get_dataset(None, split=split, shuffle=False, **get_dataset_kwargs)
  for i, example in enumerate(dataset.take(num_examples).as_numpy_iterator()):
    print(f"\n--- example {i} ({split}) ---", file=out)
    for key in sorted(example):
      print(f"{key}: {_format_value(example[key])}", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--module", action="append",
                      help="module that registers tasks (repeatable; default: tasks.all)")
  parser.add_argument("--task", help="task or mixture whose examples to print")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--num_examples", type=int, default=2)
  parser.add_argument("--filter", default="", help="list only names containing this text")
  args = parser.parse_args(argv)

  for module in args.module or ["tasks.all"]:
    importlib.import_module(module)
  if args.task is None:
    list_registered(args.filter)
    return 0
  names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if args.task not in names:
    close = sorted(n for n in names if args.task in n)[:10]
    print(f"unknown task or mixture {args.task!r}" + (f"; did you mean: {', '.join(close)}"
                                                      if close else ""), file=sys.stderr)
    return 2
  show_examples(args.task, args.split, args.num_examples)
  return 0


if __name__ == "__main__":
  sys.exit(main())
