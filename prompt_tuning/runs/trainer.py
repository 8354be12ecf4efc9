"""Train, evaluate and infer: the library functions behind `python -m prompt_tuning.{train,eval,infer}`.

Plain functions with keyword arguments; gin files only wire them (see gin/runs/). A run:
  load the frozen checkpoint (INITIAL_CHECKPOINT_PATH) -> add a prompt (initialiser) ->
  resume the trainable state from MODEL_DIR if it has a checkpoint (of a run with the same
  settings) -> loop: prompt-only train step on sharded batches; log; checkpoint; evaluate.

A run records its settings (`run_settings`) in each checkpoint's metadata and in
MODEL_DIR/run_settings.json: a resume compares them, and eval/infer take the task, lengths,
prompt and frozen model from them when the command line does not give them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_tuning.training import checkpoints as checkpoints_lib
from prompt_tuning.model import config as config_lib
from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.inference import decoding as decoding_lib
from prompt_tuning.inference import evaluation as evaluation_lib
from prompt_tuning.prompts import initializers
from prompt_tuning.training import optimizers
from prompt_tuning.model import partitioning
from prompt_tuning.model import scan_conversion
from prompt_tuning.formats import storage
from prompt_tuning.training import step as train_lib
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5
from prompt_tuning.training.objective import EncoderDecoderModel
from prompt_tuning.model.prompt import PromptConfig

log = logging.getLogger("prompt_tuning")


class NonFiniteLossError(RuntimeError):
  pass


class Interrupted(KeyboardInterrupt):
  """A second Ctrl-C stopped the run (the first asked it to save and exit); says where."""


@dataclasses.dataclass(frozen=True)
class PromptInit:
  """How a fresh prompt is initialised (see `prompt_tuning.prompts.initializers`)."""

  kind: str = "random_uniform"  # random_uniform | sampled_vocab | class_labels | from_string | from_file
  labels: Sequence[str] | None = None  # class_labels: CLASS_LABELS (default: the task's labels)
  text: str | None = None              # from_string
  path: str | None = None              # from_file: PROMPT_FILE (.npy, extension-less, PEFT dir)
  low: float = -0.5                    # random_uniform: the paper's U[-0.5, 0.5]
  high: float = 0.5
  population: int = 5000               # sampled_vocab / class_labels: first N vocabulary rows


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  num_partitions: int | None = None
  model_parallel_submesh: Sequence[int] | None = None
  mesh_shape: Sequence[int] | None = None
  parameter_partitioning_dims: int = 1
  num_devices: int | None = None  # use only the first N devices (default: all)

  def create(self) -> partitioning.Partitioner:
    return partitioning.Partitioner.create(
        self.num_partitions, model_parallel_submesh=self.model_parallel_submesh,
        mesh_shape=self.mesh_shape, parameter_partitioning_dims=self.parameter_partitioning_dims,
        num_devices=self.num_devices)


@dataclasses.dataclass
class Setup:
  """Everything a train/eval/infer run builds before its loop."""

  module: T5
  model: EncoderDecoderModel
  partitioner: partitioning.Partitioner
  trainable: Any
  frozen: Any
  trainable_shardings: Any
  frozen_shardings: Any
  initial_checkpoint_path: str | None
  nonfinite_frozen: tuple[str, ...] = ()  # frozen parameters with NaN/Inf (allowed on request)


# ------------------------------------------------------------------------------------------------
# Building the model and its parameters

def check_required(**values) -> None:
  """gin passes `%gin.REQUIRED` macros that nobody set as a bare sentinel object."""
  for name, value in values.items():
    if type(value) is object:  # pylint: disable=unidiomatic-typecheck
      raise ValueError(f"{name} is required: pass --gin.{name}=... (strings need inner quotes, "
                       f"e.g. --gin.{name}=\"'value'\")")


def check_positive(allow_none=(), **values) -> None:
  """Step counts, periods and sizes of 0 or less would run and silently do nothing: refuse them.

  Names in `allow_none` may be None (no limit, keep all)."""
  for name, value in values.items():
    if value is None and name in allow_none:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      none = " or None (no limit)" if name in allow_none else ""
      raise ValueError(f"{name} must be a positive integer{none}, got {value!r}: pass e.g. "
                       f"--gin.{name}=10")


def _targets_vocabulary(task_name: str | None, module=None):
  if not task_name:
    return None
  task = dataset_lib.get_mixture_or_task(task_name, module)
  tasks = getattr(task, "tasks", [task])
  return tasks[0].output_features["targets"].vocabulary


@jax.jit
def _nonfinite_counts(leaves) -> jax.Array:
  return jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])


def _check_frozen_finite(frozen, *, source: str | None, dtype: str,
                         allow: bool) -> tuple[str, ...]:
  """Names the frozen parameters holding NaN or Inf; refuses them unless `allow`.

  One jitted pass over the frozen tree at load: otherwise a damaged checkpoint shows up hours
  later as a NaN loss, with learning-rate advice that cannot help.
  """
  import flax
  flat = {k: v for k, v in flax.traverse_util.flatten_dict(frozen, sep="/").items()
          if jnp.issubdtype(v.dtype, jnp.inexact)}
  if not flat:
    return ()
  counts = partitioning.to_host(_nonfinite_counts(list(flat.values())))
  bad = [(k, int(n), int(np.prod(v.shape))) for (k, v), n in zip(flat.items(), counts) if n]
  if not bad:
    return ()
  listed = ", ".join(f"{k} ({n} of {size} values)" for k, n, size in bad[:10])
  listed += f" and {len(bad) - 10} more" if len(bad) > 10 else ""
  what = f"The frozen checkpoint {source}" if source else "The randomly initialised model"
  overflow = ("" if jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16, jnp.float64) else
              f" (or its values overflow FROZEN_PARAM_DTYPE={dtype!r})")
  if allow:
    log.warning("%s has NaN or Inf values in %s; going on as allow_nonfinite_frozen=True asks",
                what, listed)
    return tuple(k for k, _, _ in bad)
  raise ValueError(
      f"{what} has NaN or Inf values in {listed}: the checkpoint is damaged{overflow} (a "
      "download or copy cut short, a disk error, or the run that wrote it diverged). Use a good "
      "copy of it. Only if you know these values are never used, pass "
      "--gin.runs.train.allow_nonfinite_frozen=True (or runs.evaluate / runs.infer).")


def build(*, model_config: T5Config | None, prompt_config: PromptConfig | None,
          initial_checkpoint_path: str | None, partition: PartitionConfig,
          trainable_patterns: Sequence[str], task_feature_lengths: Mapping[str, int],
          prompt_init: PromptInit, random_seed: int, frozen_param_dtype: str = "float32",
          task_name: str | None = None, task_module=None, allow_random_init: bool = False,
          model_kwargs: Mapping[str, Any] | None = None,
          model_runtime: Mapping[str, Any] | None = None,
          allow_nonfinite_frozen: bool = False) -> Setup:
  """Loads the frozen model, adds and initialises the prompt, splits and places the parameters.

  The architecture comes from the checkpoint when it carries one, else from `model_config`. The
  runtime fields (`config.RUNTIME_FIELDS`: dtype, dropout, remat, matmul dtype, scanned layers)
  come from `model_runtime` (gin's MODEL_RUNTIME) where it names them, else from
  `model_config`, else from the checkpoint. Frozen parameters with NaN or Inf are refused
  (a damaged checkpoint) unless `allow_nonfinite_frozen`.
  """
  from prompt_tuning.formats import pretrained
  config_lib.check_runtime(model_runtime)  # before loading what may be a large checkpoint
  dataset_lib.prepare_vocabularies(task_name, task_module,
                                   initial_checkpoint_path=initial_checkpoint_path)
  if initial_checkpoint_path:
    # Checkpoints hold per-layer weights whatever the runtime layout; stack them below.
    load_config = None if model_config is None else model_config.replace(scan_layers=False)
    loaded, params = pretrained.load_pretrained(initial_checkpoint_path, config=load_config)
    config = loaded.config
    if model_config is not None:
      # Keep the user's runtime choices on the checkpoint's architecture.
      config = config.replace(**{f: getattr(model_config, f)
                                 for f in config_lib.RUNTIME_FIELDS})
    config = config_lib.with_runtime(config, model_runtime)
    # Checkpoints are per-layer (T5X layout); scanned models stack the layers after loading.
    params = scan_conversion.for_config(params, config)
  elif allow_random_init:
    if model_config is None:
      raise ValueError("Random initialisation needs MODEL_CONFIG (include a gin/models/ file)")
    config, params = config_lib.with_runtime(model_config, model_runtime), None
  else:
    raise ValueError("No INITIAL_CHECKPOINT_PATH: set it to the frozen model to prompt-tune, e.g. "
                     "--gin.INITIAL_CHECKPOINT_PATH=\"'gs://t5-data/pretrained_models/t5x/"
                     "t5_1_1_lm100k_base/checkpoint_1100000'\" or an HF folder.")

  module = T5(config, prompt=prompt_config)
  rng = jax.random.PRNGKey(random_seed)
  enc = jnp.ones((1, task_feature_lengths["inputs"]), jnp.int32)
  dec = jnp.ones((1, task_feature_lengths["targets"]), jnp.int32)
  boxed = jax.eval_shape(lambda: module.init(rng, enc, dec))["params"]
  partitioner = partition.create()
  shardings = partitioner.shardings_from_boxed(boxed)

  if params is None:
    params = nn.meta.unbox(jax.jit(module.init)(rng, enc, dec)["params"])
  if prompt_config is not None:
    embedding = np.asarray(params["token_embedder"]["embedding"], np.float32)
    labels = prompt_init.labels
    if prompt_init.kind == "class_labels" and not labels:
      labels = dataset_lib.class_labels(task_name, task_module)
      if not labels:
        raise ValueError(f"Class-label initialisation needs labels: set CLASS_LABELS (task "
                         f"{task_name!r} has no default class labels)")
    vocab = (_targets_vocabulary(task_name, task_module)
             if prompt_init.kind in ("class_labels", "from_string") else None)
    shape = (prompt_config.bank_size,) if prompt_config.bank_size else ()
    rows = []
    for i in range(prompt_config.bank_size or 1):
      rows.append(initializers.initialize(
          prompt_init.kind, jax.random.fold_in(rng, 1000 + i), length=prompt_config.length,
          d_model=config.d_model, embedding=embedding, vocab=vocab, labels=labels,
          text=prompt_init.text, path=prompt_init.path, low=prompt_init.low,
          high=prompt_init.high, population=prompt_init.population))
    prompt = np.stack(rows) if shape else rows[0]
    params = initializers.set_prompt(params, prompt)
    params = initializers.add_missing_prompt_params(
        params, prompt_config, d_model=config.d_model, num_layers=config.num_encoder_layers,
        rng=jax.random.fold_in(rng, 2000))
  _check_tree(params, boxed)

  trainable, frozen = optimizers.split_params(params, trainable_patterns)
  trainable_sh, frozen_sh = optimizers.split_params(shardings, trainable_patterns)
  frozen = optimizers.cast_floats(frozen, frozen_param_dtype)
  trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
  trainable = partitioning.place(trainable, trainable_sh)
  frozen = partitioning.place(frozen, frozen_sh)
  nonfinite = _check_frozen_finite(frozen, source=initial_checkpoint_path,
                                   dtype=frozen_param_dtype, allow=allow_nonfinite_frozen)
  model = EncoderDecoderModel(module, **dict(model_kwargs or {}))
  return Setup(module, model, partitioner, trainable, frozen, trainable_sh, frozen_sh,
               initial_checkpoint_path, nonfinite)


def _check_tree(params, boxed) -> None:
  import flax
  want = {k: v.value.shape if hasattr(v, "value") else v.shape
          for k, v in flax.traverse_util.flatten_dict(
              boxed, is_leaf=lambda k, x: isinstance(x, nn.Partitioned), sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {tuple(want[k])}"
               for k in sorted(set(want) & set(have)) if tuple(want[k]) != have[k]]
  if problems:
    raise ValueError("The parameters do not match the model:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------
# Logging

def truncate_metrics(path: str | os.PathLike, last_step: int | None) -> int:
  """Keeps the rows of a metrics JSONL up to `last_step` (None: none) and returns how many went.

  A restarted run logs again every step after the checkpoint it resumes from, and a kill in the
  middle of a write leaves a partial last line. Dropping both before the run appends leaves each
  step once, in order. Lines that do not parse as a row with a step are dropped too. The file is
  rewritten atomically (`storage.atomic_write`: a temporary file and `os.replace` locally, one
  upload on gs://), so a kill here leaves the old file or the new one, never a mix.
  """
  path = storage.path(path)
  if not path.exists():
    return 0
  text = path.read_bytes().decode("utf-8", errors="replace")
  lines = text.splitlines()
  kept = []
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
      continue  # a partial line from a kill mid-write, or not a row at all
    if last_step is not None and isinstance(step, int) and step <= last_step:
      kept.append(line)
  if len(kept) == len(lines) and text.endswith("\n") == bool(lines):
    return 0
  storage.atomic_write(path, "".join(line + "\n" for line in kept))
  return len(lines) - len(kept)


class MetricWriter:
  """TensorBoard summaries plus a JSONL file (process 0 only).

  `resume_step` is the step the run restarts from (None for a fresh run): rows the run will log
  again are dropped from the JSONL first (`truncate_metrics`). TensorBoard event files are left
  alone and keep the earlier copies of those steps: the replayed ones go to a newer file, and
  TensorBoard (by default, `purge_orphaned_data`) drops the older copies when it sees the step go
  back, so its curves show the resumed run.
  """

  def __init__(self, model_dir: str | os.PathLike, name: str, *, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    import tensorflow as tf
    self._tf = tf
    self.dir = storage.path(model_dir) / name
    self._writer = None  # created at the first write: no empty eval/ folder for runs without eval
    self._jsonl = storage.path(model_dir) / f"metrics_{name.replace('/', '_')}.jsonl"
    dropped = truncate_metrics(self._jsonl, resume_step)
    if dropped:
      log.info("Dropped %d lines of %s logged after step %d or left partial by a kill (this "
               "run logs those steps again)", dropped, self._jsonl.name, resume_step or 0)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self._writer is None:
      self._writer = self._tf.summary.create_file_writer(str(self.dir))
    with self._writer.as_default():
      for k, v in scalars.items():
        self._tf.summary.scalar(k, float(v), step=int(step))
    self._writer.flush()
    storage.append_text(self._jsonl, json.dumps(
        {"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------
# Output files

def write_jsonl(path, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes rows atomically, local or gs:// (`storage.atomic_write`: never a half-written file)."""
  storage.atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_json(path, value: Any) -> None:
  """Writes JSON atomically, local or gs:// (`storage.atomic_write`: never a half-written file)."""
  storage.atomic_write(path, json.dumps(value, indent=2, default=float))


# ------------------------------------------------------------------------------------------------
# Training

class _DataStates:
  """`MODEL_DIR/data_state/host_<i>/<step>`: this host's input pipeline state at each checkpoint.

  Pruned to the steps orbax keeps. Lets a resumed run restore its tf.data iterator instead of
  replaying every batch before the checkpoint (`dataset.TrainBatches.save_state`).
  """

  def __init__(self, model_dir: str):
    self.root = os.path.join(str(model_dir), "data_state", f"host_{jax.process_index()}")

  def path(self, step: int) -> str:
    return os.path.join(self.root, str(int(step)))

  def keep_only(self, steps: Sequence[int]) -> None:
    import tensorflow as tf
    if not tf.io.gfile.isdir(self.root):
      return
    keep = {str(int(s)) for s in steps}
    for name in tf.io.gfile.listdir(self.root):
      name = name.rstrip("/")
      if name not in keep:
        tf.io.gfile.rmtree(os.path.join(self.root, name))


def _shapes(tree) -> dict[str, list[int]]:
  import flax
  return {k: list(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _check_resumable(ckpt, step: int, trainable, *, config: T5Config,
                     prompt_config: PromptConfig | None) -> None:
  """MODEL_DIR's checkpoint must hold parameters of this run's shapes.

  Without this check orbax fails deep in tensorstore with a shape error that reads like
  corruption; the usual cause is a changed PROMPT_LENGTH or model in a reused MODEL_DIR.
  """
  try:
    meta = ckpt.read_metadata(step)
  except (OSError, ValueError):
    return  # unreadable metadata: restore reports the checkpoint as corrupted
  diffs = []
  saved_prompt = meta.get("prompt_config") or {}
  now_prompt = dataclasses.asdict(prompt_config) if prompt_config else {}
  for key, flag in (("length", "PROMPT_LENGTH"), ("bank_size", "PromptConfig.bank_size")):
    if saved_prompt.get(key) != now_prompt.get(key):
      diffs.append(f"{flag} {saved_prompt.get(key)} there, {now_prompt.get(key)} here")
  saved_d = (meta.get("model_config") or {}).get("d_model")
  if saved_d is not None and saved_d != config.d_model:
    diffs.append(f"d_model {saved_d} there, {config.d_model} here (another model size)")
  saved, now = meta.get("trainable_shapes"), _shapes(trainable)
  if saved is not None and saved != now:
    diffs += [f"{k}: {saved.get(k, 'absent')} there, {now.get(k, 'absent')} here"
              for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)][:10]
  if diffs:
    raise ValueError(
        f"MODEL_DIR {ckpt.model_dir} holds checkpoint {step} of a different run: "
        + "; ".join(diffs) + ". Resume with the settings it was trained with, or pass a new "
        "--gin.MODEL_DIR to start a new run.")


# ------------------------------------------------------------------------------------------------
# The run's settings: compared on resume, remembered by eval and infer

RUN_SETTINGS_FILE = "run_settings.json"
# The macros prompt_tuning.eval and prompt_tuning.infer take from MODEL_DIR when not given.
REMEMBERED_MACROS = ("MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE", "TASK_FEATURE_LENGTHS",
                     "PROMPT_LENGTH", "PROMPT_COMBINE", "INITIAL_CHECKPOINT_PATH")
# Model fields a resume may change: how the model is laid out in memory, not what it computes.
_LAYOUT_FIELDS = ("remat_policy", "scan_layers")
_UNSET = "(not set)"


def _jsonable(value):
  """`value` as it reads back from JSON (tuples become lists), so saved and new ones compare."""
  return json.loads(json.dumps(value, default=repr))


def _absolute(path):
  """A local path as absolute (eval may run from another folder); URLs and others unchanged."""
  if isinstance(path, str) and "://" not in path and os.path.exists(path):
    return os.path.abspath(path)
  return path


def _qualname(fn) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def describe_optimizer(optimizer) -> Any:
  """What can be seen of an optimizer passed without a gin description (a library call)."""
  if optimizer is None:
    return {"@": _qualname(optimizers.prompt_tuning_optimizer)}
  if isinstance(optimizer, functools.partial):
    return {"@": _qualname(optimizer.func), "args": list(optimizer.args), **optimizer.keywords}
  if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
    # An optax transformation hides its hyperparameters: only its kind can be compared.
    return {"transformation": type(optimizer).__name__}
  return {"@": _qualname(optimizer)}


def run_settings(*, train_dataset: dataset_lib.DatasetConfig, prompt_config: PromptConfig | None,
                 prompt_init: PromptInit, trainable_patterns: Sequence[str],
                 initial_checkpoint_path: str | None, model_config: T5Config,
                 frozen_param_dtype: str, num_microbatches: int, random_seed: int,
                 model_kwargs: Mapping[str, Any] | None, optimizer,
                 run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The record of what defines a training run.

  - `training`: compared on resume (what changes the trained prompt). Not in it, as a resume may
    change them: TRAIN_STEPS, the periods, KEEP_CHECKPOINTS, log_period, evaluation, decoding,
    best-checkpoint settings, skip_nonfinite, partitioning and mesh, and the model's
    memory layout (remat_policy, scan_layers).
  - `remembered`: the REMEMBERED_MACROS values eval and infer use when not given.
  - `file_tasks`: how the run's file tasks were registered (register_file_task's arguments), so
    eval and infer can register them again.
  - `gin_files`, `gin_config`: how the run was configured, for reference.

  `run_config` comes from the gin edge (`gin_utils.run_config`): the optimizer as gin built it
  (`optimizer`), file tasks, gin files and config text.
  """
  run_config = dict(run_config or {})
  data = train_dataset
  prompt = {}
  if prompt_config is not None:
    prompt = {"PROMPT_LENGTH": prompt_config.length, "PROMPT_COMBINE": prompt_config.combine,
              "prompt_config.bank_size": prompt_config.bank_size,
              "PROMPT_INIT": dataclasses.asdict(prompt_init)}
  model = {k: v for k, v in model_config.to_dict().items() if k not in _LAYOUT_FIELDS}
  training = {
      "MIXTURE_OR_TASK_NAME": data.mixture_or_task_name,
      "TASK_FEATURE_LENGTHS": dict(data.task_feature_lengths),
      "BATCH_SIZE": data.batch_size, "train_dataset.split": data.split,
      "train_dataset.shuffle": data.shuffle, "train_dataset.seed": data.seed,
      **prompt,
      "trainable_patterns": list(trainable_patterns),
      "INITIAL_CHECKPOINT_PATH": initial_checkpoint_path,
      "model": model, "model_kwargs": dict(model_kwargs or {}),
      "FROZEN_PARAM_DTYPE": frozen_param_dtype, "NUM_MICROBATCHES": num_microbatches,
      "RANDOM_SEED": random_seed,
      "optimizer": run_config.get("optimizer") or describe_optimizer(optimizer),
  }
  remembered = {"MIXTURE_OR_TASK_NAME": data.mixture_or_task_name,
                "MIXTURE_OR_TASK_MODULE": data.module,
                "TASK_FEATURE_LENGTHS": dict(data.task_feature_lengths),
                "INITIAL_CHECKPOINT_PATH": _absolute(initial_checkpoint_path)}
  if prompt_config is not None:
    remembered.update(PROMPT_LENGTH=prompt_config.length, PROMPT_COMBINE=prompt_config.combine)
  task = dataset_lib.get_mixture_or_task(data.mixture_or_task_name, data.module)
  names = {data.mixture_or_task_name} | {t.name for t in getattr(task, "tasks", [])}
  file_tasks = {n: kw for n, kw in (run_config.get("file_tasks") or {}).items() if n in names}
  return _jsonable({"remembered": remembered, "training": training, "file_tasks": file_tasks,
                    "gin_files": list(run_config.get("gin_files") or []),
                    "gin_config": run_config.get("gin_config")})


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _short(value) -> str:
  text = value if value is _UNSET else repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """'name: old there, new here' for each training setting that differs."""
  old, new = _flatten(dict(saved)), _flatten(dict(now))
  return [f"{k}: {_short(old.get(k, _UNSET))} there, {_short(new.get(k, _UNSET))} here"
          for k in sorted(set(old) | set(new)) if old.get(k, _UNSET) != new.get(k, _UNSET)]


def _check_same_settings(meta: Mapping[str, Any], settings: Mapping[str, Any], *, model_dir,
                         step: int, allow: bool, initial_checkpoint_path) -> None:
  """A rerun in the same MODEL_DIR resumes it only with the settings it was trained with."""
  saved = (meta.get("run_settings") or {}).get("training")
  if saved is None:  # a checkpoint written before settings were recorded
    log.info("Checkpoint %d records no run settings (older version): not compared", step)
    if meta.get("initial_checkpoint_path") != initial_checkpoint_path:
      log.warning("Resuming from a checkpoint trained on frozen model %r but "
                  "INITIAL_CHECKPOINT_PATH is %r", meta.get("initial_checkpoint_path"),
                  initial_checkpoint_path)
    return
  diffs = changed_settings(saved, settings["training"])
  if not diffs:
    return
  listed = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
  if allow:
    log.warning("Resuming checkpoint %d with changed settings (allow_changed_settings=True): %s",
                step, listed)
    return
  raise ValueError(
      f"MODEL_DIR {model_dir} holds checkpoint {step} of a run with other settings: {listed}. "
      "Rerunning would silently continue that run under the new settings. To start a new run, "
      "pass a new --gin.MODEL_DIR; to continue this one with the new settings on purpose, add "
      "--gin.runs.train.allow_changed_settings=True (they become the run's settings).")


def read_run_settings(model_dir) -> tuple[str, dict[str, Any]] | None:
  """MODEL_DIR's recorded run settings and where they were read: run_settings.json, else the
  latest checkpoint's metadata (runs of older versions: what it records). None if it has none."""
  if not isinstance(model_dir, (str, os.PathLike)) or not str(model_dir):
    return None
  try:
    root = storage.path(model_dir, "MODEL_DIR")
  except ValueError:  # a URL scheme we cannot read: evaluate() reports it
    return None
  path = root / RUN_SETTINGS_FILE
  try:
    if path.is_file():
      return str(path), json.loads(path.read_text())
    steps = _checkpoint_steps(str(root))
    if not steps:
      return None
    ckpt = checkpoints_lib.Checkpointer(root, keep=None)
    try:
      meta = ckpt.read_metadata(steps[-1])
    finally:
      ckpt.close()
  except (OSError, ValueError) as e:
    log.warning("Could not read the run settings in %s (%s); give the settings as flags", root, e)
    return None
  source = str(ckpt.directory / str(steps[-1]) / "metadata")
  if "run_settings" in meta:
    return source, meta["run_settings"]
  prompt = meta.get("prompt_config") or {}
  old = {"MIXTURE_OR_TASK_NAME": meta.get("mixture_or_task_name"),
         "INITIAL_CHECKPOINT_PATH": meta.get("initial_checkpoint_path"),
         "PROMPT_LENGTH": prompt.get("length"), "PROMPT_COMBINE": prompt.get("combine")}
  return source, {"remembered": old}


def remembered_settings(model_dir) -> tuple[str, dict[str, Any]] | None:
  """(source, {macro: value}): what eval and infer take from MODEL_DIR where the user sets
  nothing (`gin_utils.parse_args(remembered=...)`)."""
  found = read_run_settings(model_dir)
  if found is None:
    return None
  source, settings = found
  values = {k: v for k, v in (settings.get("remembered") or {}).items()
            if k in REMEMBERED_MACROS and v is not None}
  return (source, values) if values else None


def _register_saved_file_task(model_dir, task_name, module) -> None:
  """Registers MODEL_DIR's file task `task_name` again, as the run did, if it is unknown here."""
  if not model_dir or not isinstance(task_name, str):
    return
  import seqio
  dataset_lib.import_modules(module)
  if task_name in seqio.TaskRegistry.names() or task_name in seqio.MixtureRegistry.names():
    return
  found = read_run_settings(model_dir)
  kwargs = ((found[1].get("file_tasks") or {}).get(task_name)) if found else None
  if kwargs is None:
    return  # not one of the run's file tasks: the usual unknown-task error follows
  from prompt_tuning.data import file_tasks
  try:
    file_tasks.register_file_task(**kwargs)
  except (ValueError, OSError) as e:
    files = ", ".join(found[1].get("gin_files") or []) or "unknown"
    raise ValueError(
        f"The run in {model_dir} trained on the file task {task_name!r}, and registering it "
        f"again as recorded in {found[0]} failed: {e} Pass the gin file that registers it "
        f"(--gin_file=...; the run used: {files}).") from e
  log.info("Registered the file task %r as the run in %s did", task_name, model_dir)


class _BestCheckpoint:
  """Keeps the checkpoint with the best dev metric (the paper's early stopping) in MODEL_DIR/best.

  `metric` is "task/metric" or just "metric" (averaged over the evaluated tasks that report it).
  """

  def __init__(self, model_dir, metric: str, mode: str = "max"):
    if mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}")
    self.metric, self.mode = metric, mode
    self.path = storage.path(model_dir) / "best" / "best.json"
    self.value = None
    if self.path.exists():  # resuming: keep beating the best so far
      self.value = json.loads(self.path.read_text())["value"]
    self.checkpointer = checkpoints_lib.Checkpointer(
        model_dir, keep=1, subdir="best/checkpoints", numpy_subdir="best/numpy_checkpoints")

  def _lookup(self, results) -> float:
    if "/" in self.metric:
      task, name = self.metric.split("/", 1)
      if task not in results or name not in results[task]:
        raise ValueError(f"best_metric {self.metric!r} is not among the eval results "
                         f"{ {t: sorted(m) for t, m in results.items()} }")
      return float(results[task][name])
    values = [m[self.metric] for m in results.values() if self.metric in m]
    if not values:
      raise ValueError(f"best_metric {self.metric!r} is not reported by any evaluated task")
    return float(np.mean(values))

  def update(self, step: int, results, state, metadata) -> None:
    value = self._lookup(results)
    better = (self.value is None or (value > self.value if self.mode == "max"
                                     else value < self.value))
    if not better:
      return
    self.value = value
    self.checkpointer.save(step, state, metadata)
    if jax.process_index() == 0:
      storage.atomic_write(self.path, json.dumps({"step": int(step), "metric": self.metric,
                                                  "value": value}))
    log.info("New best %s = %.4f at step %d (saved to %s)", self.metric, value, step,
             self.path.parent)


class _Preemption:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks: it saves the
  current step, then exits cleanly.

  A second Ctrl-C raises KeyboardInterrupt at once, even in the middle of that save: orbax
  commits a checkpoint by renaming its complete temporary folder, so an aborted save leaves
  either the whole checkpoint or only a temporary folder that the next run deletes.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler not set from Python, nothing to restore
        signal.signal(sig, previous)


def train(*, model_dir: str, train_dataset: dataset_lib.DatasetConfig, train_steps: int,
          model_config: T5Config | None = None,
          prompt_config: PromptConfig | None = PromptConfig(),
          initial_checkpoint_path: str | None = None,
          prompt_init: PromptInit = PromptInit(),
          optimizer: Callable[[], optax.GradientTransformation] | optax.GradientTransformation
          | None = None,
          trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
          partition: PartitionConfig = PartitionConfig(),
          eval_dataset: dataset_lib.DatasetConfig | None = None,
          eval_period: int = 1000, eval_max_examples: int | None = None,
          decoding_config: decoding_lib.DecodingConfig | None = None,
          checkpoint_period: int = 1000, keep_checkpoints: int | None = 3,
          save_frozen: bool = False, num_microbatches: int = 1, random_seed: int = 42,
          frozen_param_dtype: str = "float32", log_period: int = 10,
          skip_nonfinite: bool = False, allow_random_init: bool = False,
          eval_at_start: bool = False, best_metric: str | None = None,
          best_mode: str = "max",
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
  check_required(MODEL_DIR=model_dir, MIXTURE_OR_TASK_NAME=train_dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("KEEP_CHECKPOINTS", "EVAL_MAX_EXAMPLES"), TRAIN_STEPS=train_steps,
                 EVAL_PERIOD=eval_period, CHECKPOINT_PERIOD=checkpoint_period,
                 KEEP_CHECKPOINTS=keep_checkpoints, EVAL_MAX_EXAMPLES=eval_max_examples,
                 NUM_MICROBATCHES=num_microbatches, **{"runs.train.log_period": log_period})
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
  if optimizer is None:
    tx = optimizers.prompt_tuning_optimizer()
  elif hasattr(optimizer, "init") and hasattr(optimizer, "update"):
    tx = optimizer
  else:  # a factory, e.g. gin's @optimizers.prompt_tuning_optimizer
    tx = optimizer()
  learning_rate_fn = getattr(tx, "schedule", None)
  settings = run_settings(
      train_dataset=train_dataset, prompt_config=prompt_config, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, initial_checkpoint_path=initial_checkpoint_path,
      model_config=setup.module.config, frozen_param_dtype=frozen_param_dtype,
      num_microbatches=num_microbatches, random_seed=random_seed, model_kwargs=model_kwargs,
      optimizer=optimizer, run_config=run_config)

  part = setup.partitioner
  ckpt = checkpoints_lib.Checkpointer(model_dir, keep=keep_checkpoints, save_frozen=save_frozen,
                                      cleanup_tmp=True)
  with part.activate():
    state = jax.jit(lambda t: train_lib.create_train_state(t, tx))(setup.trainable)
  start_position = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
      _check_resumable(ckpt, latest, state.params, config=setup.module.config,
                       prompt_config=prompt_config)
      try:
        saved_meta = ckpt.read_metadata(latest)
      except (OSError, ValueError):
        saved_meta = None  # unreadable: the restore below reports the checkpoint as corrupted
      if saved_meta is not None:
        _check_same_settings(saved_meta, settings, model_dir=model_dir, step=latest,
                             allow=allow_changed_settings,
                             initial_checkpoint_path=initial_checkpoint_path)
      restored, meta, _ = ckpt.restore(latest, abstract)
    except ValueError:
      ckpt.close()  # stop orbax's threads before the error ends the run
      raise
    state = train_lib.TrainState(step=restored["step"], params=restored["params"],
                                 opt_state=restored["opt_state"])
    start_position = int(meta.get("data_position", int(state.step)))
    ckpt.ensure_numpy_export(latest, state.params)
    log.info("Resumed from %s at step %d", ckpt.directory / str(latest), int(state.step))
  else:
    log.info("No checkpoint in %s: starting from %s with a fresh prompt (%s)", model_dir,
             initial_checkpoint_path or "random weights", prompt_init.kind)

  # Each host's input pipeline state, saved beside each checkpoint (see `_DataStates`).
  data_states = _DataStates(model_dir)
  batches = dataset_lib.TrainBatches(
      train_dataset, start_position=start_position, shard_info=dataset_lib.host_shard(),
      state_dir=data_states.path(latest) if latest is not None else None)
  step_fn = train_lib.jit_train_step(setup.model, tx, num_microbatches=num_microbatches,
                                     skip_nonfinite=skip_nonfinite,
                                     learning_rate_fn=learning_rate_fn)
  tokens_per_step = train_dataset.batch_size * sum(train_dataset.task_feature_lengths.values())
  rng = jax.random.PRNGKey(random_seed)
  # Only the steps up to the restored checkpoint stay logged: the rest are replayed.
  resume_step = int(state.step) if latest is not None else None
  writer = MetricWriter(model_dir, "train", resume_step=resume_step)
  eval_writer = MetricWriter(model_dir, "eval", resume_step=resume_step)
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.frozen))
  log.info("Trainable parameters: %d; frozen: %d", n_trainable, n_frozen)

  metadata = lambda: {
      "data_position": batches.position, "initial_checkpoint_path": initial_checkpoint_path,
      "model_config": setup.module.config.to_dict(),
      "prompt_config": dataclasses.asdict(prompt_config) if prompt_config else None,
      "trainable_patterns": list(trainable_patterns), "trainable_shapes": _shapes(state.params),
      "mixture_or_task_name": train_dataset.mixture_or_task_name,
      "truncated_examples": batches.truncated_examples, "seen_examples": batches.examples,
      "run_settings": settings}
  settings_path = storage.join(model_dir, RUN_SETTINGS_FILE)
  settings_written = []

  def save(step):
    # The data state first: a committed checkpoint then has one unless writing it failed, and
    # a missing one only costs a replay of the data stream on resume.
    batches.save_state(data_states.path(step))
    ckpt.save(step, state, metadata(), frozen=setup.frozen if save_frozen else None)
    data_states.keep_only(ckpt.all_steps())
    if not settings_written and jax.process_index() == 0:
      write_json(settings_path, settings)  # what eval and infer read (also in each checkpoint)
      settings_written.append(step)
    log.info("Saved checkpoint %d to %s", step, ckpt.directory)

  def save_or_abort(step):
    try:
      save(step)
    except KeyboardInterrupt:
      raise Interrupted(
          f"Ctrl-C during the save of checkpoint {step}: stopped. orbax commits a checkpoint "
          f"only when it is complete, so {ckpt.directory} holds all of checkpoint {step} or none "
          "of it; rerun the same command to resume from the latest complete one.") from None

  step = int(state.step)
  last_saved = latest
  final_eval: dict[str, Any] = {}
  initial_eval: dict[str, Any] = {}

  best = _BestCheckpoint(model_dir, best_metric, best_mode) if best_metric else None

  evaluation = None
  if eval_dataset is not None:  # data cached and functions compiled once for the whole run
    evaluation = evaluation_lib.Evaluation(
        setup, eval_dataset, decoding_config=decoding_config, max_examples=eval_max_examples,
        random_seed=random_seed)

  def run_eval(at_step):
    results = evaluation.run(state.params, step=at_step)
    for task_name, r in results.items():
      eval_writer.write(at_step, {f"{task_name}/{k}": v for k, v in r.metrics.items()})
    evaluation_lib.log_metric_values(os.path.join(str(model_dir), "eval"), at_step,
                                     {t: r.values for t, r in results.items()})
    scalars = evaluation_lib.scalars(results)
    if best is not None:
      best.update(at_step, scalars, state, metadata())
    return scalars

  if eval_dataset is not None and eval_at_start and latest is None:
    initial_eval = run_eval(step)
  t_start = time.time()
  t_window, window_steps = time.time(), 0
  with _Preemption() as preemption, part.activate():
    watch = _NonFiniteWatch()

    def check_finite():
      """Fetches the watch (one host sync): before anything is logged, saved or evaluated."""
      first_bad = watch.fetch()
      if first_bad is None:
        return
      if not skip_nonfinite:
        ckpt.close()
        raise NonFiniteLossError(_nonfinite_message(watch.first_metrics, first_bad, last_saved,
                                                    setup))
      log.warning("Skipped %d non-finite batches (the first at step %d)", watch.skipped,
                  first_bad)
      watch.reset()

    while step < train_steps:
      batch = part.shard_batch(next(batches))
      state, metrics = step_fn(state, setup.frozen, batch, rng)
      step += 1
      window_steps += 1
      # `finite` covers the loss, the gradients, the new parameters and their norms. It stays on
      # the device until the next log, save or evaluation: no host sync per step.
      watch.add(step, metrics)
      due = (step % log_period == 0 or step % checkpoint_period == 0 or step == train_steps
             or preemption.requested
             or (eval_dataset is not None and step % eval_period == 0))
      if due:
        check_finite()
      if step % log_period == 0 or step == train_steps:
        m = {k: float(partitioning.to_host(v)) for k, v in metrics.items()}
        now = time.time()
        rate = window_steps / max(now - t_window, 1e-9)
        t_window, window_steps = now, 0
        eta = (train_steps - step) / max(rate, 1e-9)
        m["steps_per_sec"] = rate
        m["tokens_per_sec"] = rate * tokens_per_step  # padded input + target tokens
        m["truncated_examples"] = batches.truncated_examples
        log.info("step %d/%d loss %.4f acc %.3f %.2f steps/s ETA %s truncated %d", step,
                 train_steps, m["loss"], m["accuracy"], rate, _fmt_seconds(eta),
                 batches.truncated_examples)
        writer.write(step, m)
      if step % checkpoint_period == 0 or step == train_steps:
        save_or_abort(step)
        last_saved = step
      if preemption.requested:  # checked after the periodic save: never saves a step twice
        check_finite()  # the signal may have come after this step's check
        if last_saved != step:
          log.warning("%s: saving step %d before exiting%s", preemption.signal_name, step,
                      " (Ctrl-C again aborts the save)" if preemption.signal_name == "SIGINT"
                      else "")
          save_or_abort(step)
        ckpt.close()
        if best is not None:
          best.checkpointer.close()
        log.warning("%s: saved step %d in %s; rerun the same command to resume",
                    preemption.signal_name, step, ckpt.directory)
        return {"preempted_at": step, "signal": preemption.signal_name}
      if eval_dataset is not None and (step % eval_period == 0 or step == train_steps):
        final_eval = run_eval(step)
  if batches.truncated_examples:
    log.warning("%s", batches.truncation.summary("training examples"))
  ckpt.close()
  if best is not None:
    best.checkpointer.close()
  return {"step": step, "eval": final_eval, "initial_eval": initial_eval,
          "seconds": time.time() - t_start,
          "trainable_params": n_trainable, "frozen_params": n_frozen,
          "truncated_examples": batches.truncated_examples}


class _NonFiniteWatch:
  """The first non-finite step and its metrics, kept on the device (no per-step host sync).

  `add` runs a few tiny device ops per step; `fetch` reads them back (one sync) and returns the
  first non-finite step since the last `reset`, or None.
  """

  _KEYS = ("loss", "grad_norm", "param_norm")

  def __init__(self):
    self.reset()

  def reset(self):
    self._first = None   # device int32: first bad step, or -1
    self._skipped = None
    self._values = None
    self.first_metrics, self.skipped = {}, 0

  def add(self, step: int, metrics) -> None:
    bad = ~metrics["finite"]
    values = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in self._KEYS])
    if self._first is None:
      self._first = jnp.where(bad, step, -1).astype(jnp.int32)
      self._skipped = bad.astype(jnp.int32)
      self._values = values
      return
    new = bad & (self._first < 0)
    self._first = jnp.where(new, step, self._first)
    self._values = jnp.where(new, values, self._values)
    self._skipped = self._skipped + bad.astype(jnp.int32)

  def fetch(self) -> int | None:
    if self._first is None:
      return None
    first = int(partitioning.to_host(self._first))
    if first < 0:
      return None
    values = partitioning.to_host(self._values)
    self.first_metrics = dict(zip(self._KEYS, values.tolist()))
    self.skipped = int(partitioning.to_host(self._skipped))
    return first


