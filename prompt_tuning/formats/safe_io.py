"""Reading files that come from strangers: one copy of each reader and of the path rule.

Checkpoints and prompt files are downloaded from anywhere, so nothing here runs code from a file:
safetensors through its own (Rust) parser, a torch `.bin` only through
`torch.load(weights_only=True)` (plain tensors, never an arbitrary pickle), and a T5X msgpack's
tensorstore specs only after every array path they name is checked to stay inside the checkpoint
folder (`inside`: relative, no `..`, no URL, no absolute path, no symlink that leads out).

Every function takes `error`, the exception type its caller reports (ValueError for frozen
checkpoints, `prompt_io.PromptFileError` for prompt files), so messages read the same everywhere.
"""
from __future__ import annotations

import os
import posixpath
import re

import numpy as np

TS_ARRAY_DRIVERS = ("zarr", "zarr3", "n5")
_KVSTORE_DRIVERS = ("file", "gfile", "gcs")
_URL = re.compile(r"^[A-Za-z][\w+.-]*:")


def check_relative(relative, what: str, *, error=ValueError) -> None:
  """`relative` must be a relative path that cannot leave the folder it is joined to."""
  if not isinstance(relative, str) or not relative:
    raise error(f"{what}: refusing path {relative!r}: expected a non-empty relative path inside "
                "the checkpoint folder")
  pieces = re.split(r"[/\\]", relative)
  if (relative.startswith(("/", "\\", "~")) or os.path.isabs(relative) or _URL.match(relative)
      or ".." in pieces):
    raise error(f"{what}: refusing path {relative!r}: it must be a relative path inside the "
                "checkpoint folder (no absolute paths, URLs, '~' or '..')")


def inside(folder, relative: str, *, what: str, error=ValueError) -> str:
  """`folder/relative`, after checking that it resolves (symlinks too) inside `folder`."""
  check_relative(relative, what, error=error)
  base = os.path.realpath(folder)
  full = os.path.realpath(os.path.join(base, relative))
  if os.path.commonpath([base, full]) != base or full == base:
    raise error(f"{what}: refusing path {relative!r}: it resolves to {full}, which leaves the "
                f"checkpoint folder {base} (outside it)")
  return full


def read_safetensors(path, *, error=ValueError) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy (bfloat16 as `ml_dtypes.bfloat16`)."""
  from safetensors import safe_open
  path = os.fspath(path)
  try:
    tensors, bf16 = {}, []
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        try:
          tensors[name] = f.get_tensor(name)
        except TypeError:  # numpy has no bfloat16: read those through jax
          bf16.append(name)
    if bf16:
      with safe_open(path, framework="flax") as f:
        for name in bf16:
          tensors[name] = np.asarray(f.get_tensor(name))
    return tensors
  except Exception as e:  # SafetensorError and friends: say which file and what to do
    raise error(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                f"{str(e)[:200]}); re-download or re-export it") from None


def read_torch_weights(path, *, bare_tensor_name: str | None = None,
                       error=ValueError) -> dict[str, np.ndarray]:
  """A torch state dict of plain tensors, read with `weights_only=True` (no code runs).

  A file holding one bare tensor is returned as `{bare_tensor_name: tensor}` when a name is
  given. bfloat16 tensors keep their bits (`ml_dtypes.bfloat16`).
  """
  path = os.fspath(path)
  try:
    import torch
  except ImportError:
    raise error(f"Reading {path} needs torch (pip install torch); or convert it to "
                "safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError & co. for anything beyond plain tensors: not run
    raise error(
        f"Refusing to load {path}: it is not a plain tensor file that torch.load("
        f"weights_only=True) accepts ({type(e).__name__}). It may contain code, which is never "
        "run; convert a trusted copy to safetensors instead.") from None
  if isinstance(state, torch.Tensor) and bare_tensor_name is not None:
    state = {bare_tensor_name: state}
  if not isinstance(state, dict):
    raise error(f"{path}: expected a dict of tensors, found {type(state).__name__}")
  tensors = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise error(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().contiguous()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      import ml_dtypes
      tensors[str(name)] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      tensors[str(name)] = value.numpy().copy()
  return tensors


def t5x_array_spec(spec: dict, ckpt_dir: str, name: str, *, error=ValueError) -> dict:
  """A T5X msgpack's tensorstore spec, rewritten to read from `ckpt_dir` (local or gs://).

  Refuses drivers other than zarr/n5 and any array path that leaves the checkpoint folder; a
  `cast` wrapper is dropped (callers cast themselves).
  """
  if spec.get("driver") == "cast" and isinstance(spec.get("base"), dict):
    spec = spec["base"]
  what = f"T5X parameter {name}"
  if spec.get("driver") not in TS_ARRAY_DRIVERS:
    raise error(f"{what}: unsupported tensorstore driver {spec.get('driver')!r} (expected one "
                f"of {TS_ARRAY_DRIVERS})")
  kvstore = spec.get("kvstore")
  parts = []
  if isinstance(kvstore, dict):
    if kvstore.get("driver") not in _KVSTORE_DRIVERS:
      raise error(f"{what}: unsupported kvstore driver {kvstore.get('driver')!r}")
    parts.append(kvstore.get("path", ""))
  elif kvstore is not None:
    raise error(f"{what}: unsupported kvstore {kvstore!r}")
  parts.append(spec.get("path", ""))  # old specs name the array folder at the top level
  for part in parts:
    if part:
      check_relative(part, what, error=error)
  if not any(parts):
    raise error(f"{what}: its tensorstore spec names no path")
  relative = posixpath.join(*[p for p in parts if p])
  new = {"driver": spec["driver"]}
  ckpt_dir = os.fspath(ckpt_dir)
  if ckpt_dir.startswith("gs://"):
    bucket, _, prefix = ckpt_dir[len("gs://"):].partition("/")
    new["kvstore"] = {"driver": "gcs", "bucket": bucket, "path": posixpath.join(prefix, relative)}
  else:
    new["kvstore"] = {"driver": "file", "path": inside(ckpt_dir, relative, what=what,
                                                       error=error)}
  for field in ("metadata", "dtype"):
    if field in spec:
      new[field] = spec[field]
  return new


__all__ = ["check_relative", "inside", "read_safetensors", "read_torch_weights",
           "t5x_array_spec", "TS_ARRAY_DRIVERS"]
