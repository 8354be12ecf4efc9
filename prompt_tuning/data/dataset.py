"""SeqIO tasks and mixtures -> host batches for training; what evaluation needs of the tasks.

Training data go through `seqio.EncDecFeatureConverter(pack=False)` (prompts and packing don't
mix), in a deterministic order fixed by the seed, each host reading its own shard
(`seqio.ShardInfo`). The position in the stream (batches consumed) and the tf.data iterator state
are saved with each checkpoint: a resumed run restores the iterator, or, when that state is
missing or stale, rebuilds the same stream and skips that many batches; either way it sees exactly
the batches the uninterrupted run would have seen. Examples longer than TASK_FEATURE_LENGTHS are
counted before trimming (`Truncation`). Evaluation data are cached by `seqio.Evaluator` (see
`evaluation.py`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import vocabularies

_FEATURES = ("inputs", "targets")
# [inputs, targets] lengths of each example before any trimming (see `Truncation`).
_UNTRIMMED = "untrimmed_lengths"
# Bumped when the batches' structure changes: a saved iterator state of another one is stale.
_PIPELINE_VERSION = 2
# Truncation warnings already given in this process (hidden trimming, eval splits).
_WARNED: set = set()


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which data, how long, how many per step. `batch_size` is global (all hosts)."""

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 32
  shuffle: bool = True
  seed: int | None = 42
  use_cached: bool = False
  # Modules that register tasks (MIXTURE_OR_TASK_MODULE); a string or a sequence of strings.
  module: Any = None
  pack: bool = False

  def __post_init__(self):
    if self.pack:
      raise ValueError("Packing is not supported with prompt tuning (a prompt is prepended once "
                       "per row); set pack=False.")
    missing = {"inputs", "targets"} - set(self.task_feature_lengths or {})
    if missing:
      raise ValueError(f"TASK_FEATURE_LENGTHS must give lengths for {sorted(missing)}, e.g. "
                       "{'inputs': 512, 'targets': 8}")
    if self.batch_size <= 0:
      raise ValueError(f"BATCH_SIZE must be positive, got {self.batch_size} (the batch size of "
                       "this data: BATCH_SIZE, or EVAL_BATCH_SIZE for evaluation); pass e.g. "
                       "--gin.BATCH_SIZE=32")


def import_modules(module) -> None:
  if not module:
    return
  for name in [module] if isinstance(module, str) else module:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f"Could not import MIXTURE_OR_TASK_MODULE {name!r}: {e}") from e


