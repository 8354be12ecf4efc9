"""Frozen T5 weights in and out: HF, T5X (legacy msgpack + tensorstore, or orbax), ours.

Usage:

  from prompt_tuning.formats import pretrained
  # An HF folder (config.json + model.safetensors / sharded / pytorch_model.bin):
  model, params = pretrained.load_pretrained("/ckpt/t5-v1_1-base")
  # A public T5X checkpoint. T5X records no architecture: name it (T5Config or HF dict; a model
  # gin file through gin_utils.config_from_gin("gin/models/t5_1_1_lm100k_base.gin")).
  model, params = pretrained.load_pretrained(
      "gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000",
      config=T5Config(...), dtype=jnp.bfloat16)
  pretrained.save_pretrained("/ckpt/mine", model, params)  # orbax `params/` + `t5_config.json`
  pretrained.export_hf("/ckpt/mine_hf", model.config, params)  # loads with transformers

`params` is the T5X-layout tree of `T5(config)` without a prompt (the caller adds one), as host
numpy arrays of the requested dtype: `jax.device_put` them with the shardings you train with.
Every load is checked against `jax.eval_shape(model.init, ...)`; missing, unexpected and
mis-shaped parameters are reported together in one ValueError.

Checkpoints come from strangers (DESIGN.md, "Security of what we load"): nothing is unpickled
(`torch.load(weights_only=True)` only), and the tensorstore specs inside a T5X msgpack may only
name folders inside the checkpoint folder (`safe_io`).
"""
from __future__ import annotations

from __future__ import annotations

import json
import os
import posixpath
import re
from typing import Mapping

import flax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5

from prompt_tuning.formats import hf
from prompt_tuning.formats import t5x
from prompt_tuning.formats.hf import export_hf, t5x_to_hf_name  # public names of this module
from prompt_tuning.formats.param_tree import (Params, Path, check_params, expected_shapes,
                                             flatten_for_saving, write_folder_atomically)

OUR_CONFIG = "t5_config.json"
OUR_PARAMS = "params"

# --------------------------------------------------------------------------------------------
# Entry points


def load_pretrained(path, config=None, dtype=jnp.float32) -> tuple[T5, Params]:
  """Loads frozen T5 weights from an HF, T5X (legacy or orbax) or our own checkpoint.

  `config`: a `T5Config`, a gin model file (`gin/models/*.gin`), an HF `config.json` dict, or
  None to use the checkpoint's own config (HF folders and `save_pretrained` output have one).
  Returns `(T5(config), params)`; params are numpy arrays cast to `dtype`.
  """
  path = os.fspath(path)
  user_config = resolve_config(config)
  kind, location = detect_format(path)
  if kind == "hf":
    with hf.local_hf_folder(location) as folder:
      config, flat, unknown = hf.load_hf(folder, user_config)
  elif kind == "t5x":
    config = _require_config(user_config, location, "a T5X checkpoint")
    flat, unknown = t5x.load_t5x_legacy(location, config), []
  elif kind == "ours":
    if user_config is None:
      user_config = T5Config.from_dict(json.loads(t5x.read_bytes(t5x.join(location, OUR_CONFIG))))
    config = user_config
    flat, unknown = t5x.load_orbax(t5x.join(location, OUR_PARAMS), config), []
  else:  # generic orbax
    config = _require_config(user_config, location, "an orbax checkpoint")
    flat, unknown = t5x.load_orbax(location, config), []
  expected = expected_shapes(config)
  check_params(flat, expected, source=location, unknown=unknown)
  target = jnp.dtype(jnp.float32 if dtype is None else dtype)
  params = flax.traverse_util.unflatten_dict(
      {k: np.asarray(v).astype(target, copy=False) for k, v in flat.items()})
  return T5(config), params


