"""Training checkpoints with orbax: the trainable state, the data position, and metadata naming
the frozen checkpoint, so the frozen model is not copied into every checkpoint.

Layout of MODEL_DIR:
  checkpoints/<step>/params/     orbax PyTree: the trainable parameters (the prompt)
  checkpoints/<step>/state/      orbax PyTree: {"step", "opt_state"}
  checkpoints/<step>/metadata/   JSON: data position, INITIAL_CHECKPOINT_PATH, configs
  checkpoints/<step>/frozen/     only with save_frozen=True: every frozen parameter
  numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.npy   the prompt, for other tools

orbax writes each step into a temporary folder and renames it into place when complete, so a
crash mid-save never leaves a checkpoint that looks complete; restore takes the latest complete one.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from prompt_tuning import prompt_io

FORMAT_VERSION = 1


class Checkpointer:
  """Saves and restores the trainable state of one run directory."""

  def __init__(self, model_dir: str | os.PathLike, *, keep: int | None = 3,
               save_frozen: bool = False):
    self.model_dir = pathlib.Path(model_dir)
    self.directory = self.model_dir / "checkpoints"
    self.save_frozen = save_frozen
    items = ("params", "state", "metadata") + (("frozen",) if save_frozen else ())
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options,
                                         item_names=items)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict, frozen: Any = None) -> None:
    args = {"params": ocp.args.StandardSave(state.params),
            "state": ocp.args.StandardSave(_state_tree(state)),
            "metadata": ocp.args.JsonSave({**metadata, "format_version": FORMAT_VERSION,
                                           "step": int(step)})}
    if self.save_frozen:
      args["frozen"] = ocp.args.StandardSave(frozen)
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()
    self._export_numpy(step, state.params)

  def _export_numpy(self, step: int, trainable: Any) -> None:
    """Writes each prompt variable as `<dotted path>.npy` (banks too; other weights are not)."""
    from prompt_tuning import partitioning  # gathering is collective: every process takes part
    arrays = {path: partitioning.to_host(leaf) for path, leaf in
              flax.traverse_util.flatten_dict(trainable, sep=".").items()
              if path.startswith("encoder.prompt.")}
    if jax.process_index() != 0:
      return
    out = self.model_dir / "numpy_checkpoints" / f"checkpoint_{int(step)}"
    for path, array in arrays.items():
      out.mkdir(parents=True, exist_ok=True)
      array = array.astype(np.float32)
      if array.ndim == 2:
        prompt_io.save_prompt_npy(out / f"{path}.npy", array)
      else:  # a prompt bank [N, P, D]
        tmp = out / f".{path}.npy.tmp"
        with open(tmp, "wb") as f:
          np.save(f, array, allow_pickle=False)
        os.replace(tmp, out / f"{path}.npy")

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
      raise ValueError(
          f"Could not restore checkpoint {self.directory / str(step)}: {e}. If this checkpoint "
          "is corrupted, move it aside and the run resumes from the previous one "
          f"(available: {self.all_steps()}).") from e
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

  def read_metadata(self, step: int) -> dict:
    path = self.directory / str(int(step)) / "metadata" / "metadata"
    if not path.exists():
      candidates = list((self.directory / str(int(step)) / "metadata").glob("*"))
      path = candidates[0] if candidates else path
    return json.loads(path.read_text())

  def close(self) -> None:
    self.manager.close()


def _state_tree(state) -> dict:
  return {"step": state.step, "opt_state": state.opt_state}


def check_writable(model_dir: str | os.PathLike) -> None:
  """Fails early (before hours of compute) if MODEL_DIR cannot be written."""
  path = pathlib.Path(model_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"MODEL_DIR {str(path)!r} is not writable ({e.strerror}); choose a folder "
                     "you can write to with --gin.MODEL_DIR=\"'/path/to/run'\"") from e
  logging.info("Writing to %s", path)
