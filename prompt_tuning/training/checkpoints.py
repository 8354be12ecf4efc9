"""Training checkpoints with orbax: the trainable state, the data position, and metadata naming
the frozen checkpoint, so the frozen model is not copied into every checkpoint.

Layout of MODEL_DIR:
  checkpoints/<step>/params/     orbax PyTree: the trainable parameters (the prompt)
  checkpoints/<step>/state/      orbax PyTree: {"step", "opt_state"}
  checkpoints/<step>/metadata/   JSON: data position, INITIAL_CHECKPOINT_PATH, configs
  checkpoints/<step>/frozen/     only with save_frozen=True: every frozen parameter
  numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.npy   the prompt, for other tools
  numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt       the same bytes under the
      original implementation's name (it np.save-d to a file object, so no `.npy`)
  numpy_checkpoints/backup_checkpoint_<step>_<time>/   an export replaced by a re-export

MODEL_DIR may be a local folder or gs://bucket/run (all I/O through `prompt_tuning.formats.storage`).
Locally orbax writes each step into a temporary folder and renames it into place when complete;
on object storage, which has no folder rename, it writes the step in place and marks it complete
with `commit_success.txt` last. Either way a crash mid-save never leaves a checkpoint that looks
complete, and restore takes the latest complete one. Numpy exports follow the same protocol
(`storage.complete_folder`). The training run's Checkpointer (`cleanup_tmp=True`) deletes
leftovers of an interrupted save when it starts. A non-finite prompt is never saved.

Test hook: `PROMPT_TUNING_TEST_SLOW_SAVE=STEP:SECONDS` pauses the save of checkpoint STEP for
SECONDS after its data are written and before orbax commits it, so a test can kill the process
in the middle of a save (tests/runs/test_reliability.py).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from etils import epath

from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import storage

log = logging.getLogger("prompt_tuning")

FORMAT_VERSION = 1
SLOW_SAVE_ENV = "PROMPT_TUNING_TEST_SLOW_SAVE"


class NonFiniteCheckpointError(ValueError):
  """The trainable parameters hold NaN or Inf: saving them would overwrite good checkpoints."""


def _slow_commit(base):
  """orbax's commit protocol `base` with a pause before the commit (test hook, see above)."""

  class SlowCommit(base):

    async def finalize(self, *args, **kwargs):
      step, seconds = os.environ[SLOW_SAVE_ENV].split(":")
      if self.get_final().name == step:
        import asyncio
        logging.warning("%s: pausing %s s before committing %s", SLOW_SAVE_ENV, seconds,
                        self.get())
        await asyncio.sleep(float(seconds))
      return await super().finalize(*args, **kwargs)

  return SlowCommit


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Checkpointer:
  """Saves and restores the trainable state of one run directory.

  `cleanup_tmp=True` (only for the process that writes, i.e. training) removes temporary folders
  left by a save that was killed; readers such as eval must not, as training may be mid-save.
  """

  def __init__(self, model_dir: str | os.PathLike, *, keep: int | None = 3,
               save_frozen: bool = False, cleanup_tmp: bool = False,
               subdir: str = "checkpoints", numpy_subdir: str = "numpy_checkpoints"):
    self.model_dir = storage.path(model_dir, "MODEL_DIR")
    self.directory = self.model_dir / subdir
    self.numpy_dir = self.model_dir / numpy_subdir
    self.save_frozen = save_frozen
    items = ("params", "state", "metadata") + (("frozen",) if save_frozen else ())
    on_gcs = storage.is_object_storage(self.model_dir)
    slow = None
    if os.environ.get(SLOW_SAVE_ENV):
      slow = _slow_commit(ocp.path.atomicity.CommitFileTemporaryPath if on_gcs
                          else ocp.path.atomicity.AtomicRenameTemporaryPath)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=cleanup_tmp, temporary_path_class=slow)
    self.manager = ocp.CheckpointManager(
        self.directory if on_gcs else self.directory.absolute(), options=options,
        item_names=items)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict, frozen: Any = None) -> None:
    # The train loop already stops at a non-finite step; this keeps the promise for any caller.
    if not bool(_all_finite(state.params)):
      raise NonFiniteCheckpointError(
          f"Refusing to save checkpoint {step}: the trainable parameters contain NaN or Inf. "
          f"The previous checkpoints in {self.directory} are kept.")
    args = {"params": ocp.args.StandardSave(state.params),
            "state": ocp.args.StandardSave(_state_tree(state)),
            "metadata": ocp.args.JsonSave({**metadata, "format_version": FORMAT_VERSION,
                                           "step": int(step)})}
    if self.save_frozen:
      args["frozen"] = ocp.args.StandardSave(frozen)
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()
    self._export_numpy(step, state.params)

  def numpy_export_dir(self, step: int) -> epath.Path:
    return self.numpy_dir / f"checkpoint_{int(step)}"

  def ensure_numpy_export(self, step: int, trainable: Any) -> None:
    """Re-exports a restored checkpoint's prompt if a crash came between commit and export.

    An export missing one of its files (e.g. written before the extension-less copies existed)
    is written again; the old folder is kept as a backup.
    """
    names = _export_names(trainable)
    folder = self.numpy_export_dir(step)
    missing = bool(names) and not (storage.is_complete(folder) and
                                   all((folder / name).is_file() for name in names))
    if jax.process_count() > 1:  # exporting gathers: every process must make process 0's choice
      from jax.experimental import multihost_utils
      missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
    if missing:
      logging.warning("Checkpoint %d has no complete numpy export (interrupted save?): "
                      "writing it", step)
      self._export_numpy(step, trainable)

  def _export_numpy(self, step: int, trainable: Any) -> None:
    """Writes each prompt variable as `<dotted path>.npy` and `<dotted path>` (banks too).

    Both files hold the same `np.save` bytes; the extension-less one is the name the original
    implementation's tools look for. Other weights are not exported.
    """
    from prompt_tuning.model import partitioning  # gathering is collective: every process takes part
    arrays = {path: partitioning.to_host(leaf) for path, leaf in
              flax.traverse_util.flatten_dict(trainable, sep=".").items()
              if path.startswith("encoder.prompt.")}
    if jax.process_index() != 0 or not arrays:
      return
    out = self.numpy_export_dir(step)
    backup = None
    if out.exists():
      # A re-export of the same step (e.g. a rerun after a crash): keep the old one, as the
      # original did, under a name `checkpoint_*` globs do not pick up.
      now = time.time_ns()
      stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}_{now % 10**9:09d}"
      backup = _unused(out.with_name(f"backup_{out.name}_{stamp}"))
      logging.warning("%s exists already: moving it to %s", out, backup)
    # Complete or absent: a temporary folder renamed into place, or on object storage the
    # files in place and a marker object last (`storage.complete_folder`).
    with storage.complete_folder(out, backup=backup) as folder:
      for path, array in arrays.items():
        array = array.astype(np.float32)
        for name in (f"{path}.npy", path):
          if array.ndim == 2:
            prompt_io.save_prompt_npy(folder / name, array)
          else:  # a prompt bank [N, P, D]
            with (folder / name).open("wb") as f:
              np.save(f, array, allow_pickle=False)

  def restore(self, step: int, abstract_state: Any, abstract_frozen: Any = None):
    """Returns `(state tree dict, metadata, frozen or None)` restored onto the given shardings."""
    args = {"params": ocp.args.StandardRestore(abstract_state.params),
            "state": ocp.args.StandardRestore(_state_tree(abstract_state)),
            "metadata": ocp.args.JsonRestore()}
    if self.save_frozen and abstract_frozen is not None:
      args["frozen"] = ocp.args.StandardRestore(abstract_frozen)
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(**args))
    except Exception as e:
      raise ValueError(self._unreadable(step, e)) from e
    frozen = restored.get("frozen") if self.save_frozen else None
    return {**restored["state"], "params": restored["params"]}, restored["metadata"], frozen

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the trainable parameters (e.g. for eval), onto the given shardings."""
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:
      raise ValueError(f"Checkpoint {self.directory / str(step)} does not hold this run's "
                       f"trainable parameters ({e}). A different PROMPT_LENGTH or model?") from e
    return restored["params"]

  def _unreadable(self, step: int, error: Exception) -> str:
    """The fix first; tensorstore's own message (often kilobytes of spec) shortened after it."""
    folder = self.directory / str(int(step))
    earlier = [s for s in self.all_steps() if s < step]
    then = (f"the run then resumes from checkpoint {earlier[-1]}" if earlier else
            "there is no earlier checkpoint, so the run then starts from the beginning")
    detail = " ".join(str(error).split())
    detail = detail if len(detail) <= 400 else detail[:400] + " ..."
    mv = "gcloud storage mv" if storage.is_object_storage(folder) else "mv"
    return (f"Checkpoint {folder} cannot be read: it is corrupted or incomplete (a disk error, "
            f"a copy cut short, an edited file). Move it out of the way, e.g. "
            f"`{mv} {folder} {self.model_dir / f'corrupt_checkpoint_{int(step)}'}`; {then}. "
            f"(available checkpoints: {self.all_steps()}; error: {detail})")

  def read_metadata(self, step: int) -> dict:
    path = self.directory / str(int(step)) / "metadata" / "metadata"
    if not path.exists():
      candidates = list((self.directory / str(int(step)) / "metadata").glob("*"))
      path = candidates[0] if candidates else path
    return json.loads(path.read_text())

  def close(self) -> None:
    self.manager.close()