def _nonfinite_message(metrics, step: int, last_saved: int | None, setup: Setup) -> str:
  values = {k: float(partitioning.to_host(metrics[k])) for k in ("loss", "grad_norm",
                                                                   "param_norm")}
  shown = ", ".join(f"{k}={v}" for k, v in values.items())
  if np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"]):
    what = (f"The trainable parameters became non-finite or too large at step {step} ({shown}): "
            "the learning rate is likely too high.")
  else:
    what = f"Non-finite loss or gradient at step {step} ({shown})."
  if setup.nonfinite_frozen:
    what += (" The frozen model has NaN or Inf values (allowed by allow_nonfinite_frozen=True) in "
             f"{', '.join(setup.nonfinite_frozen[:5])}: the likely cause.")
  kept = (f"Nothing was saved after step {last_saved}; the last good checkpoint is kept."
          if last_saved is not None else "No checkpoint was saved.")
  return (f"{what} {kept} Lower the learning rate, check the data, or set skip_nonfinite=True "
          "(--gin.runs.train.skip_nonfinite=True) to skip such steps.")


# ------------------------------------------------------------------------------------------------
# Evaluation and inference of a trained (or released) prompt

def _checkpoint_steps(model_dir: str | None) -> list[int]:
  """The steps saved in MODEL_DIR/checkpoints, oldest first (none for a missing folder)."""
  if not model_dir or not (storage.path(model_dir) / "checkpoints").is_dir():
    return []
  ckpt = checkpoints_lib.Checkpointer(model_dir, keep=None)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def _restore_trainable(setup: Setup, model_dir: str, step: int):
  """The trainable parameters saved at `step` in MODEL_DIR, and that checkpoint's metadata."""
  ckpt = checkpoints_lib.Checkpointer(model_dir, keep=None)
  try:
    meta = ckpt.read_metadata(step)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), setup.trainable)
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  log.info("Restored the trainable parameters from %s step %d", ckpt.directory, step)
  return params, {"step": step, **meta}


