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

import contextlib
import functools
import json
import logging
import os
import pathlib
import posixpath
import re
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.formats import safe_io
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5

Params = dict[str, Any]
Path = tuple[str, ...]

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH = "pytorch_model.bin"
HF_TORCH_INDEX = "pytorch_model.bin.index.json"
T5X_MSGPACK = "checkpoint"
OUR_CONFIG = "t5_config.json"
OUR_PARAMS = "params"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
# Where generic orbax trees keep the model parameters (T5X train states, flax TrainState, ours).
_ORBAX_PARAM_PREFIXES = (("params",), ("target",), ("state", "params"), ("optimizer", "target"),
                         ("state", "target"))
_PROMPT_SUBTREE = ("encoder", "prompt")

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
    with _local_hf_folder(location) as folder:
      config, flat, unknown = _load_hf(folder, user_config)
  elif kind == "t5x":
    config = _require_config(user_config, location, "a T5X checkpoint")
    flat, unknown = _load_t5x_legacy(location, config), []
  elif kind == "ours":
    if user_config is None:
      user_config = T5Config.from_dict(json.loads(_read_bytes(_join(location, OUR_CONFIG))))
    config = user_config
    flat, unknown = _load_orbax(_join(location, OUR_PARAMS), config), []
  else:  # generic orbax
    config = _require_config(user_config, location, "an orbax checkpoint")
    flat, unknown = _load_orbax(location, config), []
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
  flat = _flatten_for_saving(params)
  check_params(flat, expected_shapes(model.config), source="params given to save_pretrained")
  tree = {"params": flax.traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})}

  def write(tmp):
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, OUR_PARAMS), tree)
    with open(os.path.join(tmp, OUR_CONFIG), "w", encoding="utf-8") as f:
      json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)

  _write_folder_atomically(path, write, overwrite)


def export_hf(path, config: T5Config, params: Params, *, overwrite: bool = False) -> None:
  """Writes an HF T5 folder (`config.json`, `model.safetensors`): the inverse of the HF import."""
  from safetensors.numpy import save_file
  path = os.path.abspath(os.fspath(path))
  flat = _flatten_for_saving(params)
  check_params(flat, expected_shapes(config), source="params given to export_hf")
  tensors = {}
  for key, value in flat.items():
    name, transpose = t5x_to_hf_name(key)
    value = np.asarray(value)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  hf_config = config.to_hf_dict()
  dtypes = {str(v.dtype) for v in tensors.values()}
  if len(dtypes) == 1:
    hf_config["dtype"] = dtypes.pop()

  def write(tmp):
    # transformers refuses safetensors files without the "format" metadata.
    save_file(tensors, os.path.join(tmp, HF_SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(tmp, HF_CONFIG), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)

  _write_folder_atomically(path, write, overwrite)


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
    if posixpath.basename(path.rstrip("/")) == T5X_MSGPACK:
      return "t5x", posixpath.dirname(path.rstrip("/"))
    if _read_bytes(posixpath.join(path, T5X_MSGPACK), missing_ok=True) is not None:
      return "t5x", path.rstrip("/")
    names = _gcs_names(path)
    if names & {HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_TORCH, HF_TORCH_INDEX}:
      return "hf", path
    if OUR_CONFIG in names and OUR_PARAMS in names:
      return "ours", path
    return "orbax", path
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if os.path.basename(path) == T5X_MSGPACK:
      return "t5x", os.path.dirname(path)
    if os.path.basename(path) in (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_TORCH, HF_TORCH_INDEX,
                                  HF_CONFIG):
      return "hf", os.path.dirname(path)
    raise ValueError(f"{path} is a file; pass the checkpoint folder (or a T5X `checkpoint` file)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} not found (HF hub names are not downloaded: "
                            "pass a local folder)")
  names = set(os.listdir(path))
  if names & {HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_TORCH, HF_TORCH_INDEX}:
    return "hf", path
  if OUR_CONFIG in names and OUR_PARAMS in names:
    return "ours", path
  if T5X_MSGPACK in names and not names & set(_ORBAX_MARKERS):
    return "t5x", path
  if names & set(_ORBAX_MARKERS):
    return "orbax", path
  steps = sorted((int(m.group(1)), n) for n in names
                 if (m := re.fullmatch(r"checkpoint_(\d+)", n))
                 and os.path.isdir(os.path.join(path, n)))
  if steps:  # a training folder: its latest step
    return detect_format(os.path.join(path, steps[-1][1]))
  if any(_is_orbax_tree(os.path.join(path, n)) for n in names):
    return "orbax", path  # a step folder whose items (e.g. `state/`) are orbax trees
  raise ValueError(f"{path} holds no checkpoint we can read: expected an HF folder "
                   f"({HF_CONFIG} + {HF_SAFETENSORS} or {HF_TORCH}), a T5X checkpoint_N folder "
                   f"(`{T5X_MSGPACK}` msgpack), an orbax checkpoint, or a folder of checkpoint_N")


def _gcs_names(url: str) -> set[str]:
  """The names in a gs:// folder (TensorFlow's GCS client, as for run folders); none if unlisted."""
  from prompt_tuning.formats import storage
  try:
    return {p.name for p in storage.path(url).iterdir()}
  except Exception:  # pylint: disable=broad-except  (no listing: orbax reports what is wrong)
    return set()


@contextlib.contextmanager
def _local_hf_folder(folder: str):
  """`folder`, or for gs:// a temporary local copy of its top-level weight and JSON files
  (safetensors and torch read local files)."""
  if not folder.startswith("gs://"):
    yield folder
    return
  from prompt_tuning.formats import storage
  with tempfile.TemporaryDirectory(prefix="hf_checkpoint_") as local:
    for p in storage.path(folder).iterdir():
      if p.suffix in (".json", ".safetensors", ".bin") and not p.is_dir():
        logging.info("Copying %s to %s", p, local)
        with p.open("rb") as src, open(os.path.join(local, p.name), "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
    yield local


def _is_orbax_tree(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m))
                                     for m in _ORBAX_MARKERS)


