"""Reading and writing prompts: `.npy`, the original's numpy exports, HF PEFT adapters, T5X.

Every reader returns a float32 `prompt_PxD` and validates at the boundary: files come from
strangers, so nothing here unpickles (`np.load(allow_pickle=False)`; safetensors, torch `.bin`
and T5X tensorstore specs through `safe_io`, the one copy of those readers and of the rule that
array paths stay inside their checkpoint folder). Writers go through `prompt_tuning.formats.storage`
(local paths or gs://): a temporary name and a rename locally, a single upload or a folder with a
completion marker on object storage, so a crash never leaves a half-written file that looks
complete. Readers take gs:// paths too.

Formats (see DESIGN.md, "Prompt export for other frameworks"):
- `.npy`, or an extension-less file written by `np.save(file_object, ...)` (the original
  implementation's periodic exports); recognised by the `\\x93NUMPY` magic, not the name.
- A PEFT prompt-tuning adapter folder: `adapter_config.json` + `adapter_model.safetensors` (or
  `adapter_model.bin`) holding `prompt_embeddings` [P * num_transformer_submodules, D]; the
  encoder prompt is rows `[:num_virtual_tokens]`. PEFT's seq2seq default (2 submodules) also
  stores a decoder-side block of P rows, which PEFT's prompt tuning has not used since
  huggingface/peft#519 (2023): it is left out, with a warning that says so.
- An `adapter_model.safetensors`/`.bin` file on its own (its sibling `adapter_config.json`, if
  any, gives P), or any `.safetensors` file with one tensor.
- A T5X legacy msgpack checkpoint (`extract_prompt_from_t5x`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Sequence

import numpy as np
from etils import epath

from prompt_tuning.formats import safe_io
from prompt_tuning.formats import storage

NPY_MAGIC = b"\x93NUMPY"
PEFT_CONFIG = "adapter_config.json"
PEFT_SAFETENSORS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
PEFT_TENSOR = "prompt_embeddings"
T5X_PROMPT_PATH = ("encoder", "prompt", "prompt")

# T5 1.1 widths, to turn a d_model mismatch into "this prompt was trained for T5 base".
_SIZE_BY_D_MODEL = {512: "small", 768: "base", 1024: "large", 2048: "xl", 4096: "xxl"}
# The header of a prompt's safetensors file is tiny; refuse absurd sizes before reading them.
_MAX_SAFETENSORS_HEADER = 1 << 24

PathLike = str | os.PathLike


class PromptFileError(ValueError):
  """A prompt file is missing, malformed, unsafe, or of the wrong shape."""


# ----- reading -----

def load_prompt(path: PathLike, *, expected_shape: Sequence[int] | None = None) -> np.ndarray:
  """Loads a prompt from any supported format; returns float32 `[P, D]`.

  `expected_shape` (P, D), when given, must match exactly; the error says which knob to turn.
  """
  path = storage.path(path, "PROMPT_FILE")
  if path.is_dir():
    prompt = _load_peft_dir(path)
  elif path.is_file():
    prompt = _load_file(path)
  else:
    raise PromptFileError(f"Prompt file {path} does not exist")
  prompt_PxD = as_prompt(prompt, source=path)
  if expected_shape is not None:
    check_shape(prompt_PxD, expected_shape, source=path)
  return prompt_PxD


def as_prompt(array: Any, *, source: Any = "the prompt") -> np.ndarray:
  """Validates a prompt array (float, rank 2, finite) and returns it as float32 numpy."""
  array = np.asarray(array)
  if array.dtype == object or not _is_float(array.dtype):
    raise PromptFileError(f"{source}: found dtype {array.dtype}, expected a floating-point "
                          "prompt (float16/bfloat16/float32/float64)")
  if array.ndim != 2:
    raise PromptFileError(f"{source}: found an array of shape {array.shape} (rank {array.ndim}), "
                          "expected a rank-2 prompt [prompt_length, d_model]")
  prompt_PxD = array.astype(np.float32)
  if not np.all(np.isfinite(prompt_PxD)):
    raise PromptFileError(f"{source}: the prompt contains NaN or infinite values")
  return prompt_PxD


def check_shape(prompt_PxD: np.ndarray, expected_shape: Sequence[int], *,
                source: Any = "the prompt") -> None:
  """Raises an error naming both shapes and the fix when `prompt_PxD` is not `expected_shape`."""
  expected = tuple(int(n) for n in expected_shape)
  found = tuple(prompt_PxD.shape)
  if found == expected:
    return
  hints = []
  if len(expected) == 2 and found[0] != expected[0]:
    hints.append(f"set PROMPT_LENGTH = {found[0]} to use this prompt as it is")
  if len(expected) == 2 and found[1] != expected[1]:
    size = _SIZE_BY_D_MODEL.get(found[1])
    made_for = f" (T5 1.1 {size})" if size else ""
    hints.append(f"the prompt has d_model {found[1]}{made_for} but the model has "
                 f"{expected[1]}: use the model size the prompt was trained for")
  hint = "; ".join(hints) or "check the prompt and model configuration"
  raise PromptFileError(f"{source}: prompt shape {found} does not match the expected shape "
                        f"{expected}: {hint}")


def _is_float(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _load_file(path: epath.Path) -> np.ndarray:
  with path.open("rb") as f:
    head = f.read(8)
  if head.startswith(NPY_MAGIC):
    return _load_npy(path)
  suffix = path.suffix.lower()
  if suffix == ".safetensors" or _looks_like_safetensors(head, path):
    return _from_weights(_read_safetensors(path), path)
  if suffix in (".bin", ".pt", ".pth"):
    return _from_weights(_read_torch_weights(path), path)
  if head.startswith(b"PK"):
    raise PromptFileError(f"{path}: a zip archive (.npz or an unnamed torch file) is not a "
                          "prompt format we read; save the prompt as .npy or safetensors")
  raise PromptFileError(f"{path}: unrecognised prompt format (expected a .npy file, an "
                        "extension-less numpy export, a .safetensors file or a PEFT adapter "
                        "folder); pickle files are never loaded")


def _load_npy(path: epath.Path) -> np.ndarray:
  try:
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise PromptFileError(f"{path}: refused to load ({e}); prompt files must hold a plain "
                          "float array, and pickled objects are never loaded") from None


def _load_peft_dir(path: epath.Path) -> np.ndarray:
  config_path = path / PEFT_CONFIG
  if not config_path.is_file():
    raise PromptFileError(f"{path} is a folder without {PEFT_CONFIG}: expected a PEFT "
                          "prompt-tuning adapter folder or a prompt file")
  config = _read_peft_config(config_path)
  if (path / PEFT_SAFETENSORS).is_file():
    weights_path = path / PEFT_SAFETENSORS
    tensors = _read_safetensors(weights_path)
  elif (path / PEFT_BIN).is_file():
    weights_path = path / PEFT_BIN
    tensors = _read_torch_weights(weights_path)
  else:
    raise PromptFileError(f"{path}: PEFT adapter folder has neither {PEFT_SAFETENSORS} nor "
                          f"{PEFT_BIN}")
  return _from_weights(tensors, weights_path, config)


def _from_weights(tensors: dict[str, np.ndarray], path: epath.Path,
                  config: dict | None = None) -> np.ndarray:
  """The prompt in a weights file; a PEFT config (given, or beside `adapter_model.*`) gives P."""
  sibling = path.parent / PEFT_CONFIG
  if config is None and path.stem == "adapter_model" and sibling.is_file():
    config = _read_peft_config(sibling)
  embeddings = _pick_tensor(tensors, path)
  if config is None:
    return embeddings
  token_dim = config.get("token_dim")
  if token_dim is not None and embeddings.ndim == 2 and embeddings.shape[1] != token_dim:
    raise PromptFileError(f"{path}: {PEFT_TENSOR} has width {embeddings.shape[1]} but the "
                          f"adapter config says token_dim {token_dim}")
  return _peft_rows(embeddings, config, path)


def _read_peft_config(config_path: epath.Path) -> dict:
  try:
    config = json.loads(config_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PromptFileError(f"{config_path}: not a readable JSON file ({e})") from None
  if not isinstance(config, dict):
    raise PromptFileError(f"{config_path}: expected a JSON object")
  peft_type = config.get("peft_type")
  if peft_type != "PROMPT_TUNING":
    raise PromptFileError(f"{config_path}: peft_type is {peft_type!r}, expected "
                          "'PROMPT_TUNING' (prefix tuning, P-tuning and LoRA adapters are not "
                          "prompts)")
  nvt = config.get("num_virtual_tokens")
  if not isinstance(nvt, int) or isinstance(nvt, bool) or nvt <= 0:
    raise PromptFileError(f"{config_path}: num_virtual_tokens is {nvt!r}, expected a positive "
                          "int")
  return config


def _peft_rows(embeddings: np.ndarray, config: dict, source) -> np.ndarray:
  """The encoder prompt: PEFT stores one block of P rows per transformer submodule.

  With 2 submodules (PEFT's seq2seq default) the second block is the decoder side. PEFT's prompt
  tuning feeds only the first block to the model (forward and generate, since
  huggingface/peft#519), so the first block alone reproduces PEFT; the second is never dropped
  silently. Adapters trained before that change (PEFT 0.3) prepended it to the decoder input,
  which this model, like the paper's, does not have.
  """
  if embeddings.ndim != 2:
    return embeddings  # as_prompt names the rank
  length = config["num_virtual_tokens"]
  rows = embeddings.shape[0]
  blocks = config.get("num_transformer_submodules")
  if blocks is None:  # older configs: infer from the tensor
    blocks = rows // length if rows % length == 0 else None
  if blocks not in (1, 2) or isinstance(blocks, bool) or rows != blocks * length:
    raise PromptFileError(
        f"{source}: {PEFT_TENSOR} has {rows} rows, expected num_virtual_tokens={length} times "
        f"num_transformer_submodules={config.get('num_transformer_submodules')} (1: encoder "
        "prompt only; 2: encoder then decoder block, PEFT's seq2seq default)")
  if blocks == 2:
    logging.warning(
        "%s: a PEFT adapter with num_transformer_submodules=2: using rows 0-%d (the encoder "
        "prompt) and leaving out rows %d-%d (the decoder-side block). PEFT's prompt tuning "
        "never feeds that block to the model (since huggingface/peft#519, 2023), so this prompt "
        "gives PEFT's outputs. An adapter trained with PEFT 0.3 or earlier had the block "
        "prepended to the decoder input, which this model has no place for: retrain it with "
        "PromptTuningConfig(num_transformer_submodules=1).", source, length - 1, length,
        rows - 1)
  return embeddings[:length]


def _pick_tensor(tensors: dict[str, np.ndarray], source) -> np.ndarray:
  if PEFT_TENSOR in tensors:
    return tensors[PEFT_TENSOR]
  if len(tensors) == 1:
    return next(iter(tensors.values()))
  raise PromptFileError(f"{source}: expected a tensor named {PEFT_TENSOR!r} (or a single "
                        f"tensor), found {sorted(tensors)}")


def _size(f) -> int:
  """The size of an open file (a local file or a GCS object)."""
  f.seek(0, 2)
  size = f.tell()
  f.seek(0)
  return size


def _looks_like_safetensors(head: bytes, path: epath.Path) -> bool:
  if len(head) < 8:
    return False
  n = int.from_bytes(head, "little")
  with path.open("rb") as f:
    if not 2 <= n <= _MAX_SAFETENSORS_HEADER or n + 8 > _size(f):
      return False
    f.seek(8)
    return f.read(1) == b"{"


@contextlib.contextmanager
def _local(path):
  """A local file with `path`'s bytes: the file itself, or a temporary copy of a gs:// object
  (the safetensors and torch readers read local files)."""
  if not storage.is_object_storage(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, pathlib.PurePosixPath(os.fspath(path)).name)
    with open(local, "wb") as f:
      f.write(storage.path(path).read_bytes())
    yield local


def _read_safetensors(path) -> dict[str, np.ndarray]:
  with _local(path) as local:
    return _floats(safe_io.read_safetensors(local, error=PromptFileError), path)


def _read_torch_weights(path) -> dict[str, np.ndarray]:
  with _local(path) as local:
    return _floats(safe_io.read_torch_weights(local, bare_tensor_name=PEFT_TENSOR,
                                              error=PromptFileError), path)


def _floats(tensors: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  """A prompt file's tensors must be floating point (bfloat16 included)."""
  for name, value in tensors.items():
    if not _is_float(value.dtype):
      raise PromptFileError(f"{path}: tensor {name!r} has dtype {value.dtype}, expected a "
                            "floating-point prompt")
  return tensors


# ----- T5X -----

def extract_prompt_from_t5x(checkpoint_dir: PathLike,
                            path: str | Sequence[str] = T5X_PROMPT_PATH, *,
                            expected_shape: Sequence[int] | None = None) -> np.ndarray:
  """Reads one array (the prompt by default) from a T5X legacy msgpack checkpoint.

  `checkpoint_dir` is the `checkpoint_N` folder (or its `checkpoint` file). `path` is a tuple or
  a `/`-separated string, relative to the parameters; a leading `target/` (the original
  implementation's `target/encoder/prompt/prompt`) or `optimizer/target/` is accepted.
  """
  from flax import serialization

  checkpoint_dir = pathlib.Path(checkpoint_dir)
  msgpack_file = checkpoint_dir
  if checkpoint_dir.is_dir():
    msgpack_file = checkpoint_dir / "checkpoint"
  else:
    checkpoint_dir = checkpoint_dir.parent
  if not msgpack_file.is_file():
    raise PromptFileError(f"{msgpack_file} does not exist: expected a T5X checkpoint_N folder "
                          "holding a msgpack `checkpoint` file")
  try:
    state = serialization.msgpack_restore(msgpack_file.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise PromptFileError(f"{msgpack_file}: not a T5X msgpack checkpoint ({e})") from None
  parts = tuple(p for p in (path.split("/") if isinstance(path, str) else path) if p)
  leaf = _find_in_t5x(state, parts, msgpack_file)
  source = f"{msgpack_file}:{'/'.join(parts)}"
  if isinstance(leaf, dict) and "driver" in leaf:
    leaf = _read_tensorstore(leaf, checkpoint_dir, source)
  elif isinstance(leaf, dict):
    raise PromptFileError(f"{source} is a subtree with keys {sorted(leaf)}, not an array")
  prompt_PxD = as_prompt(leaf, source=source)
  if expected_shape is not None:
    check_shape(prompt_PxD, expected_shape, source=source)
  return prompt_PxD


def _find_in_t5x(state: dict, parts: tuple[str, ...], source) -> Any:
  # Parameters live at optimizer/target/...; try the path as given first, then under them.
  for prefix in ((), ("optimizer",), ("optimizer", "target"), ("target",)):
    node = state
    for key in prefix + parts:
      if not isinstance(node, dict) or key not in node:
        break
      node = node[key]
    else:
      return node
  target = state.get("optimizer", {}) if isinstance(state, dict) else {}
  target = target.get("target", {}) if isinstance(target, dict) else {}
  keys = sorted(target) if isinstance(target, dict) else []
  raise PromptFileError(f"{source}: no array at {'/'.join(parts)!r} (tried it as given and "
                        f"under optimizer/target/); parameter keys there: {keys}")


def _read_tensorstore(spec: dict, checkpoint_dir: pathlib.Path, source: str) -> np.ndarray:
  """Opens a T5X tensorstore spec, pinned to a folder inside the checkpoint."""
  import tensorstore as ts
  pinned = safe_io.t5x_array_spec(spec, str(checkpoint_dir), source, error=PromptFileError)
  try:
    return np.asarray(ts.open(pinned, open=True, read=True).result().read().result())
  except Exception as e:  # tensorstore reports missing or corrupt arrays as ValueError & co.
    raise PromptFileError(f"{source}: could not read the array folder "
                          f"{pinned['kvstore'].get('path')} ({e})") from None


# ----- writing -----

def save_prompt_npy(path: PathLike, prompt_PxD: Any):
  """Writes float32 `[P, D]` to exactly `path` (no `.npy` added), atomically (local or gs://)."""
  prompt_PxD = as_prompt(prompt_PxD)
  data = io.BytesIO()
  np.save(data, prompt_PxD, allow_pickle=False)
  return storage.atomic_write(path, data.getvalue())


def peft_adapter_config(prompt_PxD: np.ndarray, *, base_model_name_or_path: str | None,
                        num_layers: int, num_attention_heads: int,
                        tokenizer_name_or_path: str | None = None) -> dict:
  """The `adapter_config.json` of a PEFT prompt-tuning adapter for an encoder-decoder."""
  length, d_model = prompt_PxD.shape
  return {
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "inference_mode": True,
      "modules_to_save": None,
      "num_attention_heads": int(num_attention_heads),
      "num_layers": int(num_layers),
      # 1: the prompt goes on the encoder only (PEFT's seq2seq default of 2 also prompts the
      # decoder, which the paper's method does not).
      "num_transformer_submodules": 1,
      "num_virtual_tokens": int(length),
      "peft_type": "PROMPT_TUNING",
      # RANDOM: PEFT must not re-initialise from text; the weights file holds the prompt.
      "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None,
      "revision": None,
      "task_type": "SEQ_2_SEQ_LM",
      "token_dim": int(d_model),
      "tokenizer_kwargs": None,
      "tokenizer_name_or_path": tokenizer_name_or_path,
  }


def export_peft_adapter(out_dir: PathLike, prompt_PxD: Any, *, base_model_name_or_path: str,
                        num_layers: int, num_attention_heads: int, token_dim: int | None = None,
                        tokenizer_name_or_path: str | None = None,
                        overwrite: bool = False):
  """Writes a HF PEFT prompt-tuning adapter folder; loads with `PeftModel.from_pretrained`.

  The folder appears complete or not at all (`storage.complete_folder`: a rename locally, a
  marker object on gs://). An existing `out_dir` is replaced only with `overwrite=True`.
  """
  from safetensors.numpy import save

  out_dir = storage.path(out_dir, "the adapter folder")
  prompt_PxD = as_prompt(prompt_PxD)
  if token_dim is not None and token_dim != prompt_PxD.shape[1]:
    raise ValueError(f"token_dim={token_dim} but the prompt has d_model {prompt_PxD.shape[1]}")
  for name, value in (("num_layers", num_layers), ("num_attention_heads", num_attention_heads)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
  config = peft_adapter_config(prompt_PxD, base_model_name_or_path=base_model_name_or_path,
                               num_layers=num_layers, num_attention_heads=num_attention_heads,
                               tokenizer_name_or_path=tokenizer_name_or_path)
  with storage.complete_folder(out_dir, replace=overwrite) as folder:
    (folder / PEFT_CONFIG).write_bytes(
        (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    (folder / PEFT_SAFETENSORS).write_bytes(
        save({PEFT_TENSOR: np.ascontiguousarray(prompt_PxD)}))
  return out_dir
