"""T5X checkpoints: the legacy layout (msgpack + tensorstore arrays, specs confined to the
checkpoint folder) and orbax PyTrees (T5X's newer format and ours), read by name."""
from __future__ import annotations

import os
import posixpath
from typing import Mapping

import flax
import jax
import numpy as np

from prompt_tuning.formats import safe_io
from prompt_tuning.model.config import T5Config

from prompt_tuning.formats.param_tree import (Path, check_params, drop_prompt, expected_shapes)

T5X_MSGPACK = "checkpoint"
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
# Where generic orbax trees keep the model parameters (T5X train states, flax TrainState, ours).
_ORBAX_PARAM_PREFIXES = (("params",), ("target",), ("state", "params"), ("optimizer", "target"),
                         ("state", "target"))


def is_orbax_tree(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m))
                                     for m in ORBAX_MARKERS)


# --------------------------------------------------------------------------------------------
# T5X legacy: msgpack train state + tensorstore zarr folders


def load_t5x_legacy(ckpt_dir: str, config: T5Config) -> dict[Path, np.ndarray]:
  from flax import serialization
  msgpack_path = join(ckpt_dir, T5X_MSGPACK)
  state = serialization.msgpack_restore(read_bytes(msgpack_path))
  if "optimizer" in state and "target" in state["optimizer"]:
    target = state["optimizer"]["target"]
  elif "target" in state:
    target = state["target"]
  else:
    raise ValueError(f"{msgpack_path} is not a T5X train state: no optimizer/target in "
                     f"{sorted(state)}")
  flat = drop_prompt(flax.traverse_util.flatten_dict(
      target, is_leaf=lambda _, v: _is_ts_spec(v)), ckpt_dir)
  # Check every path first (a refused spec must never be opened), then shapes, then read.
  specs = {k: safe_io.t5x_array_spec(v, ckpt_dir, "/".join(k))
           for k, v in flat.items() if _is_ts_spec(v)}
  import tensorstore as ts
  context = ts.Context()
  stores = {k: ts.open(spec, open=True, read=True, context=context).result()
            for k, spec in specs.items()}
  shapes = {k: (stores[k] if k in stores else v) for k, v in flat.items()}
  check_params({k: _Shaped(tuple(v.shape)) for k, v in shapes.items()}, expected_shapes(config),
               source=ckpt_dir)
  reads = {k: store.read() for k, store in stores.items()}  # concurrent reads
  return {k: (np.asarray(reads[k].result()) if k in reads else np.asarray(v))
          for k, v in flat.items()}


class _Shaped:
  """A stand-in with just a shape, to validate before reading the arrays."""

  def __init__(self, shape):
    self.shape = shape


def _is_ts_spec(value) -> bool:
  return isinstance(value, dict) and "driver" in value


def join(folder: str, name: str) -> str:
  return posixpath.join(folder, name) if folder.startswith("gs://") else os.path.join(folder, name)


def read_bytes(path: str, missing_ok: bool = False) -> bytes | None:
  if path.startswith("gs://"):
    import tensorstore as ts
    bucket, _, key = path[len("gs://"):].partition("/")
    store = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    result = store.read(key).result()
    if result.state != "value":
      if missing_ok:
        return None
      raise FileNotFoundError(path)
    return bytes(result.value)
  if missing_ok and not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return f.read()


# --------------------------------------------------------------------------------------------
# Orbax (ours, T5X since 2024, flax TrainState)


def load_orbax(path: str, config: T5Config) -> dict[Path, np.ndarray]:
  """Restores only the model parameters of an orbax PyTree checkpoint, as numpy arrays."""
  import orbax.checkpoint as ocp
  root = _orbax_tree_dir(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(root)
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
  if tree is None:
    tree = metadata
  prefix = _find_params(tree, root)
  sub = tree
  for k in prefix:
    sub = sub[k]
  flat_meta = drop_prompt(flax.traverse_util.flatten_dict(sub), root)
  check_params({k: _Shaped(tuple(getattr(v, "shape", ()))) for k, v in flat_meta.items()},
               expected_shapes(config), source=root)
  wanted = flax.traverse_util.unflatten_dict(flat_meta)
  for k in reversed(prefix):
    wanted = {k: wanted}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  item = jax.tree.map(lambda _: 0, wanted)
  restored = checkpointer.restore(root, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  for k in prefix:
    restored = restored[k]
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(restored).items()}


def _orbax_tree_dir(path: str) -> str:
  if path.startswith("gs://") or os.path.exists(os.path.join(path, "_METADATA")):
    return path
  # A CheckpointManager step folder: its items are sub-folders (T5X: `state`).
  items = [n for n in sorted(os.listdir(path)) if is_orbax_tree(os.path.join(path, n))]
  for preferred in ("params", "state", "default"):
    if preferred in items:
      return os.path.join(path, preferred)
  if len(items) == 1:
    return os.path.join(path, items[0])
  if is_orbax_tree(path):
    return path
  raise ValueError(f"{path}: cannot tell which orbax item holds the parameters among {items}")


def _find_params(tree, root: str) -> tuple[str, ...]:
  def looks_like_params(d):
    return isinstance(d, Mapping) and {"encoder", "decoder", "token_embedder"} <= set(d)

  if looks_like_params(tree):
    return ()
  for prefix in _ORBAX_PARAM_PREFIXES:
    sub = tree
    for k in prefix:
      sub = sub.get(k) if isinstance(sub, Mapping) else None
    if looks_like_params(sub):
      return prefix
  top = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
  raise ValueError(f"{root}: no T5 parameters under any of "
                   f"{['/'.join(p) for p in _ORBAX_PARAM_PREFIXES]} (top-level keys: {top})")