def get_mixture_or_task(name: str, module=None) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture, or an error that suggests close names."""
  import_modules(module)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    where = (f" (after importing {module!r})." if module else
             ". Set MIXTURE_OR_TASK_MODULE to the module that registers it, e.g. 'tasks.glue'.")
    raise ValueError(f"Unknown task or mixture {name!r}{where}{hint} "
                     f"{len(known)} are registered; list them with "
                     "`python -m prompt_tuning.scripts.show_tasks`.") from None


def class_labels(task_name: str | None, module=None) -> list[str] | None:
  """The task's class labels as its registration recorded them (None: it has none).

  An unknown task is an error that suggests close names (not "no labels": the fix differs).
  """
  if not task_name:
    return None
  get_mixture_or_task(task_name, module)
  from prompt_tuning.data import registry
  try:
    return list(registry.class_labels(task_name)) or None
  except KeyError:  # the registry has no labels for this task: the caller says what to set
    return None


def host_shard() -> seqio.ShardInfo:
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def prepare_vocabularies(mixture_or_task_name: str | None, module=None, *,
                         initial_checkpoint_path: str | None = None) -> None:
  """Settles which vocabulary files the run's tasks use and reads them now.

  The tasks' T5/mT5 vocabulary may come from the frozen checkpoint's folder
  (`vocabularies.use_checkpoint_vocabulary`). Reading the files here, before a run loads a large
  frozen model or writes anything, turns an unreachable file (gs:// offline, a missing local file)
  into one clear error instead of a TensorFlow traceback hours into the run.
  """
  vocabularies.use_checkpoint_vocabulary(initial_checkpoint_path)
  if not mixture_or_task_name:
    return
  task = get_mixture_or_task(mixture_or_task_name, module)
  for t in getattr(task, "tasks", [task]):
    for name, feature in t.output_features.items():
      vocab = feature.vocabulary
      if not isinstance(vocab, seqio.SentencePieceVocabulary):
        continue
      try:
        vocab.load_model()
      except tf.errors.OpError as e:  # a task's own vocabulary (ours raise a ValueError)
        detail = " ".join(str(e).splitlines()[0].split())[:200]
        raise ValueError(f"Task {t.name!r} feature {name!r}: cannot read its vocabulary "
                         f"{vocab.sentencepiece_model_file} ({type(e).__name__}: {detail}); "
                         "make that file readable here (e.g. a local copy) and point the task "
                         "at it.") from e


def check_vocabulary(task, vocab_size: int) -> None:
  """The task's vocabulary must fit the model's embedding table."""
  for name in ("inputs", "targets"):
    feature = task.output_features.get(name)
    if feature is None:
      continue
    size = feature.vocabulary.vocab_size
    if size > vocab_size:
      raise ValueError(
          f"Task {task.name!r} feature {name!r} uses a vocabulary of {size} ids but the model's "
          f"embedding has {vocab_size} rows: use the model's vocabulary (e.g. the task variant "
          "with the right vocabulary suffix such as _mt5 / _byt5) or the matching model.")


@dataclasses.dataclass
class Truncation:
  """Examples longer than TASK_FEATURE_LENGTHS, counted on their lengths before any trimming.

  Our tasks trim in their preprocessing (`preprocessors.append_eos_after_trim`, which keeps EOS)
  and record each feature's untrimmed length; other tasks are measured after their preprocessing.
  """

  limits: Mapping[str, int]
  examples: int = 0
  truncated: int = 0  # examples with any feature over its limit
  per_feature: dict[str, int] = dataclasses.field(default_factory=dict)
  longest: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, lengths_NxF: np.ndarray) -> None:
    """Adds N examples' untrimmed lengths, one column per feature in `_FEATURES` order."""
    lengths_NxF = np.asarray(lengths_NxF).reshape(-1, len(_FEATURES))
    limits_F = np.array([self.limits[name] for name in _FEATURES])
    over_NxF = lengths_NxF > limits_F
    self.examples += lengths_NxF.shape[0]
    self.truncated += int(over_NxF.any(axis=1).sum())
    for i, name in enumerate(_FEATURES):
      self.per_feature[name] = self.per_feature.get(name, 0) + int(over_NxF[:, i].sum())
      if lengths_NxF.shape[0]:
        self.longest[name] = max(self.longest.get(name, 0), int(lengths_NxF[:, i].max()))

  def summary(self, what: str) -> str:
    """`3 of 16 training examples were longer than TASK_FEATURE_LENGTHS ...: inputs 3 ...`."""
    parts = [f"{name} {self.per_feature.get(name, 0)} (longest {self.longest.get(name, 0)} "
             f"tokens, limit {self.limits[name]})" for name in _FEATURES]
    return (f"{self.truncated} of {self.examples} {what} were longer than TASK_FEATURE_LENGTHS "
            f"and were truncated: " + ", ".join(parts))


def _untrimmed_lengths(ex) -> tf.Tensor:
  """[len(inputs), len(targets)] before any trimming (the recorded length where there is one)."""
  lengths = []
  for name in _FEATURES:
    n = tf.size(ex[name], out_type=tf.int32)
    key = prep.untrimmed_length_key(name)
    if key in ex:
      n = tf.maximum(n, tf.cast(ex[key], tf.int32))
    lengths.append(n)
  return tf.stack(lengths)


def _mark_truncation(lengths: Mapping[str, int]):
  def fn(ex):
    ex = dict(ex)
    ex[_UNTRIMMED] = _untrimmed_lengths(ex)
    for name in _FEATURES:
      ex[name] = ex[name][:lengths[name]]
    return ex
  return fn


def _records_untrimmed_lengths(task: seqio.Task) -> bool:
  return any(getattr(p, "func", p) is prep.append_eos_after_trim for p in task.preprocessors)


def _hides_trimming(task: seqio.Task) -> bool:
  return any(getattr(p, "func", p) is seqio.preprocessors.append_eos_after_trim
             for p in task.preprocessors)


def warn_if_truncation_is_hidden(task_or_mixture) -> None:
  """Tasks trimming with seqio's own `append_eos_after_trim` record nothing: say so, once."""
  tasks = getattr(task_or_mixture, "tasks", [task_or_mixture])
  hidden = sorted(t.name for t in tasks if _hides_trimming(t) and t.name not in _WARNED)
  if hidden:
    _WARNED.update(hidden)
    logging.warning("Tasks %s trim inputs/targets in their preprocessing with "
                    "seqio.preprocessors.append_eos_after_trim, so examples longer than "
                    "TASK_FEATURE_LENGTHS cannot be counted; use "
                    "prompt_tuning.data.preprocessors.append_eos_after_trim instead", hidden)


def _mixture_passthrough(task_or_mixture) -> dict[str, Any]:
  """A mixture keeps only its output features: pass the recorded lengths through if all have them."""
  if not isinstance(task_or_mixture, seqio.Mixture):
    return {}
  recording = [_records_untrimmed_lengths(t) for t in task_or_mixture.tasks]
  if all(recording):
    return {"passthrough_features": [prep.untrimmed_length_key(n) for n in _FEATURES]}
  if any(recording):
    logging.warning("Mixture %r mixes tasks that record their untrimmed lengths with tasks that "
                    "do not; truncation is counted after their preprocessing only",
                    task_or_mixture.name)
  return {}


def _feature_converter():
  spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
  return seqio.EncDecFeatureConverter(pack=False, passthrough_features={_UNTRIMMED: spec})


class TrainBatches:
  """An endless, resumable iterator of host batches (numpy dicts) for training.

  `position` counts the batches handed out; `truncation` counts examples whose inputs or
  targets were longer than TASK_FEATURE_LENGTHS before any trimming (they are truncated, never
  silently: the first batch with one logs a warning).
  """

  def __init__(self, cfg: DatasetConfig, *, start_position: int = 0,
               shard_info: seqio.ShardInfo | None = None, state_dir: str | None = None):
    self.cfg = cfg
    self.position = int(start_position)
    self.truncation = Truncation(dict(cfg.task_feature_lengths))
    shard_info = shard_info or host_shard()
    self._shard = (int(shard_info.index), int(shard_info.num_shards))
    if cfg.batch_size % shard_info.num_shards:
      raise ValueError(f"BATCH_SIZE {cfg.batch_size} is not divisible by the number of hosts "
                       f"{shard_info.num_shards}")
    self.host_batch_size = cfg.batch_size // shard_info.num_shards
    task = get_mixture_or_task(cfg.mixture_or_task_name, cfg.module)
    lengths = dict(cfg.task_feature_lengths)
    passthrough = _mixture_passthrough(task)
    warn_if_truncation_is_hidden(task)

    def build():
      # A fresh pipeline each time: iterators of one dataset object share its shuffle seed
      # generator, so a second iterator of the same object would see another order.
      ds = task.get_dataset(lengths, split=cfg.split, use_cached=cfg.use_cached,
                            shuffle=cfg.shuffle, seed=cfg.seed, shard_info=shard_info,
                            num_epochs=None, trim_output_features=False, **passthrough)
      ds = ds.map(_mark_truncation(lengths), num_parallel_calls=tf.data.AUTOTUNE)
      ds = _feature_converter()(ds, {**lengths, _UNTRIMMED: len(_FEATURES)})
      return ds.batch(self.host_batch_size, drop_remainder=True)

    self._checkpointable = True
    self._it = None
    if self.position and state_dir is not None:
      self._it = self._restore(build().prefetch(2), state_dir)
    if self._it is None:
      ds = build()
      if self.position:
        logging.info("Resuming the data stream at batch %d by replaying it", self.position)
        ds = ds.skip(self.position)
      self._it = iter(ds.prefetch(2))
    self.task = task

  # The input pipeline's state (tf.data iterator checkpoint: shuffle buffers, file positions,
  # prefetched batches) lets a resumed run continue without replaying `position` batches through
  # preprocessing. It is an optimisation only: whenever it is missing, stale or unreadable the
  # stream is replayed with `skip`, which gives the same batches.

  def _state_marker(self) -> dict[str, Any]:
    c = self.cfg
    return {"position": self.position, "mixture_or_task_name": c.mixture_or_task_name,
            "task_feature_lengths": {k: int(v) for k, v in sorted(c.task_feature_lengths.items())},
            "split": c.split, "batch_size": c.batch_size, "shuffle": c.shuffle, "seed": c.seed,
            "use_cached": c.use_cached, "shard": list(self._shard),
            "pipeline": _PIPELINE_VERSION}

  def save_state(self, state_dir: str) -> bool:
    """Writes the pipeline's state at `position` to `state_dir` (this host's own folder).

    `state.json` is written last, so a kill mid-write leaves a folder `_restore` ignores.
    Returns False (and stops trying, with one warning) for pipelines tf.data cannot checkpoint,
    e.g. Python-generator sources.
    """
    if not self._checkpointable:
      return False
    marker = os.path.join(state_dir, "state.json")
    try:
      tf.io.gfile.makedirs(state_dir)
      if tf.io.gfile.exists(marker):
        tf.io.gfile.remove(marker)
      tf.train.Checkpoint(iterator=self._it).write(os.path.join(state_dir, "iterator"))
      with tf.io.gfile.GFile(marker + ".tmp", "w") as f:
        f.write(json.dumps(self._state_marker()))
      tf.io.gfile.rename(marker + ".tmp", marker, overwrite=True)
      return True
    except (tf.errors.OpError, ValueError, TypeError) as e:
      self._checkpointable = False
      logging.warning("Cannot save the input pipeline's state (%s: %s); a resumed run will "
                      "replay the data stream instead (same batches, slower to start).",
                      type(e).__name__, str(e).splitlines()[0][:200])
      return False

  def _restore(self, ds: tf.data.Dataset, state_dir: str):
    """An iterator of `ds` restored from `state_dir`, or None (then the caller replays)."""
    marker = os.path.join(state_dir, "state.json")
    if not tf.io.gfile.exists(marker):
      logging.info("No saved input pipeline state in %s", state_dir)
      return None
    try:
      with tf.io.gfile.GFile(marker) as f:
        saved = json.load(f)
    except (tf.errors.OpError, ValueError) as e:
      logging.warning("Unreadable %s (%s)", marker, e)
      return None
    if saved != self._state_marker():
      logging.warning("The input pipeline state in %s is for another data configuration or "
                      "position (%s); replaying the data stream instead", state_dir, saved)
      return None
    it = iter(ds)
    try:
      tf.train.Checkpoint(iterator=it).read(os.path.join(state_dir, "iterator")).assert_consumed()
    except Exception as e:  # pylint: disable=broad-except  (any damage: replay is exact)
      logging.warning("Could not restore the input pipeline from %s (%s: %s); replaying the "
                      "data stream instead", state_dir, type(e).__name__,
                      str(e).splitlines()[0][:200])
      return None
    logging.info("Restored the input pipeline at batch %d from %s", self.position, state_dir)
    return it

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = {k: v.numpy() for k, v in next(self._it).items()}
    except StopIteration:
      raise ValueError(
          f"Split {self.cfg.split!r} of {self.cfg.mixture_or_task_name!r} yielded no examples "
          f"for a batch of {self.host_batch_size} (empty split, or every example filtered "
          "out). Check the data source and TFDS data dir (--tfds_data_dir).") from None
    before = self.truncation.truncated
    self.truncation.add(batch.pop(_UNTRIMMED))
    self.position += 1
    if self.truncation.truncated and not before:
      logging.warning("Batch %d: %s", self.position,
                      self.truncation.summary("training examples so far"))
    return {k: v.astype(np.int32) for k, v in batch.items()}

  @property
  def truncated_examples(self) -> int:
    return self.truncation.truncated

  @property
  def examples(self) -> int:
    return self.truncation.examples


def task_names_for_eval(name: str, module=None) -> list[str]:
  """A mixture is evaluated task by task (like T5X)."""
  task_or_mixture = get_mixture_or_task(name, module)
  tasks = getattr(task_or_mixture, "tasks", [task_or_mixture])
  return [t.name for t in tasks]


def count_truncated(task: seqio.Task, cfg: DatasetConfig, *,
                    max_examples: int | None = None) -> Truncation:
  """Which examples of `cfg.split` (the first `max_examples`) exceed TASK_FEATURE_LENGTHS.

  Evaluation data are trimmed to the lengths (as seqio.Evaluator caches them); this pass over
  the untrimmed examples counts, per feature, how many lost tokens: their own length, or the
  length our `append_eos_after_trim` recorded before trimming. Warns once per task and split.
  """
  lengths = dict(cfg.task_feature_lengths)
  ds = task.get_dataset(lengths, split=cfg.split, use_cached=cfg.use_cached, shuffle=False,
                        num_epochs=1, trim_output_features=False)
  if max_examples:
    ds = ds.take(max_examples)
  warn_if_truncation_is_hidden(task)
  truncation = Truncation(lengths)
  rows = [[max(len(ex[name]), int(ex.get(prep.untrimmed_length_key(name), 0)))
           for name in _FEATURES] for ex in ds.as_numpy_iterator()]
  if rows:
    truncation.add(np.array(rows))
  warned = (task.name, cfg.split, tuple(sorted(lengths.items())))
  if truncation.truncated and warned not in _WARNED:  # once, not at every evaluation
    _WARNED.add(warned)
    # Metrics compare the full target text; loss and token accuracy see the trimmed tokens.
    targets = ("; loss and token accuracy see the trimmed targets"
               if truncation.per_feature["targets"] else "")
    logging.warning("Evaluation of %r (%s): %s%s", task.name, cfg.split,
                    truncation.summary("examples"), targets)
  return truncation


def batches_of(features: Mapping[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict, int]]:
  """Fixed-size batches (the last padded with all-zero rows); yields (batch, real rows)."""
  n = len(next(iter(features.values())))
  for start in range(0, n, batch_size):
    rows = min(batch_size, n - start)
    batch = {}
    for k, v in features.items():
      chunk = v[start:start + rows]
      if rows < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                                chunk.dtype)])
      batch[k] = chunk
    yield batch, rows
