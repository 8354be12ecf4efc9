"""A run's settings: recorded in MODEL_DIR/run_settings.json and each checkpoint's metadata,
compared when a run resumes, and read back by eval and infer for what their flags leave unset."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.formats import storage
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.runs.setup import PromptInit
from prompt_tuning.training import checkpoints as checkpoints_lib
from prompt_tuning.training import optimizers

log = logging.getLogger("prompt_tuning")


def shapes(tree) -> dict[str, list[int]]:
  import flax
  return {k: list(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def check_resumable(ckpt, step: int, trainable, *, config: T5Config,
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
  saved, now = meta.get("trainable_shapes"), shapes(trainable)
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


def check_same_settings(meta: Mapping[str, Any], settings: Mapping[str, Any], *, model_dir,
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
    steps = checkpoints_lib.saved_steps(str(root))
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
  nothing (`flags.parse_args(remembered=...)`)."""
  found = read_run_settings(model_dir)
  if found is None:
    return None
  source, settings = found
  values = {k: v for k, v in (settings.get("remembered") or {}).items()
            if k in REMEMBERED_MACROS and v is not None}
  return (source, values) if values else None


def register_saved_file_task(model_dir, task_name, module) -> None:
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
