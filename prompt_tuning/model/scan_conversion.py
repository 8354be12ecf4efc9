"""Parameters between T5X's per-layer layout and the scanned layout (`T5Config.scan_layers`).

Per-layer (T5X checkpoints, HF conversions, the default): `encoder/layers_{i}/...`.
Scanned: `encoder/layers/...`, every leaf stacked on a new leading axis of length
`num_encoder_layers` (logical axis "layers"); the decoder likewise. Everything outside the layers
(embeddings, relative position biases, final norms, the prompt) is shared by both layouts.

Checkpoints stay in the per-layer layout: convert after loading (`to_scanned`) and before saving
or exporting (`to_per_layer`). Works on nested dicts of numpy or jax arrays, or of
`jax.ShapeDtypeStruct` (for planning without allocating).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.model.config import T5Config

STACKS = ("encoder", "decoder")


def _num_layers(config: T5Config, stack: str) -> int:
  return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def _stack(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _unstack(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def is_scanned(params: dict) -> bool:
  return "layers" in params.get("encoder", {}) or "layers" in params.get("decoder", {})


def to_scanned(params: dict, config: T5Config) -> dict:
  """Per-layer -> scanned. The input is not modified; a scanned tree is returned unchanged."""
  if is_scanned(params):
    return params
  out = dict(params)
  for stack in STACKS:
    if stack not in params:
      continue
    n = _num_layers(config, stack)
    names = [f"layers_{i}" for i in range(n)]
    missing = [name for name in names if name not in params[stack]]
    extra = sorted(k for k in params[stack] if k.startswith("layers_") and k not in names)
    if missing or extra:
      raise ValueError(f"{stack}: expected layers_0..layers_{n - 1} for a {n}-layer config; "
                       f"missing {missing}, unexpected {extra}")
    sub = {k: v for k, v in params[stack].items() if k not in names}
    sub["layers"] = jax.tree.map(_stack, *[params[stack][name] for name in names])
    out[stack] = sub
  return out


def to_per_layer(params: dict, config: T5Config) -> dict:
  """Scanned -> per-layer (T5X layout). A per-layer tree is returned unchanged."""
  if not is_scanned(params):
    return params
  out = dict(params)
  for stack in STACKS:
    if stack not in params or "layers" not in params[stack]:
      continue
    n = _num_layers(config, stack)
    stacked = params[stack]["layers"]
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if sizes != {n}:
      raise ValueError(f"{stack}/layers: leading axes {sorted(sizes)}, expected {n} layers")
    sub = {k: v for k, v in params[stack].items() if k != "layers"}
    for i in range(n):
      sub[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: _unstack(leaf, i), stacked)
    out[stack] = sub
  return out


def for_config(params: dict, config: T5Config) -> Any:
  """The layout `config.scan_layers` asks for, whichever layout `params` is in."""
  return to_scanned(params, config) if config.scan_layers else to_per_layer(params, config)
