"""Parameter trees of a T5 checkpoint: the expected shapes, the one check every load goes through,
the flat layout saved files use, and writing a checkpoint folder atomically."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5

Params = dict[str, Any]
Path = tuple[str, ...]

PROMPT_SUBTREE = ("encoder", "prompt")


def expected_shapes(config: T5Config) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flat `{path: ShapeDtypeStruct}` of `T5(config)`'s parameters (no prompt); allocates nothing."""
  return dict(_expected_shapes(config))


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: T5Config):
  tokens = jnp.ones((1, 1), jnp.int32)
  variables = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens, tokens)
  return flax.traverse_util.flatten_dict(flax.linen.meta.unbox(variables)["params"])


def check_params(flat: Mapping[Path, Any], expected: Mapping[Path, Any], *, source: str,
                 unknown=()) -> None:
  """Raises one ValueError listing every missing, unexpected, mis-shaped or unknown parameter."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshaped = sorted(k for k in set(flat) & set(expected)
                     if tuple(np.shape(flat[k])) != tuple(expected[k].shape))
  if not (missing or unexpected or misshaped or unknown):
    return
  lines = [f"Checkpoint {source} does not match the model config:"]

  def section(title, items):
    if items:
      lines.append(f"  {title} ({len(items)}):")
      lines.extend(f"    {item}" for item in items)

  section("missing", ["/".join(k) for k in missing])
  section("unexpected", ["/".join(k) for k in unexpected])
  section("unknown tensor names", sorted(unknown))
  section("wrong shape", [f"{'/'.join(k)}: checkpoint {tuple(np.shape(flat[k]))}, model "
                          f"{tuple(expected[k].shape)}" for k in misshaped])
  if misshaped:
    lines.append("  The checkpoint looks like another model size: pass the config= that matches "
                 "it (e.g. the right gin/models/*.gin file).")
  raise ValueError("\n".join(lines))


def flatten_for_saving(params) -> dict[Path, Any]:
  params = flax.linen.meta.unbox(flax.core.unfreeze(params))
  if set(params) == {"params"}:
    params = params["params"]
  flat = flax.traverse_util.flatten_dict(params)
  return {k: v for k, v in flat.items() if k[:2] != PROMPT_SUBTREE}


def drop_prompt(flat: dict[Path, Any], source: str) -> dict[Path, Any]:
  dropped = [k for k in flat if k[:2] == PROMPT_SUBTREE]
  if dropped:
    logging.info("%s: leaving out the prompt %s (prompts are loaded separately)", source,
                 ["/".join(k) for k in dropped])
  return {k: v for k, v in flat.items() if k[:2] != PROMPT_SUBTREE}




# --------------------------------------------------------------------------------------------
# Writing


def write_folder_atomically(path: str, write, overwrite: bool) -> None:
  """Calls `write(tmp_folder)` and renames the finished folder to `path`."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    write(tmp)
    if os.path.exists(path):
      old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
