"""Idempotent seqio registration, the prompt-tuning task variants, and class labels per task.

One dataset becomes up to 18 tasks: 3 formats x with/without `_examples` x 3 vocabularies.

| name | inputs |
|---|---|
| `glue_sst2_v200` | `sst2 sentence: it 's a charming ...` (T5's format) |
| `taskless_glue_sst2_v200` | `sentence: it 's a charming ...` (the paper's format) |
| `task_index_glue_sst2_v200` | `<extra_id_6>` + tokens of the taskless text (multi-task prompts) |

`..._examples` keeps each prediction's input and target text and adds text samples to the
metrics; `..._mt5` / `..._byt5` use the mT5 / ByT5 vocabulary (no suffix: T5).

Registering twice is a no-op, so modules that share these helpers can be imported in any order,
and `class_labels(name)` answers for every task or mixture registered through here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import seqio

from prompt_tuning.data import metrics as metrics_lib
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import vocabularies

FORMAT_PREFIXES: Mapping[str, str] = {"plain": "", "taskless": "taskless_",
                                      "task_index": "task_index_"}
FORMATS: Tuple[str, ...] = tuple(FORMAT_PREFIXES)
EXAMPLES_SUFFIX = "_examples"
VOCABS: Tuple[str, ...] = tuple(vocabularies.VOCABULARIES)

_CLASS_LABELS: Dict[str, Tuple[str, ...]] = {}


def add_task(name: str, **kwargs) -> seqio.Task:
  """`seqio.TaskRegistry.add`, except that an already registered name is returned as is."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def add_mixture(name: str, tasks: Sequence, class_labels: Optional[Sequence[str]] = None,
                **kwargs) -> seqio.Mixture:
  """`seqio.MixtureRegistry.add`, idempotent; optionally records the mixture's class labels."""
  if class_labels is not None:
    register_class_labels(name, class_labels)
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  return seqio.MixtureRegistry.add(name, tasks, **kwargs)


def register_class_labels(name: str, labels: Sequence[str]) -> None:
  """Records the label words used for class-label prompt initialisation of `name`."""
  _CLASS_LABELS[name] = tuple(labels)


def class_labels(name: str) -> Tuple[str, ...]:
  """The label words of a task or mixture, e.g. `("negative", "positive")` for SST-2.

  Accepts full task names (`taskless_glue_sst2_v200_examples_mt5`) and the short dataset names
  that the task modules record (`glue_sst2`, `super_glue_rte`). A mixture without labels of its
  own gets its tasks' labels, in order, without repeats. Tasks with free-text answers (SQuAD,
  MRQA) have none: `()`.
  """
  if name in _CLASS_LABELS:
    return _CLASS_LABELS[name]
  if name in seqio.MixtureRegistry.names():
    labels = []
    for task in seqio.MixtureRegistry.get(name).tasks:
      for label in class_labels(task.name):
        if label not in labels:
          labels.append(label)
    return tuple(labels)
  raise KeyError(f"no class labels recorded for {name!r}: import the module that registers it "
                 "(e.g. `tasks.glue`) or give the labels explicitly")


