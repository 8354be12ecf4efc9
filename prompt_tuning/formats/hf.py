"""HuggingFace T5 checkpoints: reading `config.json` + safetensors / torch weights (never unpickled)
by name into the T5X layout, and exporting ours so `transformers` loads it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from prompt_tuning.formats import safe_io
from prompt_tuning.model.config import T5Config

from prompt_tuning.formats.param_tree import (Params, Path, check_params, expected_shapes,
                                             flatten_for_saving, write_folder_atomically)

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH = "pytorch_model.bin"
HF_TORCH_INDEX = "pytorch_model.bin.index.json"


def export_hf(path, config: T5Config, params: Params, *, overwrite: bool = False) -> None:
  """Writes an HF T5 folder (`config.json`, `model.safetensors`): the inverse of the HF import."""
  from safetensors.numpy import save_file
  path = os.path.abspath(os.fspath(path))
  flat = flatten_for_saving(params)
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

  write_folder_atomically(path, write, overwrite)


@contextlib.contextmanager
def local_hf_folder(folder: str):
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


def load_hf(folder: str, user_config: T5Config | None):
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