def _steps_to_evaluate(model_dir: str | None, checkpoint_step, prompt_init: PromptInit,
                       prompt_config: PromptConfig | None) -> list[int] | None:
  """Which of MODEL_DIR's checkpoints to evaluate (None: the prompt from PROMPT_FILE / init).

  `checkpoint_step` is None (the latest), a step, or 'all' (every saved step, oldest first).
  Checked before any model is loaded: a MODEL_DIR without checkpoints is an error unless a
  prompt file is given (a typo in MODEL_DIR would otherwise evaluate a random prompt).
  """
  if model_dir:
    storage.check_run_folder(model_dir, "MODEL_DIR", write=False)
  if checkpoint_step is not None and checkpoint_step != "all" and (
      isinstance(checkpoint_step, bool) or not isinstance(checkpoint_step, int)):
    raise ValueError(f"CHECKPOINT_STEP must be a step number, None (the latest) or 'all', got "
                     f"{checkpoint_step!r}")
  steps = _checkpoint_steps(model_dir)
  if steps:
    if checkpoint_step == "all":
      return steps
    if checkpoint_step is None:
      return [steps[-1]]
    if checkpoint_step not in steps:
      raise ValueError(f"No checkpoint {checkpoint_step} in {model_dir}/checkpoints; saved steps: "
                       f"{steps}")
    return [checkpoint_step]
  from_file = prompt_config is not None and prompt_init.kind == "from_file"
  if model_dir and not from_file:
    what = ("does not exist" if not storage.path(model_dir).exists()
            else "has no checkpoints (MODEL_DIR/checkpoints/<step>)")
    raise ValueError(
        f"MODEL_DIR {model_dir} {what}, so there is no trained prompt to evaluate. Check the "
        "path, or evaluate a prompt file: --gin_file=prompts/from_file.gin "
        "--gin.PROMPT_FILE=\"'prompt.npy'\" (with --gin.MODEL_DIR=None).")
  if checkpoint_step is not None:
    raise ValueError(f"CHECKPOINT_STEP={checkpoint_step!r} needs a MODEL_DIR with checkpoints")
  if prompt_config is not None and not from_file:
    log.warning("Evaluating a freshly initialised prompt (%s): no MODEL_DIR and no PROMPT_FILE",
                prompt_init.kind)
  return None