# --------------------------------------------------------------------------------------------
# Validation


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


def _flatten_for_saving(params) -> dict[Path, Any]:
  params = flax.linen.meta.unbox(flax.core.unfreeze(params))
  if set(params) == {"params"}:
    params = params["params"]
  flat = flax.traverse_util.flatten_dict(params)
  return {k: v for k, v in flat.items() if k[:2] != _PROMPT_SUBTREE}


def _drop_prompt(flat: dict[Path, Any], source: str) -> dict[Path, Any]:
  dropped = [k for k in flat if k[:2] == _PROMPT_SUBTREE]
  if dropped:
    logging.info("%s: leaving out the prompt %s (prompts are loaded separately)", source,
                 ["/".join(k) for k in dropped])
  return {k: v for k, v in flat.items() if k[:2] != _PROMPT_SUBTREE}


# --------------------------------------------------------------------------------------------
# HF


def t5x_to_hf_name(key: Path) -> tuple[str, bool]:
  """HF tensor name of one T5X parameter path, and whether the array is transposed there."""
  stack = key[0]
  if key == ("token_embedder", "embedding"):
    return "shared.weight", False
  if key == ("decoder", "logits_dense", "kernel"):
    return "lm_head.weight", True
  if key[1:] == ("relpos_bias", "rel_embedding"):
    # HF keeps the one shared table in block 0 as [buckets, heads].
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
  if key[1:] in (("encoder_norm", "scale"), ("decoder_norm", "scale")):
    return f"{stack}.final_layer_norm.weight", False
  m = re.fullmatch(r"layers_(\d+)", key[1]) if len(key) > 1 else None
  if stack in _HF_SUBLAYERS and m:
    i, rest = int(m.group(1)), key[2:]
    sublayers = _HF_SUBLAYERS[stack]
    if len(rest) == 2 and rest[1] == "scale" and rest[0] in _HF_NORMS[stack]:
      return f"{stack}.block.{i}.layer.{_HF_NORMS[stack].index(rest[0])}.layer_norm.weight", False
    if len(rest) == 3 and rest[2] == "kernel" and rest[0] in sublayers:
      j = list(sublayers).index(rest[0])
      module = sublayers[rest[0]]
      if module == "DenseReluDense" and rest[1] in ("wi", "wi_0", "wi_1", "wo"):
        return f"{stack}.block.{i}.layer.{j}.DenseReluDense.{rest[1]}.weight", True
      if module != "DenseReluDense" and rest[1] in _HF_PROJ:
        return f"{stack}.block.{i}.layer.{j}.{module}.{_HF_PROJ[rest[1]]}.weight", True
  raise ValueError(f"No HF name for parameter {'/'.join(key)}")


# Sub-layers of one block in HF order (the dict order is the HF `layer.{j}` index).
_HF_SUBLAYERS = {
    "encoder": {"attention": "SelfAttention", "mlp": "DenseReluDense"},
    "decoder": {"self_attention": "SelfAttention", "encoder_decoder_attention": "EncDecAttention",
                "mlp": "DenseReluDense"},
}
_HF_NORMS = {
    "encoder": ("pre_attention_layer_norm", "pre_mlp_layer_norm"),
    "decoder": ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm",
                "pre_mlp_layer_norm"),
}
_HF_PROJ = {"query": "q", "key": "k", "value": "v", "out": "o"}
# HF state dicts also hold these aliases of `shared.weight` (torch .bin files keep all of them).
_HF_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# A relative bias that HF itself ignores (old checkpoints stored one in cross-attention).
_HF_IGNORED = re.compile(r"decoder\.block\.\d+\.layer\.1\.EncDecAttention\.relative_attention_bias"
                         r"\.weight")