def save_pretrained(path, model: T5, params: Params, *, overwrite: bool = False) -> None:
  """Writes `params` as an orbax PyTree `{"params": ...}` under `path/params` + `t5_config.json`.

  The folder is assembled under a temporary name and renamed into place, so an interrupted save
  never leaves a folder that looks complete. A prompt in `params` is left out: prompts are saved
  by the training checkpointer.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  flat = flatten_for_saving(params)
  check_params(flat, expected_shapes(model.config), source="params given to save_pretrained")
  tree = {"params": flax.traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})}

  def write(tmp):
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, OUR_PARAMS), tree)
    with open(os.path.join(tmp, OUR_CONFIG), "w", encoding="utf-8") as f:
      json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)

  write_folder_atomically(path, write, overwrite)




# --------------------------------------------------------------------------------------------
# Configs


def resolve_config(config) -> T5Config | None:
  """A `T5Config` from a config, a gin model file, a JSON file or an HF config dict (None: None)."""
  if config is None or isinstance(config, T5Config):
    return config
  if isinstance(config, Mapping):
    return T5Config.from_hf_dict(config)
  if isinstance(config, (str, os.PathLike)):
    text = os.fspath(config)
    if text.endswith(".gin"):
      # Gin is parsed at the edges (entry points, scripts), never inside the loader.
      raise ValueError(f"config={text!r} is a gin file: parse it first with "
                       "prompt_tuning.cli.gin_utils.config_from_gin(path) and pass the T5Config")
    if text.endswith(".json"):
      with open(text, encoding="utf-8") as f:
        d = json.load(f)
      return T5Config.from_hf_dict(d) if "num_layers" in d else T5Config.from_dict(d)
    raise ValueError(f"config={text!r}: expected a .json config file")
  raise TypeError(f"config must be a T5Config, a JSON file path or an HF config dict, got "
                  f"{type(config).__name__}")




def _require_config(config: T5Config | None, location: str, what: str) -> T5Config:
  if config is None:
    raise ValueError(f"{location} is {what}, which does not record its architecture: name it "
                     "with the matching model gin file, e.g. --gin_file=models/"
                     "t5_1_1_lm100k_base.gin instead of models/from_checkpoint.gin (scripts: "
                     "--model_gin; Python: load_pretrained(path, config=T5Config(...)))")
  return config


# --------------------------------------------------------------------------------------------
# Format detection


def detect_format(path: str) -> tuple[str, str]:
  """`(kind, location)`: kind is "hf", "t5x" (legacy msgpack), "ours" or "orbax"."""
  if path.startswith("gs://"):
    # A path ending in `checkpoint` or a `checkpoint_N` folder holding one is T5X legacy; a
    # folder listing HF weights is HF, one with ours is ours; anything else goes to orbax.
    if posixpath.basename(path.rstrip("/")) == t5x.T5X_MSGPACK:
      return "t5x", posixpath.dirname(path.rstrip("/"))
    if t5x.read_bytes(posixpath.join(path, t5x.T5X_MSGPACK), missing_ok=True) is not None:
      return "t5x", path.rstrip("/")
    names = _gcs_names(path)
    if names & {hf.HF_SAFETENSORS, hf.HF_SAFETENSORS_INDEX, hf.HF_TORCH, hf.HF_TORCH_INDEX}:
      return "hf", path
    if OUR_CONFIG in names and OUR_PARAMS in names:
      return "ours", path
    return "orbax", path
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if os.path.basename(path) == t5x.T5X_MSGPACK:
      return "t5x", os.path.dirname(path)
    if os.path.basename(path) in (hf.HF_SAFETENSORS, hf.HF_SAFETENSORS_INDEX, hf.HF_TORCH, hf.HF_TORCH_INDEX,
                                  hf.HF_CONFIG):
      return "hf", os.path.dirname(path)
    raise ValueError(f"{path} is a file; pass the checkpoint folder (or a T5X `checkpoint` file)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} not found (HF hub names are not downloaded: "
                            "pass a local folder)")
  names = set(os.listdir(path))
  if names & {hf.HF_SAFETENSORS, hf.HF_SAFETENSORS_INDEX, hf.HF_TORCH, hf.HF_TORCH_INDEX}:
    return "hf", path
  if OUR_CONFIG in names and OUR_PARAMS in names:
    return "ours", path
  if t5x.T5X_MSGPACK in names and not names & set(t5x.ORBAX_MARKERS):
    return "t5x", path
  if names & set(t5x.ORBAX_MARKERS):
    return "orbax", path
  steps = sorted((int(m.group(1)), n) for n in names
                 if (m := re.fullmatch(r"checkpoint_(\d+)", n))
                 and os.path.isdir(os.path.join(path, n)))
  if steps:  # a training folder: its latest step
    return detect_format(os.path.join(path, steps[-1][1]))
  if any(t5x.is_orbax_tree(os.path.join(path, n)) for n in names):
    return "orbax", path  # a step folder whose items (e.g. `state/`) are orbax trees
  raise ValueError(f"{path} holds no checkpoint we can read: expected an HF folder "
                   f"({hf.HF_CONFIG} + {hf.HF_SAFETENSORS} or {hf.HF_TORCH}), a T5X checkpoint_N folder "
                   f"(`{t5x.T5X_MSGPACK}` msgpack), an orbax checkpoint, or a folder of checkpoint_N")


def _gcs_names(url: str) -> set[str]:
  """The names in a gs:// folder (TensorFlow's GCS client, as for run folders); none if unlisted."""
  from prompt_tuning.formats import storage
  try:
    return {p.name for p in storage.path(url).iterdir()}
  except Exception:  # pylint: disable=broad-except  (no listing: orbax reports what is wrong)
    return set()