def _export_names(trainable: Any) -> list[str]:
  """The files `_export_numpy` writes for these trainable parameters."""
  paths = [path for path in flax.traverse_util.flatten_dict(trainable, sep=".")
           if path.startswith("encoder.prompt.")]
  return [name for path in paths for name in (f"{path}.npy", path)]


def _unused(path: epath.Path) -> epath.Path:
  candidate, n = path, 1
  while candidate.exists():
    candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
  return candidate


def _state_tree(state) -> dict:
  return {"step": state.step, "opt_state": state.opt_state}


def check_writable(model_dir: str | os.PathLike) -> None:
  """Fails early (before hours of compute) if MODEL_DIR (local or gs://) cannot be written.

  Creates nothing (see `storage.check_run_folder`): the checkpointer creates MODEL_DIR.
  """
  storage.check_run_folder(model_dir, "MODEL_DIR")


class DataStates:
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


class BestCheckpoint:
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
    self.checkpointer = Checkpointer(
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


def saved_steps(model_dir: str | None) -> list[int]:
  """The steps saved in MODEL_DIR/checkpoints, oldest first (none for a missing folder)."""
  if not model_dir or not (storage.path(model_dir) / "checkpoints").is_dir():
    return []
  ckpt = Checkpointer(model_dir, keep=None)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()