def _build_for_eval(dataset: dataset_lib.DatasetConfig, *, model_config, prompt_config,
                    initial_checkpoint_path, prompt_init, trainable_patterns, partition,
                    random_seed, model_runtime=None, allow_nonfinite_frozen=False) -> Setup:
  return build(model_config=model_config, prompt_config=prompt_config,
               initial_checkpoint_path=initial_checkpoint_path, partition=partition,
               trainable_patterns=trainable_patterns,
               task_feature_lengths=dataset.task_feature_lengths, prompt_init=prompt_init,
               random_seed=random_seed, task_name=dataset.mixture_or_task_name,
               task_module=dataset.module, model_runtime=model_runtime,
               allow_nonfinite_frozen=allow_nonfinite_frozen)


def evaluate(*, eval_dataset: dataset_lib.DatasetConfig, model_dir: str | None = None,
             model_config: T5Config | None = None,
             prompt_config: PromptConfig | None = PromptConfig(),
             initial_checkpoint_path: str | None = None, prompt_init: PromptInit = PromptInit(),
             trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
             partition: PartitionConfig = PartitionConfig(),
             checkpoint_step: int | str | None = None,
             decoding_config: decoding_lib.DecodingConfig | None = None,
             max_examples: int | None = None, random_seed: int = 42,
             output_path: str | None = None,
             model_runtime: Mapping[str, Any] | None = None,
             allow_nonfinite_frozen: bool = False) -> dict[str, Any]:
  """Evaluates a prompt: MODEL_DIR's checkpoint (latest, a step, or 'all'), else PROMPT_FILE.

  Writes `eval_results_<decoding>.json` (MODEL_DIR, or OUTPUT_PATH) with the scalar metrics and
  the text samples, and every metric value to TensorBoard under `eval_<decoding>/<task>/`
  beside it. With CHECKPOINT_STEP='all', every saved step is evaluated, oldest first, one row
  per step in `eval_all_checkpoints_<decoding>.jsonl` (written after each step). A file task
  the run in MODEL_DIR trained on is registered again from its run settings.
  """
  config_lib.check_runtime(model_runtime)
  # First: a mistyped MODEL_DIR is the error to report, not the settings it would have supplied.
  steps = _steps_to_evaluate(model_dir, checkpoint_step, prompt_init, prompt_config)
  check_required(MIXTURE_OR_TASK_NAME=eval_dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("EVAL_MAX_EXAMPLES",), EVAL_MAX_EXAMPLES=max_examples)
  if output_path:
    storage.check_run_folder(output_path, "OUTPUT_PATH", write=False)  # before any loading
  _register_saved_file_task(model_dir, eval_dataset.mixture_or_task_name, eval_dataset.module)
  setup = _build_for_eval(
      eval_dataset, model_config=model_config, prompt_config=prompt_config,
      initial_checkpoint_path=initial_checkpoint_path, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, partition=partition, random_seed=random_seed,
      model_runtime=model_runtime, allow_nonfinite_frozen=allow_nonfinite_frozen)
  evaluation = evaluation_lib.Evaluation(setup, eval_dataset, decoding_config=decoding_config,
                                         max_examples=max_examples, random_seed=random_seed)
  mode = evaluation.decoding_method
  out_folder = (storage.path(output_path).parent if output_path
                else storage.path(model_dir) if model_dir else None)
  log_dir = str(out_folder / f"eval_{mode}") if out_folder is not None else None
  write = jax.process_index() == 0 and out_folder is not None

  def one(trainable, step):
    results = evaluation.run(trainable, step=step)
    evaluation_lib.log_metric_values(log_dir, step, evaluation_lib.metric_values(results))
    return {"checkpoint_step": step, "decoding": mode,
            "results": evaluation_lib.scalars(results),
            "samples": evaluation_lib.samples(results)}

  if steps is None:
    out = one(setup.trainable, None)
  else:
    rows = []
    for step in steps:
      trainable, _ = _restore_trainable(setup, model_dir, step)
      rows.append(one(trainable, step))
      if write and checkpoint_step == "all":
        path = out_folder / f"eval_all_checkpoints_{mode}.jsonl"
        write_jsonl(path, rows)
        log.info("Evaluated step %d (%d of %d); rows in %s", step, len(rows), len(steps), path)
    out = rows[-1] if checkpoint_step != "all" else {
        "decoding": mode, "checkpoints": rows,
        "path": str(out_folder / f"eval_all_checkpoints_{mode}.jsonl") if write else None}
  if write and checkpoint_step != "all":
    path = storage.path(output_path) if output_path else out_folder / f"eval_results_{mode}.json"
    write_json(path, out)
    log.info("Wrote %s", path)
  return out