def _load_hf(folder: str, user_config: T5Config | None):
  """Reads an HF T5 folder into `(config, flat T5X params, unknown HF names)`."""
  hf_config = {}
  if os.path.exists(os.path.join(folder, HF_CONFIG)):
    with open(os.path.join(folder, HF_CONFIG), encoding="utf-8") as f:
      hf_config = json.load(f)
  tensors = _read_hf_tensors(folder)
  shared = tensors.get("shared.weight")
  for alias in _HF_EMBEDDING_ALIASES:
    if alias in tensors and shared is not None and _same(tensors[alias], shared):
      del tensors[alias]
  for name in [n for n in tensors if _HF_IGNORED.fullmatch(n)]:
    del tensors[name]
  # transformers 5 writes `tie_word_embeddings: true` for every T5 and ties whenever
  # `lm_head.weight` is absent or equal to `shared.weight`; logits are scaled by d_model**-0.5
  # iff `scale_decoder_outputs` (older configs: iff `tie_word_embeddings` is not false).
  lm_head = tensors.pop("lm_head.weight", None)
  separate_head = lm_head is not None and not (shared is not None and _same(lm_head, shared))
  scale = bool(hf_config.get("scale_decoder_outputs",
                             hf_config.get("tie_word_embeddings", True) is not False))
  if user_config is not None:
    config = user_config
  elif hf_config:
    config = T5Config.from_hf_dict(hf_config, has_lm_head=separate_head)
  else:
    raise ValueError(f"{folder} has no {HF_CONFIG}: add the model's config.json, or name the "
                     "architecture with its gin file, e.g. --gin_file=models/t5_1_1_base.gin")
  unknown = []
  if config.tie_word_embeddings:
    if separate_head:
      unknown.append("lm_head.weight (differs from shared.weight, but the config ties them)")
  else:
    head = lm_head if separate_head else shared
    if head is not None:
      if scale:  # untied but scaled (HF semantics): fold the scale into our untied kernel
        head = (head.astype(np.float32) * np.float32(config.d_model ** -0.5)).astype(head.dtype)
      tensors["lm_head.weight"] = head

  by_hf_name = {t5x_to_hf_name(k)[0]: k for k in expected_shapes(config)}
  flat = {}
  for name, value in tensors.items():
    if name in by_hf_name:
      key = by_hf_name[name]
      flat[key] = value.T if t5x_to_hf_name(key)[1] else value
    else:
      unknown.append(name)
  return config, flat, unknown


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _read_hf_tensors(folder: str) -> dict[str, np.ndarray]:
  names = set(os.listdir(folder))
  if HF_SAFETENSORS in names:
    return safe_io.read_safetensors(os.path.join(folder, HF_SAFETENSORS))
  if HF_SAFETENSORS_INDEX in names:
    return _read_sharded(folder, HF_SAFETENSORS_INDEX, safe_io.read_safetensors)
  if HF_TORCH in names:
    return safe_io.read_torch_weights(os.path.join(folder, HF_TORCH))
  if HF_TORCH_INDEX in names:
    return _read_sharded(folder, HF_TORCH_INDEX, safe_io.read_torch_weights)
  raise ValueError(f"{folder} holds no HF weights ({HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX}, "
                   f"{HF_TORCH} or {HF_TORCH_INDEX})")


def _read_sharded(folder: str, index_name: str, read) -> dict[str, np.ndarray]:
  with open(os.path.join(folder, index_name), encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = safe_io.inside(folder, shard, what=f"shard named in {index_name}")
    tensors.update(read(shard_path))
  return tensors


# --------------------------------------------------------------------------------------------
# T5X legacy: msgpack train state + tensorstore zarr folders


def _load_t5x_legacy(ckpt_dir: str, config: T5Config) -> dict[Path, np.ndarray]:
  from flax import serialization
  msgpack_path = _join(ckpt_dir, T5X_MSGPACK)
  state = serialization.msgpack_restore(_read_bytes(msgpack_path))
  if "optimizer" in state and "target" in state["optimizer"]:
    target = state["optimizer"]["target"]
  elif "target" in state:
    target = state["target"]
  else:
    raise ValueError(f"{msgpack_path} is not a T5X train state: no optimizer/target in "
                     f"{sorted(state)}")
  flat = _drop_prompt(flax.traverse_util.flatten_dict(
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


def _join(folder: str, name: str) -> str:
  return posixpath.join(folder, name) if folder.startswith("gs://") else os.path.join(folder, name)


def _read_bytes(path: str, missing_ok: bool = False) -> bytes | None:
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


def _load_orbax(path: str, config: T5Config) -> dict[Path, np.ndarray]:
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
  flat_meta = _drop_prompt(flax.traverse_util.flatten_dict(sub), root)
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
  items = [n for n in sorted(os.listdir(path)) if _is_orbax_tree(os.path.join(path, n))]
  for preferred in ("params", "state", "default"):
    if preferred in items:
      return os.path.join(path, preferred)
  if len(items) == 1:
    return os.path.join(path, items[0])
  if _is_orbax_tree(path):
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


# --------------------------------------------------------------------------------------------
# Writing


def _write_folder_atomically(path: str, write, overwrite: bool) -> None:
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