def variant_name(stem: str, fmt: str = "plain", examples: bool = False,
                 vocabulary: str = "t5") -> str:
  """`("glue_sst2_v200", "taskless", True, "mt5")` -> `taskless_glue_sst2_v200_examples_mt5`."""
  return (f"{FORMAT_PREFIXES[fmt]}{stem}{EXAMPLES_SUFFIX if examples else ''}"
          f"{vocabularies.VOCAB_SUFFIXES[vocabulary]}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One dataset in T5's text-to-text format, before it is expanded into variants."""

  stem: str  # name without variant decorations, e.g. "glue_sst2_v200"
  source: seqio.DataSourceInterface
  # Raw example -> {"inputs", "targets", ...} text, T5's format with the task name first.
  text_preprocessors: Sequence[Callable]
  postprocess_fn: Optional[Callable] = None
  metric_fns: Sequence[Callable] = ()
  # Offset of the task-index sentinel (<extra_id_k>); None: no task_index variant.
  task_index: Optional[int] = None
  class_labels: Sequence[str] = ()
  display_name: str = ""  # names the text samples of the `_examples` variant
  formats: Sequence[str] = FORMATS
  example_fields: Sequence[str] = (pp.INPUT_TEXT, pp.TARGET_TEXT)
  examples_format_fn: Callable = metrics_lib.format_classification


def _preprocessors(spec: TaskSpec, fmt: str) -> List[Callable]:
  steps = list(spec.text_preprocessors)
  if fmt in ("taskless", "task_index"):
    steps.append(prep.remove_first_text_token)
  steps.append(seqio.preprocessors.tokenize)
  if fmt == "task_index":
    steps.append(functools.partial(prep.add_sentinel_to_beginning, field="inputs",
                                   offset=spec.task_index))
  steps += [seqio.CacheDatasetPlaceholder(), prep.append_eos_after_trim]
  return steps


def _outputs(spec: TaskSpec, examples: bool):
  if not examples:
    return spec.postprocess_fn, list(spec.metric_fns)
  postprocess_fn = functools.partial(pp.postprocess_with_examples,
                                     spec.postprocess_fn or pp.identity,
                                     example_fields=tuple(spec.example_fields))
  metric_fns = [metrics_lib.with_examples(fn) for fn in spec.metric_fns]
  metric_fns.append(functools.partial(metrics_lib.text_examples,
                                      task_name=spec.display_name or spec.stem,
                                      format_fn=spec.examples_format_fn))
  return postprocess_fn, metric_fns


def register_variants(spec: TaskSpec, vocabs: Iterable[str] = VOCABS,
                      examples: Iterable[bool] = (False, True)) -> List[str]:
  """Registers every (format, examples, vocabulary) variant of `spec`; returns the names."""
  names = []
  for vocab in vocabs:
    features = vocabularies.output_features(vocab)
    for fmt in spec.formats:
      if fmt == "task_index" and spec.task_index is None:
        continue
      for with_examples in examples:
        name = variant_name(spec.stem, fmt, with_examples, vocab)
        postprocess_fn, metric_fns = _outputs(spec, with_examples)
        add_task(name, source=spec.source, preprocessors=_preprocessors(spec, fmt),
                 output_features=features, postprocess_fn=postprocess_fn,
                 metric_fns=metric_fns)
        register_class_labels(name, spec.class_labels)
        names.append(name)
  return names


def register_mixture_variants(stem: str, task_stems: Sequence, formats: Sequence[str] = FORMATS,
                              vocabs: Iterable[str] = VOCABS,
                              examples: Iterable[bool] = (False, True),
                              class_labels: Optional[Sequence[str]] = None,
                              examples_tasks: Optional[Callable[[str], bool]] = None,
                              default_rate: float = 1.0) -> List[str]:
  """Registers a mixture per variant over the same variant of each task stem.

  `task_stems` holds stems or (stem, rate) pairs. `examples_tasks(stem)` says whether the
  `_examples` mixture uses that task's `_examples` variant (default: all do); training-only
  tasks have nothing to show, so their plain variant is enough.
  """
  names = []
  for vocab in vocabs:
    for fmt in formats:
      for with_examples in examples:
        members = []
        for item in task_stems:
          task_stem, rate = item if isinstance(item, tuple) else (item, default_rate)
          keep = with_examples and (examples_tasks is None or examples_tasks(task_stem))
          members.append((variant_name(task_stem, fmt, keep, vocab), rate))
        name = variant_name(stem, fmt, with_examples, vocab)
        add_mixture(name, members, class_labels=class_labels)
        names.append(name)
  return names


def task_index_mapping(names: Sequence[str],
                       aliases: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
  """Task index per name, in sorted order; aliases share their target's index.

  As the original implementation: e.g. GLUE's `ax` and `mnli_matched` are MNLI, so they get
  MNLI's sentinel.
  """
  aliases = dict(aliases or {})
  index = {name: i for i, name in enumerate(sorted(set(names) - set(aliases)))}
  for alias, target in aliases.items():
    if target not in index:
      raise ValueError(f"alias {alias!r} -> {target!r}, but {target!r} is not a task")
    index[alias] = index[target]
  return index
