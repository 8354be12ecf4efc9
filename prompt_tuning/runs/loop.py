"""The training loop behind `python -m prompt_tuning.train`: prompt-only steps on sharded batches,
with logging, checkpoints, evaluation, early stopping and clean stops.

A run: load the frozen checkpoint (INITIAL_CHECKPOINT_PATH) -> add a prompt (its initialiser)
-> resume the trainable state from MODEL_DIR if it has a checkpoint of a run with the same
settings -> loop: train step; log; checkpoint; evaluate. Plain functions with keyword arguments
and typed configs (`CheckpointConfig`, `EvalConfig`); gin files only wire them (gin/runs/).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.formats import storage
from prompt_tuning.inference import decoding as decoding_lib
from prompt_tuning.inference import evaluation as evaluation_lib
from prompt_tuning.model import partitioning
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.runs import settings as settings_lib
from prompt_tuning.runs.guards import (Interrupted, NonFiniteLossError, NonFiniteWatch,
                                       Preemption, nonfinite_message)
from prompt_tuning.runs.run_log import MetricWriter, fmt_seconds, write_json
from prompt_tuning.runs.setup import (PartitionConfig, PromptInit, Setup, build, check_positive,
                                      check_required)
from prompt_tuning.training import checkpoints as checkpoints_lib
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as step_lib

log = logging.getLogger("prompt_tuning")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what a training run saves (gin: `runs.CheckpointConfig`)."""

  period: int = 1000  # CHECKPOINT_PERIOD; the last step is always saved
  keep: int | None = 3  # KEEP_CHECKPOINTS; None keeps every checkpoint
  save_frozen: bool = False  # also save the frozen parameters in each checkpoint
  # Early stopping as in the paper: MODEL_DIR/best keeps the checkpoint with the best value of
  # this dev metric ("task/metric", or "metric" averaged over the evaluated tasks).
  best_metric: str | None = None
  best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during training (gin: `runs.EvalConfig`; `runs.train.evaluation=None` skips it)."""

  dataset: dataset_lib.DatasetConfig | None = None  # None: no evaluation
  period: int = 1000  # EVAL_PERIOD; the last step is always evaluated
  max_examples: int | None = None  # EVAL_MAX_EXAMPLES per task
  decoding: decoding_lib.DecodingConfig | None = None  # None: the task's default (greedy or rank)
  at_start: bool = False  # also evaluate the initial prompt of a fresh run (step 0)


def train(*, model_dir: str, train_dataset: dataset_lib.DatasetConfig, train_steps: int,
          model_config: T5Config | None = None,
          prompt_config: PromptConfig | None = PromptConfig(),
          initial_checkpoint_path: str | None = None,
          prompt_init: PromptInit = PromptInit(),
          optimizer: Callable[[], optax.GradientTransformation] | optax.GradientTransformation
          | None = None,
          trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
          partition: PartitionConfig = PartitionConfig(),
          checkpoints: CheckpointConfig = CheckpointConfig(),
          evaluation: EvalConfig | None = None,
          num_microbatches: int = 1, random_seed: int = 42,
          frozen_param_dtype: str = "float32", log_period: int = 10,
          skip_nonfinite: bool = False, allow_random_init: bool = False,
          model_kwargs: Mapping[str, Any] | None = None,
          model_runtime: Mapping[str, Any] | None = None,
          allow_changed_settings: bool = False, allow_nonfinite_frozen: bool = False,
          run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Prompt-tunes (or, with ALL_PATTERNS, model-tunes) and returns the final metrics.

  A MODEL_DIR with a checkpoint is resumed if its run had the same settings (`run_settings`),
  else refused, unless `allow_changed_settings`. SIGTERM and Ctrl-C save the current step and
  return `{"preempted_at": step, "signal": ...}`. `run_config`: how gin configured the run, for
  its record (see `run_settings`; the train command line passes it).
  """
  evaluation = evaluation if evaluation is not None and evaluation.dataset is not None else None
  check_required(MODEL_DIR=model_dir, MIXTURE_OR_TASK_NAME=train_dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("KEEP_CHECKPOINTS", "EVAL_MAX_EXAMPLES"), TRAIN_STEPS=train_steps,
                 CHECKPOINT_PERIOD=checkpoints.period, KEEP_CHECKPOINTS=checkpoints.keep,
                 NUM_MICROBATCHES=num_microbatches, **{"runs.train.log_period": log_period},
                 **({"EVAL_PERIOD": evaluation.period,
                     "EVAL_MAX_EXAMPLES": evaluation.max_examples} if evaluation else {}))
  checkpoints_lib.check_writable(model_dir)
  # An unknown task fails here, with close names, before a large checkpoint is loaded.
  task = dataset_lib.get_mixture_or_task(train_dataset.mixture_or_task_name, train_dataset.module)
  setup = build(model_config=model_config, prompt_config=prompt_config,
                initial_checkpoint_path=initial_checkpoint_path, partition=partition,
                trainable_patterns=trainable_patterns,
                task_feature_lengths=train_dataset.task_feature_lengths,
                prompt_init=prompt_init, random_seed=random_seed,
                frozen_param_dtype=frozen_param_dtype,
                task_name=train_dataset.mixture_or_task_name, task_module=train_dataset.module,
                allow_random_init=allow_random_init, model_kwargs=model_kwargs,
                model_runtime=model_runtime, allow_nonfinite_frozen=allow_nonfinite_frozen)
  for t in getattr(task, "tasks", [task]):
    dataset_lib.check_vocabulary(t, setup.module.config.vocab_size)
  if train_dataset.batch_size % setup.partitioner.data_parallel_size:
    raise ValueError(f"BATCH_SIZE {train_dataset.batch_size} is not divisible by the "
                     f"{setup.partitioner.data_parallel_size} data-parallel devices; use a "
                     "multiple of it.")
  settings = settings_lib.run_settings(
      train_dataset=train_dataset, prompt_config=prompt_config, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, initial_checkpoint_path=initial_checkpoint_path,
      model_config=setup.module.config, frozen_param_dtype=frozen_param_dtype,
      num_microbatches=num_microbatches, random_seed=random_seed, model_kwargs=model_kwargs,
      optimizer=optimizer, run_config=run_config)
  run = _TrainingRun(
      model_dir, setup, train_dataset, _optimizer(optimizer), checkpoints, evaluation,
      settings=settings, initial_checkpoint_path=initial_checkpoint_path,
      prompt_config=prompt_config, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, num_microbatches=num_microbatches,
      random_seed=random_seed, log_period=log_period, skip_nonfinite=skip_nonfinite,
      allow_changed_settings=allow_changed_settings)
  return run.loop(train_steps)