def infer(*, dataset: dataset_lib.DatasetConfig, output_dir: str, model_dir: str | None = None,
          model_config: T5Config | None = None,
          prompt_config: PromptConfig | None = PromptConfig(),
          initial_checkpoint_path: str | None = None, prompt_init: PromptInit = PromptInit(),
          trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
          partition: PartitionConfig = PartitionConfig(), checkpoint_step: int | None = None,
          decoding_config: decoding_lib.DecodingConfig | None = None,
          max_examples: int | None = None, random_seed: int = 42,
          mode: str = "predict", num_return_sequences: int | None = None,
          model_runtime: Mapping[str, Any] | None = None,
          allow_nonfinite_frozen: bool = False) -> list:
  """Writes one JSONL per task of `dataset`, as T5X's infer.py modes do.

  - `predict`: {inputs, prediction, score, target} per example (`<task>-<step>.jsonl`; score:
    the prediction's log-likelihood, length-normalised for beam search); with
    `num_return_sequences` N (beam search) also `n_best`: the N best {prediction, score}.
  - `predict_with_aux`: the same plus `aux_value: {scores}` (each decode's log-likelihood).
  - `score`: {inputs, target, score}, the target's log-likelihood under the model.
  Other modes than predict name their files `<task>-<step>.<mode>.jsonl`.
  """
  if checkpoint_step == "all":
    raise ValueError("CHECKPOINT_STEP='all' is for prompt_tuning.eval; infer takes one step")
  config_lib.check_runtime(model_runtime)
  # First: a mistyped MODEL_DIR is the error to report, not the settings it would have supplied.
  steps = _steps_to_evaluate(model_dir, checkpoint_step, prompt_init, prompt_config)
  check_required(INFER_OUTPUT_DIR=output_dir, MIXTURE_OR_TASK_NAME=dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("INFER_MAX_EXAMPLES",), INFER_MAX_EXAMPLES=max_examples)
  if mode not in evaluation_lib.INFER_MODES:
    raise ValueError(f"INFER_MODE={mode!r}; choose one of {evaluation_lib.INFER_MODES}")
  if num_return_sequences is not None and mode != "predict":
    raise ValueError("NUM_RETURN_SEQUENCES (n-best outputs) goes with INFER_MODE='predict'")
  out_dir = storage.check_run_folder(output_dir, "INFER_OUTPUT_DIR")  # before any loading
  _register_saved_file_task(model_dir, dataset.mixture_or_task_name, dataset.module)
  setup = _build_for_eval(
      dataset, model_config=model_config, prompt_config=prompt_config,
      initial_checkpoint_path=initial_checkpoint_path, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, partition=partition, random_seed=random_seed,
      model_runtime=model_runtime, allow_nonfinite_frozen=allow_nonfinite_frozen)
  trainable, step = setup.trainable, "init"
  if steps is not None:
    trainable, _ = _restore_trainable(setup, model_dir, steps[-1])
    step = steps[-1]
  decoding = None if mode == "score" else decoding_config
  evaluation = evaluation_lib.Evaluation(setup, dataset, decoding_config=decoding,
                                         max_examples=max_examples, random_seed=random_seed)
  paths = []
  for data in evaluation.tasks:
    vocab = data.vocabulary
    base = [{"inputs": evaluation_lib.as_text(ex.get("inputs_pretokenized", b"")),
             "target": evaluation_lib.as_text(ex.get("targets_pretokenized", b""))}
            for ex in data.examples]
    if mode == "score":
      scores = evaluation.score(trainable, data)
      rows = [{**b, "score": float(s)} for b, s in zip(base, scores)]
    elif num_return_sequences is not None:
      tokens, scores = evaluation.n_best(trainable, data, num_return_sequences)
      rows = []
      for b, t_n, s_n in zip(base, tokens, scores):
        n_best = [{"prediction": vocab.decode(t.tolist()), "score": float(s)}
                  for t, s in zip(t_n, s_n)]
        rows.append({"inputs": b["inputs"], "prediction": n_best[0]["prediction"],
                     "target": b["target"], "n_best": n_best})
    else:
      tokens, scores = evaluation.predict(trainable, data)
      rows = [{"inputs": b["inputs"], "prediction": vocab.decode(t.tolist()),
               "score": float(s), "target": b["target"]}
              for b, t, s in zip(base, tokens, scores)]
      if mode == "predict_with_aux":
        for r, s in zip(rows, scores):
          r["aux_value"] = {"scores": float(s)}
    suffix = "" if mode == "predict" else f".{mode}"
    path = out_dir / f"{data.name}-{step}{suffix}.jsonl"
    if jax.process_index() == 0:
      write_jsonl(path, rows)
      log.info("Wrote %d rows (%s) to %s", len(rows), mode, path)
    paths.append(path)
  return paths


def configure_logging() -> None:
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["PromptInit", "PartitionConfig", "train", "evaluate", "infer",
           "build", "NonFiniteLossError", "Interrupted", "run_settings", "read_run_settings",
           "remembered_settings"]
