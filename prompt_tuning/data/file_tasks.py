"""Tasks from your own JSONL or TSV files, without writing code.

`register_file_task` reads every line of the given files, checks it, and registers a seqio task
whose inputs/targets are rendered from `{field}` templates. Any problem stops registration with
an error that names the file, the line and what is wrong, e.g.

    data/train.jsonl:7: missing field 'label' (the line has: sentence, idx)

From gin (the function returns the task name, so it can feed `MIXTURE_OR_TASK_NAME`):

    from prompt_tuning.data import file_tasks
    MIXTURE_OR_TASK_NAME = @sentiment/file_tasks.register_file_task()
    sentiment/file_tasks.register_file_task:
      name = "my_sentiment"
      train = "/data/train.jsonl"
      validation = "/data/dev.jsonl"
      inputs = "review: {text}"
      targets = "{label}"
      class_labels = ["negative", "positive"]

JSONL: one JSON object per line; template fields must be strings, numbers or booleans (`true`
becomes "True"). TSV: tab-separated, the first line names the fields unless `tsv_field_names`
is given; no quoting. Blank lines are skipped. Files are read when the task is registered and
held in memory: this is meant for prompt-tuning-sized datasets, not for pre-training corpora.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from prompt_tuning.data import metrics as metrics_lib
from prompt_tuning.data import postprocessors as pp
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import registry
from prompt_tuning.data import vocabularies

FORMATS = ("jsonl", "tsv")
MAX_REPORTED_ERRORS = 20
_REGRESSION_METRICS = ("pearson", "spearman")

Paths = Union[str, Sequence[str], None]

# Source column of the gold answers (reserved: templates cannot use it).
_GOLD = "__answers__"

# name -> the settings it was registered with (to make re-registration a no-op).
_FILE_TASKS: Dict[str, tuple] = {}


class FileTaskError(ValueError):
  """Problems found in a file task's data files, one `path:line: problem` per line."""


@dataclasses.dataclass
class _Split:
  """Validated fields of one split, column-wise (all strings)."""
  fields: Dict[str, List[str]]
  answers: Optional[List[List[str]]]

  @property
  def size(self) -> int:
    return len(next(iter(self.fields.values())))


def _expand(paths: Paths) -> List[str]:
  if paths is None:
    return []
  patterns = [paths] if isinstance(paths, str) else list(paths)
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise FileTaskError(f"{pattern}: no such file (or no file matches the pattern)")
    files += matched
  return files


def _file_format(path: str, file_format: Optional[str]) -> str:
  """The given format, or the one the extension names (.jsonl/.json or .tsv)."""
  if file_format:
    if file_format not in FORMATS:
      raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    return file_format
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    return "jsonl"
  if ext == ".tsv":
    return "tsv"
  raise ValueError(f"{path}: cannot tell the format from the extension {ext!r}; "
                   "set file_format='jsonl' or 'tsv'")