def _optimizer(optimizer) -> optax.GradientTransformation:
  if optimizer is None:
    return optimizers.prompt_tuning_optimizer()
  if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
    return optimizer
  return optimizer()  # a factory, e.g. gin's @optimizers.prompt_tuning_optimizer


class _TrainingRun:
  """One training run's state: the trainable state, its checkpoints, data, writers and eval."""

  def __init__(self, model_dir, setup: Setup, train_dataset: dataset_lib.DatasetConfig,
               tx: optax.GradientTransformation, checkpoints: CheckpointConfig,
               evaluation: EvalConfig | None, *, settings, initial_checkpoint_path, prompt_config,
               prompt_init, trainable_patterns, num_microbatches, random_seed, log_period,
               skip_nonfinite, allow_changed_settings):
    self.model_dir, self.setup, self.train_dataset = model_dir, setup, train_dataset
    self.checkpoints, self.eval_config, self.settings = checkpoints, evaluation, settings
    self.log_period, self.skip_nonfinite = log_period, skip_nonfinite
    self.ckpt = checkpoints_lib.Checkpointer(model_dir, keep=checkpoints.keep,
                                             save_frozen=checkpoints.save_frozen,
                                             cleanup_tmp=True)
    self._record = {"initial_checkpoint_path": initial_checkpoint_path,
                    "model_config": setup.module.config.to_dict(),
                    "prompt_config": dataclasses.asdict(prompt_config) if prompt_config else None,
                    "trainable_patterns": list(trainable_patterns),
                    "mixture_or_task_name": train_dataset.mixture_or_task_name}
    with setup.partitioner.activate():
      self.state = jax.jit(lambda t: step_lib.create_train_state(t, tx))(setup.trainable)
    self.latest = self.ckpt.latest_step()
    start_position = self._resume(initial_checkpoint_path, prompt_config,
                                  allow_changed_settings) if self.latest is not None else 0
    if self.latest is None:
      log.info("No checkpoint in %s: starting from %s with a fresh prompt (%s)", model_dir,
               initial_checkpoint_path or "random weights", prompt_init.kind)
    # Each host's input pipeline state, saved beside each checkpoint (see `DataStates`).
    self.data_states = checkpoints_lib.DataStates(model_dir)
    self.batches = dataset_lib.TrainBatches(
        train_dataset, start_position=start_position, shard_info=dataset_lib.host_shard(),
        state_dir=self.data_states.path(self.latest) if self.latest is not None else None)
    self.step_fn = step_lib.jit_train_step(setup.model, tx, num_microbatches=num_microbatches,
                                           skip_nonfinite=skip_nonfinite,
                                           learning_rate_fn=getattr(tx, "schedule", None))
    self.rng = jax.random.PRNGKey(random_seed)
    # Only the steps up to the restored checkpoint stay logged: the rest are replayed.
    resume_step = int(self.state.step) if self.latest is not None else None
    self.writer = MetricWriter(model_dir, "train", resume_step=resume_step)
    self.eval_writer = MetricWriter(model_dir, "eval", resume_step=resume_step)
    self.n_trainable = _count(self.state.params)
    self.n_frozen = _count(setup.frozen)
    log.info("Trainable parameters: %d; frozen: %d", self.n_trainable, self.n_frozen)
    self.best = (checkpoints_lib.BestCheckpoint(model_dir, checkpoints.best_metric,
                                                checkpoints.best_mode)
                 if checkpoints.best_metric else None)
    self.evaluation = None
    if evaluation is not None:  # data cached and functions compiled once for the whole run
      self.evaluation = evaluation_lib.Evaluation(
          setup, evaluation.dataset, decoding_config=evaluation.decoding,
          max_examples=evaluation.max_examples, random_seed=random_seed)
    self.watch = NonFiniteWatch()
    self.last_saved = self.latest
    self._settings_written = False

  def loop(self, train_steps: int) -> dict[str, Any]:
    """The loop: step, and at their periods check, log, save and evaluate; stop on a signal."""
    step, ev, every = int(self.state.step), self.eval_config, lambda n: step % n == 0
    initial_eval, final_eval = {}, {}
    if ev is not None and ev.at_start and self.latest is None:
      initial_eval = self.evaluate(step)
    t_start = self._t_window = time.time()
    self._window_steps = 0
    part = self.setup.partitioner
    with Preemption() as preemption, part.activate():
      while step < train_steps:
        batch = part.shard_batch(next(self.batches))
        self.state, metrics = self.step_fn(self.state, self.setup.frozen, batch, self.rng)
        step += 1
        self._window_steps += 1
        # `finite` (loss, gradients, new parameters and their norms) stays on the device until
        # the next log, save, evaluation or signal: no host sync per step.
        self.watch.add(step, metrics)
        last = step == train_steps
        log_due, save_due = every(self.log_period) or last, every(self.checkpoints.period) or last
        eval_due = ev is not None and (every(ev.period) or last)
        if log_due or save_due or eval_due or preemption.requested:
          self.check_finite()
        if log_due:
          self.log(step, train_steps, metrics)
        if save_due:
          self.save(step)
        if preemption.requested:  # checked after the periodic save: never saves a step twice
          return self.stop(step, preemption.signal_name)
        if eval_due:
          final_eval = self.evaluate(step)
    if self.batches.truncated_examples:
      log.warning("%s", self.batches.truncation.summary("training examples"))
    self.close()
    return {"step": step, "eval": final_eval, "initial_eval": initial_eval,
            "seconds": time.time() - t_start, "trainable_params": self.n_trainable,
            "frozen_params": self.n_frozen,
            "truncated_examples": self.batches.truncated_examples}

  def _resume(self, initial_checkpoint_path, prompt_config, allow_changed_settings) -> int:
    """Restores the latest checkpoint of a run with the same settings; returns its data position."""
    latest, ckpt = self.latest, self.ckpt
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
    try:
      settings_lib.check_resumable(ckpt, latest, self.state.params,
                                   config=self.setup.module.config, prompt_config=prompt_config)
      try:
        saved_meta = ckpt.read_metadata(latest)
      except (OSError, ValueError):
        saved_meta = None  # unreadable: the restore below reports the checkpoint as corrupted
      if saved_meta is not None:
        settings_lib.check_same_settings(saved_meta, self.settings, model_dir=self.model_dir,
                                         step=latest, allow=allow_changed_settings,
                                         initial_checkpoint_path=initial_checkpoint_path)
      restored, meta, _ = ckpt.restore(latest, abstract)
    except ValueError:
      ckpt.close()  # stop orbax's threads before the error ends the run
      raise
    self.state = step_lib.TrainState(step=restored["step"], params=restored["params"],
                                     opt_state=restored["opt_state"])
    ckpt.ensure_numpy_export(latest, self.state.params)
    log.info("Resumed from %s at step %d", ckpt.directory / str(latest), int(self.state.step))
    return int(meta.get("data_position", int(self.state.step)))

  def metadata(self) -> dict[str, Any]:
    return {**self._record, "data_position": self.batches.position,
            "trainable_shapes": settings_lib.shapes(self.state.params),
            "truncated_examples": self.batches.truncated_examples,
            "seen_examples": self.batches.examples, "run_settings": self.settings}

  def check_finite(self) -> None:
    """Fetches the non-finite watch (one host sync): before anything is logged, saved or
    evaluated. Stops the run (the last good checkpoint is kept) unless skip_nonfinite."""
    first_bad = self.watch.fetch()
    if first_bad is None:
      return
    if not self.skip_nonfinite:
      self.ckpt.close()
      raise NonFiniteLossError(nonfinite_message(self.watch.first_metrics, first_bad,
                                                 self.last_saved, self.setup.nonfinite_frozen))
    log.warning("Skipped %d non-finite batches (the first at step %d)", self.watch.skipped,
                first_bad)
    self.watch.reset()

  def log(self, step: int, train_steps: int, metrics) -> None:
    m = {k: float(partitioning.to_host(v)) for k, v in metrics.items()}
    now = time.time()
    rate = self._window_steps / max(now - self._t_window, 1e-9)
    self._t_window, self._window_steps = now, 0
    lengths = self.train_dataset.task_feature_lengths
    m["steps_per_sec"] = rate
    # padded input + target tokens
    m["tokens_per_sec"] = rate * self.train_dataset.batch_size * sum(lengths.values())
    m["truncated_examples"] = self.batches.truncated_examples
    log.info("step %d/%d loss %.4f acc %.3f %.2f steps/s ETA %s truncated %d", step, train_steps,
             m["loss"], m["accuracy"], rate,
             fmt_seconds((train_steps - step) / max(rate, 1e-9)), self.batches.truncated_examples)
    self.writer.write(step, m)

  def save(self, step: int) -> None:
    """Saves `step`; a Ctrl-C during the save stops the run without a half-written checkpoint."""
    try:
      # The data state first: a committed checkpoint then has one unless writing it failed,
      # and a missing one only costs a replay of the data stream on resume.
      self.batches.save_state(self.data_states.path(step))
      self.ckpt.save(step, self.state, self.metadata(),
                     frozen=self.setup.frozen if self.checkpoints.save_frozen else None)
      self.data_states.keep_only(self.ckpt.all_steps())
      if not self._settings_written and jax.process_index() == 0:
        # What eval and infer read (also in each checkpoint's metadata).
        write_json(storage.join(self.model_dir, settings_lib.RUN_SETTINGS_FILE), self.settings)
        self._settings_written = True
      log.info("Saved checkpoint %d to %s", step, self.ckpt.directory)
    except KeyboardInterrupt:
      raise Interrupted(
          f"Ctrl-C during the save of checkpoint {step}: stopped. orbax commits a checkpoint "
          f"only when it is complete, so {self.ckpt.directory} holds all of checkpoint {step} "
          "or none of it; rerun the same command to resume from the latest complete one."
      ) from None
    self.last_saved = step

  def evaluate(self, step: int) -> dict[str, Any]:
    results = self.evaluation.run(self.state.params, step=step)
    for task_name, r in results.items():
      self.eval_writer.write(step, {f"{task_name}/{k}": v for k, v in r.metrics.items()})
    evaluation_lib.log_metric_values(os.path.join(str(self.model_dir), "eval"), step,
                                     {t: r.values for t, r in results.items()})
    scalars = evaluation_lib.scalars(results)
    if self.best is not None:
      self.best.update(step, scalars, self.state, self.metadata())
    return scalars

  def stop(self, step: int, signal_name: str) -> dict[str, Any]:
    """A signal came: saves the current step (unless just saved) and ends the run."""
    self.check_finite()  # the signal may have come after this step's check
    if self.last_saved != step:
      log.warning("%s: saving step %d before exiting%s", signal_name, step,
                  " (Ctrl-C again aborts the save)" if signal_name == "SIGINT" else "")
      self.save(step)
    self.close()
    log.warning("%s: saved step %d in %s; rerun the same command to resume", signal_name, step,
                self.ckpt.directory)
    return {"preempted_at": step, "signal": signal_name}

  def close(self) -> None:
    self.ckpt.close()
    if self.best is not None:
      self.best.checkpointer.close()


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
