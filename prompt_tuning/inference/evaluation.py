"""Evaluation and inference on SeqIO tasks: `seqio.Evaluator` for the data and the metrics, our
decoding (greedy, beam, sampling, rank classification, prompt banks) for the model outputs.

`seqio.Evaluator` caches each task's evaluation split once, converts it with
`EncDecFeatureConverter(pack=False)`, and, given the model's outputs, decodes predictions with the
task's vocabulary, postprocesses targets and predictions, and calls the task's metric functions
of every kind (`predict_metric_fns`, `predict_with_aux_metric_fns`, `score_metric_fns`, metric
objects). Metric values may be scalars or `seqio.metrics.Text` / `Histogram` / `Generic` / ...:
scalars go to our TensorBoard + JSONL writer and to the results JSON, the others to TensorBoard
through `seqio.TensorBoardLogger` (text samples as text summaries), as SeqIO logs them.

`Evaluation` is built once per run (it caches the data and the compiled functions) and called at
every evaluation: during training, `prompt_tuning.eval` (also over all checkpoints) and
`prompt_tuning.infer`. Each task is evaluated by its own `seqio.Evaluator`, so a model function
always knows which task (vocabulary, rank-classification labels) it serves.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import seqio

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.inference import decoding as decoding_lib
from prompt_tuning.training import optimizers
from prompt_tuning.model import partitioning
from prompt_tuning.training import step as train_lib

log = logging.getLogger("prompt_tuning")

# The model outputs an evaluation can hand to SeqIO's metrics (T5X infer.py's modes too).
PREDICT, SCORE, PREDICT_WITH_AUX = "predict", "score", "predict_with_aux"
INFER_MODES = (PREDICT, SCORE, PREDICT_WITH_AUX)


class _QuietSeqioWarnings(logging.Filter):
  """seqio.Evaluator warns on every construction that it has no loggers (we log ourselves) and
  that fixed sequence lengths may be longer or shorter than needed (we keep TASK_FEATURE_LENGTHS
  so that one compilation serves every evaluation, and report truncation ourselves)."""

  def filter(self, record):
    message = record.getMessage()
    return not ("will not log its results" in message
                or message.startswith("Given sequence lengths"))


logging.getLogger("absl").addFilter(_QuietSeqioWarnings())


def as_text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _feature_converter() -> seqio.FeatureConverter:
  return seqio.EncDecFeatureConverter(pack=False)


@dataclasses.dataclass
class TaskData:
  """One task's evaluation split in host memory, as `seqio.Evaluator` cached it.

  `evaluator` is None when the task has no metric functions (or lacks the split's metrics): it
  can still be scored and decoded (inference), as T5X does.
  """

  task: seqio.Task
  features: dict[str, np.ndarray]   # model features [N, ...] (EncDecFeatureConverter layout)
  examples: list[dict[str, Any]]    # task features per example, incl. *_pretokenized texts
  truncation: dataset_lib.Truncation  # examples longer than TASK_FEATURE_LENGTHS, per feature
  evaluator: seqio.Evaluator | None

  @property
  def truncated_examples(self) -> int:
    return self.truncation.truncated

  @property
  def name(self) -> str:
    return self.task.name

  @property
  def vocabulary(self) -> seqio.Vocabulary:
    return self.task.output_features["targets"].vocabulary

  def __len__(self) -> int:
    return len(self.examples)


def _stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(r[k]) for r in rows]).astype(np.int32) for k in rows[0]}


def load_task_data(task_name: str, cfg: dataset_lib.DatasetConfig, *,
                   max_examples: int | None = None) -> TaskData:
  """Caches `task_name`'s split `cfg.split` with `seqio.Evaluator` (unshuffled, in order)."""
  task = dataset_lib.get_mixture_or_task(task_name, cfg.module)
  lengths = dict(cfg.task_feature_lengths)
  if cfg.split not in task.splits:
    raise ValueError(f"Task {task_name!r} has no split {cfg.split!r} (it has "
                     f"{sorted(task.splits)}); set EVAL_SPLIT / INFER_SPLIT to one of them.")
  evaluator = seqio.Evaluator(
      task_name, feature_converter=_feature_converter(), eval_split=cfg.split,
      use_cached=cfg.use_cached, seed=cfg.seed, sequence_length=lengths,
      num_examples=max_examples, shuffle=False, logger_cls=(), async_compute_metrics=False)
  if evaluator.eval_tasks:
    model_ds = evaluator.cached_model_datasets[task_name]
    task_ds = evaluator.cached_task_datasets[task_name]
  else:  # no metrics: build the same datasets the way the evaluator does
    evaluator = None
    task_ds = task.get_dataset(lengths, split=cfg.split, shuffle=False, num_epochs=1,
                               seed=cfg.seed, use_cached=cfg.use_cached)
    if max_examples:
      task_ds = task_ds.take(max_examples)
    task_ds = task_ds.cache()
    model_ds = _feature_converter()(task_ds, lengths).enumerate()
  indexed = list(model_ds.as_numpy_iterator())
  if not indexed:
    raise ValueError(f"Split {cfg.split!r} of task {task_name!r} has no examples; check the "
                     "data source (and --tfds_data_dir) or pick another split.")
  assert [int(i) for i, _ in indexed] == list(range(len(indexed)))
  features = _stack([f for _, f in indexed])
  examples = list(task_ds.as_numpy_iterator())
  truncation = dataset_lib.count_truncated(task, cfg, max_examples=max_examples)
  return TaskData(task, features, examples, truncation, evaluator)


# ------------------------------------------------------------------------------------------------
# Metric values

def split_metric_values(values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
  """A task's metric results as (scalars, other `seqio.metrics.MetricValue`s).

  Metric functions return plain numbers, `seqio.metrics.Scalar`, or non-scalar values such as
  `seqio.metrics.Text` (text samples), `Histogram`, `Image`, `Audio` or `Generic`.
  """
  scalars, others = {}, {}
  for k, v in values.items():
    if isinstance(v, seqio.metrics.Scalar):
      scalars[k] = float(np.asarray(v.value))
    elif isinstance(v, seqio.metrics.MetricValue):
      others[k] = v
    else:
      scalars[k] = float(np.asarray(v))
  return scalars, others


def describe_value(v) -> Any:
  """A JSON-friendly summary of a non-scalar metric value."""
  if isinstance(v, seqio.metrics.Text):
    return as_text(v.textdata)
  if isinstance(v, seqio.metrics.Histogram):
    values = np.asarray(v.values)
    return {"histogram": {"count": int(values.size), "mean": float(values.mean()) if values.size
                          else None}}
  return {"type": type(v).__name__}


def log_metric_values(log_dir: str | None, step: int | None,
                      values: Mapping[str, Mapping[str, Any]]) -> None:
  """Non-scalar metric values per task to TensorBoard (`log_dir/<task>/`), as SeqIO does."""
  values = {t: v for t, v in values.items() if v}
  if not values or jax.process_index() != 0:
    return
  for task_name, task_values in values.items():
    for k, v in task_values.items():
      if isinstance(v, seqio.metrics.Text):
        text = as_text(v.textdata)
        log.info("eval %s/%s:\n%s", task_name, k, text if len(text) < 2000 else
                 text[:2000] + f"\n... ({len(text)} characters)")
  if log_dir:
    logger = seqio.TensorBoardLogger(output_dir=str(log_dir))
    for task_name, task_values in values.items():
      logger(task_name=task_name, step=-1 if step is None else int(step), metrics=task_values,
             dataset=None, inferences=None, targets=None)


# ------------------------------------------------------------------------------------------------
# The evaluation of one run

@dataclasses.dataclass
class TaskResult:
  metrics: dict[str, float]          # loss, token_accuracy, examples, truncated, task scalars
  values: dict[str, Any]             # non-scalar metric values (seqio.metrics.Text, ...)
  outputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # model outputs (inference)


def task_decoding_config(cfg: decoding_lib.DecodingConfig | None, task_name: str, vocab,
                         dataset_cfg: dataset_lib.DatasetConfig) -> decoding_lib.DecodingConfig:
  """Greedy to the target length by default; rank classification gets the task's labels."""
  cfg = cfg or decoding_lib.DecodingConfig(
      max_decode_length=dataset_cfg.task_feature_lengths["targets"])
  if cfg.method == "rank_classification" and cfg.candidate_targets is None:
    labels = dataset_lib.class_labels(task_name, dataset_cfg.module)
    if not labels:
      raise ValueError(
          f"Rank classification of {task_name!r} needs candidate targets and the task library "
          "has no class labels for it: set CANDIDATE_TARGETS to the labels' token ids "
          "(see gin/decoding/rank_classification.gin), or decode instead.")
    cfg = dataclasses.replace(cfg, candidate_targets=tuple(
        tuple(vocab.encode(label)) + (cfg.eos_id,) for label in labels))
  return cfg


def compute_task_metrics(data: TaskData, *, step: int | None = None,
                         predict: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
                         score: Callable[[], np.ndarray] | None = None) -> dict[str, Any]:
  """The task's metrics through `seqio.Evaluator`, from our model outputs.

  `predict()` returns `(tokens_NxT, scores_N)` (the decodes and their log-likelihoods, handed to
  prediction metrics and, as `aux_values["scores"]`, to predict-with-aux metrics); `score()`
  returns each target's log-likelihood `[N]` (score metrics). They are called only if a metric
  needs them, at most once each.
  """
  if data.evaluator is None:
    return {}

  @functools.cache
  def predictions():
    if predict is None:
      raise ValueError(f"Task {data.name!r} has prediction metrics but no decoding was given")
    tokens, scores = predict()
    return [(i, tokens[i]) for i in range(len(data))], {"scores": list(np.asarray(scores))}

  def score_fn(ds):
    del ds
    if score is None:
      raise ValueError(f"Task {data.name!r} has score metrics but no scoring was given")
    values = np.asarray(score())
    return [(i, float(values[i])) for i in range(len(data))]

  future, _ = data.evaluator.evaluate(
      compute_metrics=True, step=step, predict_fn=lambda ds: predictions()[0],
      predict_with_aux_fn=lambda ds: predictions(), score_fn=score_fn)
  return future.result()[data.name]


def _merged(fn):
  return lambda t, f, *a: fn(optimizers.merge_params(t, f), *a)


class Evaluation:
  """The evaluation of a task or mixture with one setup: data and compiled functions, cached.

  `run(trainable, step)` computes, per task, the teacher-forced loss and token accuracy, the
  model outputs the task's metrics need, and the metrics. Build it once and call it at every
  evaluation period: nothing is recompiled.
  """

  def __init__(self, setup, dataset_cfg: dataset_lib.DatasetConfig, *,
               decoding_config: decoding_lib.DecodingConfig | None = None,
               max_examples: int | None = None, batch_size: int | None = None,
               random_seed: int = 0):
    self.setup = setup
    self.dataset_cfg = dataset_cfg
    self.batch_size = batch_size or dataset_cfg.batch_size
    self.rng = jax.random.PRNGKey(random_seed)
    names = dataset_lib.task_names_for_eval(dataset_cfg.mixture_or_task_name,
                                            dataset_cfg.module)
    if len(names) > 1:  # a mixture: as T5X, skip its tasks without this split
      kept = [n for n in names if dataset_cfg.split in
              dataset_lib.get_mixture_or_task(n, dataset_cfg.module).splits]
      if not kept:
        raise ValueError(f"No task of {dataset_cfg.mixture_or_task_name!r} has a split "
                         f"{dataset_cfg.split!r}; set EVAL_SPLIT / INFER_SPLIT.")
      for n in sorted(set(names) - set(kept)):
        log.warning("Skipping %s: it has no %r split", n, dataset_cfg.split)
      names = kept
    self.tasks: list[TaskData] = [load_task_data(name, dataset_cfg, max_examples=max_examples)
                                  for name in names]
    self.decoding = {t.name: task_decoding_config(decoding_config, t.name, t.vocabulary,
                                                  dataset_cfg) for t in self.tasks}
    module, model = setup.module, setup.model
    self._loss = jax.jit(functools.partial(train_lib.eval_step, model=model))
    self._score = jax.jit(_merged(model.score_batch))
    self._decode: dict[Any, Callable] = {}  # one compiled decoder per decoding config
    for cfg in set(self.decoding.values()):
      self._decode[cfg] = jax.jit(_merged(
          lambda params, batch, rng, cfg=cfg: decoding_lib.decode(module, params, batch, cfg,
                                                                  rng=rng)))
    self._beams: dict[Any, Callable] = {}

  @property
  def decoding_method(self) -> str:
    methods = sorted({c.method for c in self.decoding.values()})
    return "+".join(methods)

  def _batches(self, data: TaskData):
    part = self.setup.partitioner
    for batch, rows in dataset_lib.batches_of(data.features, self.batch_size):
      # Padded rows have no targets, so they add nothing to the sums.
      yield part.shard_batch(partitioning.host_rows(batch)), rows

  def loss(self, trainable, data: TaskData) -> dict[str, float]:
    sums = {"loss": 0.0, "correct_tokens": 0.0, "target_tokens": 0.0}
    with self.setup.partitioner.activate():
      for batch, _ in self._batches(data):
        out = self._loss(trainable, self.setup.frozen, batch)
        for k in sums:
          sums[k] += float(partitioning.to_host(out[k]))
    return {"loss": sums["loss"] / max(sums["target_tokens"], 1.0),
            "token_accuracy": sums["correct_tokens"] / max(sums["target_tokens"], 1.0)}

  def predict(self, trainable, data: TaskData) -> tuple[np.ndarray, np.ndarray]:
    """Decoded tokens `[N, T]` and their log-likelihoods `[N]` (rank classification: the
    winning label and its score)."""
    fn = self._decode[self.decoding[data.name]]
    tokens, scores = [], []
    with self.setup.partitioner.activate():
      for i, (batch, rows) in enumerate(self._batches(data)):
        t, s = fn(trainable, self.setup.frozen, batch, jax.random.fold_in(self.rng, i))
        tokens.append(partitioning.to_host(t)[:rows])
        scores.append(partitioning.to_host(s)[:rows])
    return np.concatenate(tokens), np.concatenate(scores)

  def score(self, trainable, data: TaskData) -> np.ndarray:
    """Each example's target log-likelihood (summed over its target tokens), `[N]`."""
    out = []
    with self.setup.partitioner.activate():
      for batch, rows in self._batches(data):
        out.append(partitioning.to_host(self._score(trainable, self.setup.frozen, batch))[:rows])
    return np.concatenate(out)

  def n_best(self, trainable, data: TaskData, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Beam search's `n` best hypotheses: tokens `[N, n, T]`, scores `[N, n]`, best first."""
    cfg = self.decoding[data.name]
    if cfg.method != "beam":
      raise ValueError(f"N-best outputs need beam search (--gin_file=decoding/beam_search.gin); "
                       f"the decoding is {cfg.method!r}")
    if not 0 < n <= cfg.num_beams:
      raise ValueError(f"NUM_RETURN_SEQUENCES={n} must be between 1 and the number of beams "
                       f"({cfg.num_beams}, BEAM_SIZE)")
    if cfg not in self._beams:
      module = self.setup.module
      self._beams[cfg] = jax.jit(_merged(lambda params, batch, cfg=cfg: decoding_lib.beam_search(
          module, params, batch["encoder_input_tokens"], max_decode_length=cfg.max_decode_length,
          num_beams=cfg.num_beams, alpha=cfg.alpha, eos_id=cfg.eos_id, return_all_beams=True)))
    tokens, scores = [], []
    with self.setup.partitioner.activate():
      for batch, rows in self._batches(data):
        t, s = self._beams[cfg](trainable, self.setup.frozen, batch)
        tokens.append(partitioning.to_host(t)[:rows, :n])
        scores.append(partitioning.to_host(s)[:rows, :n])
    return np.concatenate(tokens), np.concatenate(scores)

  def run(self, trainable, *, step: int | None = None) -> dict[str, TaskResult]:
    """Loss, token accuracy and the task's metrics for every task."""
    results = {}
    for data in self.tasks:
      metrics = self.loss(trainable, data)
      metrics.update(examples=float(len(data)), truncated_examples=float(data.truncated_examples))
      values = compute_task_metrics(
          data, step=step, predict=lambda data=data: self.predict(trainable, data),
          score=lambda data=data: self.score(trainable, data))
      scalars, others = split_metric_values(values)
      clash = set(scalars) & set(metrics)
      if clash:
        raise ValueError(f"Task {data.name!r} reports metrics named {sorted(clash)}, which the "
                         "evaluation reports itself; rename them in the task's metric_fns.")
      metrics.update(scalars)
      results[data.name] = TaskResult(metrics, others)
      log.info("eval %s: %s", data.name, {k: round(v, 4) for k, v in metrics.items()})
    return results


def scalars(results: Mapping[str, TaskResult]) -> dict[str, dict[str, float]]:
  return {t: r.metrics for t, r in results.items()}


def metric_values(results: Mapping[str, TaskResult]) -> dict[str, dict[str, Any]]:
  """Every metric of every task as a `seqio.metrics.MetricValue` (scalars wrapped)."""
  return {t: {**{k: seqio.metrics.Scalar(v) for k, v in r.metrics.items()}, **r.values}
          for t, r in results.items()}


def samples(results: Mapping[str, TaskResult]) -> dict[str, dict[str, Any]]:
  return {t: {k: describe_value(v) for k, v in r.values.items()}
          for t, r in results.items() if r.values}


__all__ = ["Evaluation", "TaskData", "TaskResult", "load_task_data", "compute_task_metrics",
           "split_metric_values", "log_metric_values", "task_decoding_config", "INFER_MODES"]