def _as_field_text(value) -> Optional[str]:
  """JSON scalar -> text; None for values a template cannot hold (null, lists, objects)."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (int, float)):
    return json.dumps(value)
  return None


def _json_type(value) -> str:
  if value is None:
    return "null"
  return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


class _Reader:
  """Reads and checks data files line by line, collecting the errors."""

  def __init__(self, settings: "_Settings"):
    self.s = settings
    self.errors: List[str] = []

  def error(self, path: str, line_no: int, problem: str) -> None:
    self.errors.append(f"{path}:{line_no}: {problem}")

  def read(self, files: Sequence[str]) -> _Split:
    fields = {name: [] for name in self.s.fields}
    answers = [] if self.s.answers_field else None
    for path in files:
      file_format = _file_format(path, self.s.file_format)
      with tf.io.gfile.GFile(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
      header = None
      if file_format == "tsv" and self.s.tsv_field_names is None:
        header = self._tsv_header(path, raw_lines[0] if raw_lines else b"")
        if header is None:
          continue
      first = 2 if header is not None else 1
      for line_no, raw in enumerate(raw_lines[first - 1:], start=first):
        if len(self.errors) >= MAX_REPORTED_ERRORS:
          return _Split(fields, answers)
        try:
          line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
          self.error(path, line_no, f"not valid UTF-8 ({e.reason} at byte {e.start})")
          continue
        if not line.strip():
          continue
        if file_format == "jsonl":
          record = self._parse_json(path, line_no, line)
        else:
          record = self._parse_tsv(path, line_no, line, header or list(self.s.tsv_field_names))
        if record is not None:
          self._check_and_keep(path, line_no, record, fields, answers)
    return _Split(fields, answers)

  def _tsv_header(self, path, raw) -> Optional[List[str]]:
    try:
      header = raw.decode("utf-8").rstrip("\r").split("\t")
    except UnicodeDecodeError:
      self.error(path, 1, "header line is not valid UTF-8")
      return None
    missing = [f for f in self.s.required_fields if f not in header]
    if missing:
      self.error(path, 1, f"header has no field {', '.join(map(repr, missing))} "
                 f"(header fields: {', '.join(header)})")
      return None
    if len(set(header)) != len(header):
      self.error(path, 1, "header names a field twice")
      return None
    return header

  def _parse_json(self, path, line_no, line) -> Optional[dict]:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      self.error(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})")
      return None
    if not isinstance(record, dict):
      self.error(path, line_no, f"expected a JSON object, got {_json_type(record)}")
      return None
    return record

  def _parse_tsv(self, path, line_no, line, names) -> Optional[dict]:
    values = line.split("\t")
    if len(values) != len(names):
      self.error(path, line_no, f"expected {len(names)} tab-separated fields "
                 f"({', '.join(names)}), found {len(values)}")
      return None
    record = dict(zip(names, values))
    if self.s.answers_field and self.s.answers_field in record:
      record[self.s.answers_field] = record[self.s.answers_field].split(self.s.answers_delimiter)
    return record

  def _check_and_keep(self, path, line_no, record, fields, answers) -> None:
    missing = [f for f in self.s.required_fields if f not in record]
    if missing:
      has = ", ".join(record) or "no fields"
      self.error(path, line_no, f"missing field {', '.join(map(repr, missing))} "
                 f"(the line has: {has})")
      return
    texts = {}
    for name in self.s.fields:
      text = _as_field_text(record[name])
      if text is None:
        self.error(path, line_no, f"field {name!r} must be a string or a number, "
                   f"got {_json_type(record[name])}")
        return
      texts[name] = text
    gold = None
    if self.s.answers_field:
      gold = record[self.s.answers_field]
      if (not isinstance(gold, list) or not gold
          or not all(isinstance(a, str) and a.strip() for a in gold)):
        self.error(path, line_no, f"field {self.s.answers_field!r} must be a non-empty list of "
                   f"non-empty strings, got {json.dumps(gold)[:80]}")
        return
    inputs = self.s.render(self.s.inputs, texts)
    targets = self.s.render(self.s.targets, texts)
    if not inputs.strip():
      self.error(path, line_no, f"inputs are empty (template {self.s.inputs!r})")
      return
    if not targets.strip():
      self.error(path, line_no, f"targets are empty (template {self.s.targets!r})")
      return
    if self.s.class_labels and targets not in self.s.class_labels:
      self.error(path, line_no, f"targets {targets!r} is not one of the class labels "
                 f"{list(self.s.class_labels)}")
      return
    if self.s.numeric_targets:
      try:
        float(targets)
      except ValueError:
        self.error(path, line_no, f"targets {targets!r} is not a number (regression metrics "
                   f"{', '.join(self.s.metrics)} need one)")
        return
    for name, text in texts.items():
      fields[name].append(text)
    if answers is not None:
      answers.append(list(gold))


@dataclasses.dataclass(frozen=True)
class _Settings:
  inputs: str
  targets: str
  file_format: Optional[str]
  tsv_field_names: Optional[tuple]
  answers_field: Optional[str]
  answers_delimiter: str
  class_labels: tuple
  metrics: tuple

  @property
  def fields(self) -> List[str]:
    """Fields the templates use, in first-use order."""
    names = prep.template_fields(self.inputs) + prep.template_fields(self.targets)
    return list(dict.fromkeys(names))

  @property
  def required_fields(self) -> List[str]:
    return self.fields + ([self.answers_field] if self.answers_field else [])

  @property
  def numeric_targets(self) -> bool:
    return any(m in _REGRESSION_METRICS for m in self.metrics)

  @staticmethod
  def render(template: str, texts: Mapping[str, str]) -> str:
    return "".join(literal + (texts[field] if field is not None else "")
                   for literal, field in prep.parse_template(template))


def _default_metrics(class_labels, answers_field) -> tuple:
  if answers_field:
    return ("squad",)
  if class_labels:
    return ("accuracy",)
  return ("sequence_accuracy",)


def _check_metrics(names, class_labels, answers_field) -> None:
  for name in names:
    if name not in metrics_lib.METRICS_BY_NAME:
      raise ValueError(f"unknown metric {name!r}; choose from "
                       f"{sorted(metrics_lib.METRICS_BY_NAME)}")
  if any(m in ("f1", "mcc") for m in names) and not class_labels:
    raise ValueError("metrics 'f1' and 'mcc' compare class ids: give class_labels")
  if "f1" in names and len(class_labels) != 2:
    raise ValueError("metric 'f1' is binary (class 1 is positive): give exactly 2 class_labels")
  if "squad" in names and not answers_field:
    raise ValueError("metric 'squad' needs answers_field (the list of gold answers)")
  if any(m in _REGRESSION_METRICS for m in names) and (class_labels or answers_field):
    raise ValueError("regression metrics take numeric targets: drop class_labels/answers_field")


def _postprocess_fn(settings: _Settings):
  if settings.answers_field:
    return pp.qa
  if settings.numeric_targets:
    return pp.string_to_float
  return pp.label_postprocessor(settings.class_labels)


def _dataset_fn(splits: Mapping[str, _Split], answers_field: Optional[str]):

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file" per split; seqio shuffles examples
    data = splits[split]
    columns = {name: tf.constant(values, tf.string) for name, values in data.fields.items()}
    if answers_field:
      columns[_GOLD] = tf.ragged.constant(data.answers, dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices(columns)

  return dataset_fn


@gin.configurable
def register_file_task(
    name: str = gin.REQUIRED,
    train: Paths = None,
    validation: Paths = None,
    test: Paths = None,
    inputs: str = "{inputs}",
    targets: str = "{targets}",
    file_format: Optional[str] = None,
    tsv_field_names: Optional[Sequence[str]] = None,
    class_labels: Optional[Sequence[str]] = None,
    answers_field: Optional[str] = None,
    answers_delimiter: str = "|||",
    metrics: Optional[Sequence[str]] = None,
    vocabulary: str = "t5",
    keep_examples: bool = False,
) -> str:
  """Checks the files and registers task `name`; returns `name`.

  Args:
    name: the seqio task name.
    train, validation, test: a path, glob pattern or list of them per split (local or gs://).
    inputs, targets: templates over the line's fields, e.g. `"question: {q} context: {c}"`.
    file_format: "jsonl" or "tsv"; default from the extension (.jsonl/.json or .tsv).
    tsv_field_names: names of the TSV columns when the files have no header line.
    class_labels: label words; every target must be one of them, predictions are scored as
      class ids, and `class_labels(name)` returns them for class-label prompt initialisation.
    answers_field: a field holding all gold answers (a JSON list of strings, or in TSV the
      answers joined by `answers_delimiter`); scores with SQuAD EM/F1.
    metrics: names from `metrics.METRICS_BY_NAME`; default accuracy with class labels, SQuAD
      with answers, else exact sequence match. "pearson"/"spearman" need numeric targets.
    vocabulary: "t5", "mt5" or "byt5".
    keep_examples: keep each prediction's input/target text and add text samples to the metrics.

  Raises:
    FileTaskError: a file is missing or has bad lines (all reported, up to 20).
    ValueError: inconsistent settings, or `name` belongs to a task not registered here.
  """
  if name is gin.REQUIRED or not name:
    raise ValueError("register_file_task needs a task name")
  split_paths = {"train": train, "validation": validation, "test": test}
  if all(p is None for p in split_paths.values()):
    raise ValueError(f"file task {name!r}: give at least one of train/validation/test files")
  if vocabulary not in vocabularies.VOCABULARIES:
    raise ValueError(f"unknown vocabulary {vocabulary!r}; choose from "
                     f"{sorted(vocabularies.VOCABULARIES)}")
  class_labels = tuple(class_labels or ())
  metrics = tuple(metrics) if metrics else _default_metrics(class_labels, answers_field)
  _check_metrics(metrics, class_labels, answers_field)
  prep.parse_template(inputs), prep.parse_template(targets)  # bad templates fail here

  key = (tuple((k, v if isinstance(v, (str, type(None))) else tuple(v))
               for k, v in split_paths.items()),
         inputs, targets, file_format, tuple(tsv_field_names or ()), class_labels, answers_field,
         answers_delimiter, metrics, vocabulary, keep_examples)
  if name in seqio.TaskRegistry.names():
    if name not in _FILE_TASKS:
      raise ValueError(f"{name!r} is already a registered task that is not a file task; "
                       "choose another name")
    if _FILE_TASKS[name] == key:
      return name

  files = {split: _expand(paths) for split, paths in split_paths.items() if paths is not None}
  for path in (p for paths in files.values() for p in paths):
    _file_format(path, file_format)  # an unknown extension fails before any reading
  settings = _Settings(
      inputs=inputs, targets=targets,
      file_format=file_format,
      tsv_field_names=tuple(tsv_field_names) if tsv_field_names else None,
      answers_field=answers_field, answers_delimiter=answers_delimiter,
      class_labels=class_labels, metrics=metrics)
  if not settings.fields:
    raise ValueError(f"file task {name!r}: the templates use no {{field}}")
  if _GOLD in settings.fields:
    raise ValueError(f"{_GOLD!r} is reserved; rename that field")
  if answers_field and answers_field in settings.fields:
    raise ValueError(f"answers_field {answers_field!r} is a list; templates cannot use it")

  reader = _Reader(settings)
  splits = {split: reader.read(paths) for split, paths in files.items()}
  for split, data in splits.items():
    if not reader.errors and not data.size:
      reader.errors.append(f"{', '.join(files[split])}: no examples in the {split} split")
  if reader.errors:
    more = " (stopped after the first 20)" if len(reader.errors) >= MAX_REPORTED_ERRORS else ""
    raise FileTaskError(f"file task {name!r}: {len(reader.errors)} problem(s) in the data"
                        f"{more}:\n" + "\n".join(reader.errors))

  metric_fns = [metrics_lib.METRICS_BY_NAME[m] for m in metrics]
  postprocess_fn = _postprocess_fn(settings)
  if keep_examples:
    fields = (pp.INPUT_TEXT, pp.TARGET_TEXT) + (("answers",) if answers_field else ())
    postprocess_fn = functools.partial(pp.postprocess_with_examples, postprocess_fn,
                                       example_fields=fields)
    metric_fns = [metrics_lib.with_examples(fn) for fn in metric_fns]
    metric_fns.append(functools.partial(metrics_lib.text_examples, task_name=name))

  keep = {"answers": _GOLD} if answers_field else {}
  # Re-registering with new settings replaces the old task (e.g. a gin config was edited).
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(_dataset_fn(splits, answers_field), splits=tuple(splits)),
      preprocessors=[
          functools.partial(prep.text_to_text, inputs_template=inputs, targets_template=targets,
                            keep_fields=keep),
          seqio.preprocessors.tokenize,
          prep.append_eos_after_trim,
      ],
      output_features=vocabularies.output_features(vocabulary),
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns)
  registry.register_class_labels(name, class_labels)
  _FILE_TASKS[name] = key
  return name
