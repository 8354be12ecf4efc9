"""Prompt initialisers: pure functions returning a float32 `prompt_PxD` (numpy).

They run on the host after the frozen checkpoint is loaded, because the vocabulary-based ones
need its embedding table; `set_prompt` then places the result at `encoder/prompt/prompt`.

- `random_uniform`: U[low, high). The paper says U[-0.5, 0.5] (our default); the original code
  drew U[0, 0.5) (`low=0.0`).
- `sampled_vocab`: rows of the embedding table drawn without replacement from the first
  `population` (5,000) rows, which SentencePiece orders by frequency; with replacement (and a
  log line) when the prompt is longer than the population, as the original did.
- `class_labels` (the paper's default): row i is the mean embedding of label i's sub-tokens;
  the remaining rows are sampled vocabulary. With more labels than rows the first labels fill
  the prompt (the paper's length-1 ablation on two-label tasks) and a log line names them.
- `from_string`: the embeddings of a string's tokens, the remaining rows sampled vocabulary.
- `from_file`: a saved prompt (`prompt_io.load_prompt`: .npy, numpy export, PEFT adapter).

`vocab` is anything with `encode(str) -> list[int]` that adds no EOS, e.g.
`seqio.SentencePieceVocabulary`.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from prompt_tuning.formats import prompt_io
from prompt_tuning.model import prompt as prompts_lib

KINDS = ("random_uniform", "sampled_vocab", "class_labels", "from_string", "from_file")
DEFAULT_POPULATION = 5000
PROMPT_PATH = prompts_lib.PROMPT_PATH


def random_uniform(rng, length: int, d_model: int, low: float = -0.5,
                   high: float = 0.5) -> np.ndarray:
  """U[low, high) of shape [length, d_model]; the paper's U[-0.5, 0.5] by default."""
  _check_positive(length=length, d_model=d_model)
  if not low < high:
    raise ValueError(f"random_uniform needs low < high, got low={low}, high={high}")
  return np.asarray(prompts_lib.random_uniform(low, high)(rng, (length, d_model)), np.float32)


def sampled_vocab(rng, embedding_VxD, length: int,
                  population: int = DEFAULT_POPULATION) -> np.ndarray:
  """`length` rows drawn uniformly from the first `population` embedding rows.

  Rows are distinct unless the prompt is longer than the population; then they are drawn with
  replacement (as the original did), which is logged. A `population` larger than the
  vocabulary (ByT5 has 384 rows) means the whole table.
  """
  _check_positive(length=length, population=population)
  vocab_size = _check_table(embedding_VxD)[0]
  population = min(population, vocab_size)
  replace = length > population
  if replace:
    logging.warning("sampled_vocab: the prompt length %d exceeds the population of %d rows "
                    "(vocabulary %d); sampling with replacement, so rows may repeat",
                    length, population, vocab_size)
  ids = np.asarray(jax.random.choice(rng, population, (length,), replace=replace))
  return _rows(embedding_VxD, ids)


def class_labels(rng, embedding_VxD, vocab, labels: Sequence[str], length: int,
                 population: int = DEFAULT_POPULATION) -> np.ndarray:
  """Row i is the mean embedding of `labels[i]`'s sub-tokens; the rest sampled vocabulary.

  The sampled rows are drawn independently of the label rows (they may repeat a label token).
  More labels than rows: the first `length` labels are used and the choice is logged (the
  paper's prompt-length-1 runs on two-label tasks hold only the first label).
  """
  _check_positive(length=length)
  if isinstance(labels, str):
    raise TypeError(f"labels must be a list of strings, got the string {labels!r}")
  labels = list(labels)
  if not labels:
    raise ValueError("class_labels needs at least one label")
  vocab_size = _check_table(embedding_VxD)[0]
  # Every label is still tokenised, so a bad label fails whether or not its row is used.
  label_ids = [_encode(vocab, label, vocab_size, what="class label") for label in labels]
  if len(labels) > length:
    logging.warning("class_labels: %d labels for a prompt of length %d; initialising from %s "
                    "and leaving out %s", len(labels), length, labels[:length], labels[length:])
    labels, label_ids = labels[:length], label_ids[:length]
  label_rows = []
  for ids in label_ids:
    label_rows.append(_rows(embedding_VxD, ids).mean(axis=0))
  prompt_PxD = np.stack(label_rows).astype(np.float32)
  if length > len(labels):
    rest = sampled_vocab(rng, embedding_VxD, length - len(labels), population)
    prompt_PxD = np.concatenate([prompt_PxD, rest])
  return prompt_PxD


def from_string(embedding_VxD, vocab, text: str, length: int, *, rng=None,
                population: int = DEFAULT_POPULATION, truncate: bool = False) -> np.ndarray:
  """The embeddings of `text`'s tokens, one row per token, then sampled vocabulary.

  A text longer than the prompt is an error unless `truncate=True` (the original code kept the
  first `length` tokens with a warning, which hid a misconfigured PROMPT_LENGTH). `rng` is
  needed only when the text is shorter than the prompt.
  """
  _check_positive(length=length)
  vocab_size = _check_table(embedding_VxD)[0]
  ids = _encode(vocab, text, vocab_size, what="prompt text")
  if len(ids) > length:
    if not truncate:
      raise ValueError(f"The prompt text tokenises to {len(ids)} tokens but the prompt has "
                       f"length {length}; raise PROMPT_LENGTH, shorten the text, or pass "
                       "truncate=True to keep its first tokens")
    ids = ids[:length]
  prompt_PxD = _rows(embedding_VxD, ids)
  if len(ids) < length:
    if rng is None:
      raise ValueError(f"The prompt text fills {len(ids)} of {length} rows; pass `rng` to "
                       "sample the remaining rows from the vocabulary")
    rest = sampled_vocab(rng, embedding_VxD, length - len(ids), population)
    prompt_PxD = np.concatenate([prompt_PxD, rest])
  return prompt_PxD


def from_file(path, length: int, d_model: int) -> np.ndarray:
  """A saved prompt, checked to be [length, d_model]."""
  return prompt_io.load_prompt(path, expected_shape=(length, d_model))


def initialize(kind: str, rng=None, *, length: int, d_model: int, embedding=None, vocab=None,
               labels: Sequence[str] | None = None, text: str | None = None, path=None,
               low: float = -0.5, high: float = 0.5,
               population: int = DEFAULT_POPULATION) -> np.ndarray:
  """Dispatches to the initialiser named `kind` (one of `KINDS`); returns float32 [P, D]."""
  needs = {
      "random_uniform": ("rng",),
      "sampled_vocab": ("rng", "embedding"),
      "class_labels": ("rng", "embedding", "vocab", "labels"),
      "from_string": ("embedding", "vocab", "text"),
      "from_file": ("path",),
  }
  if kind not in needs:
    raise ValueError(f"Unknown prompt initialiser {kind!r}; choose one of {KINDS}")
  given = dict(rng=rng, embedding=embedding, vocab=vocab, labels=labels, text=text, path=path)
  missing = [name for name in needs[kind] if given[name] is None]
  if missing:
    raise ValueError(f"Prompt initialiser {kind!r} needs " + ", ".join(
        f"{name} ({_WHAT[name]})" for name in missing))
  if embedding is not None and kind in ("sampled_vocab", "class_labels", "from_string"):
    if _check_table(embedding)[1] != d_model:
      raise ValueError(f"The embedding table has shape {tuple(embedding.shape)} but d_model is "
                       f"{d_model}; pass the frozen model's token_embedder/embedding")
  if kind == "random_uniform":
    prompt_PxD = random_uniform(rng, length, d_model, low, high)
  elif kind == "sampled_vocab":
    prompt_PxD = sampled_vocab(rng, embedding, length, population)
  elif kind == "class_labels":
    prompt_PxD = class_labels(rng, embedding, vocab, labels, length, population)
  elif kind == "from_string":
    prompt_PxD = from_string(embedding, vocab, text, length, rng=rng, population=population)
  else:
    prompt_PxD = from_file(path, length, d_model)
  assert prompt_PxD.shape == (length, d_model), prompt_PxD.shape
  return prompt_PxD


_WHAT = {
    "rng": "a jax PRNG key",
    "embedding": "the frozen model's token_embedder/embedding table [vocab, d_model]",
    "vocab": "a seqio Vocabulary to tokenise with",
    "labels": "the class label strings, e.g. CLASS_LABELS = ['positive', 'negative']",
    "text": "the string to embed",
    "path": "a prompt file or PEFT adapter folder",
}


# ----- placing the prompt in a parameter tree -----

def get_prompt(params: Mapping, index: int | None = None):
  """The prompt at `encoder/prompt/prompt` ([P, D], or bank [N, P, D] / its row `index`).

  `params` may also be the variables dict `{"params": ...}` that `model.init` returns.
  """
  node = params
  for key in _prompt_keys(params):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"No prompt at {'/'.join(_prompt_keys(params))} in these parameters; was "
                     "the model built with a PromptConfig?")
    node = node[key]
  value = _unbox(node)
  if index is None:
    return value
  if value.ndim != 3:
    raise ValueError(f"index={index} given but the prompt has shape {value.shape}, not a bank")
  return value[index]


def set_prompt(params: Mapping, prompt, index: int | None = None) -> Mapping:
  """A copy of `params` with the prompt replaced (or, with `index`, one prompt of the bank).

  The input is not modified; only the dicts along the prompt's path are copied. A missing
  prompt is created, so frozen parameters from a checkpoint plus an initialised prompt make
  the full tree. Logical-partitioning boxes are kept.
  """
  if not hasattr(prompt, "dtype"):
    prompt = np.asarray(prompt)
  if not (np.issubdtype(prompt.dtype, np.floating) or prompt.dtype.name == "bfloat16"):
    raise ValueError(f"The prompt must be a float array, got dtype {prompt.dtype}")
  prompt = jnp.asarray(prompt, jnp.float32)
  keys = _prompt_keys(params)
  old = params
  for key in keys:
    old = old.get(key) if isinstance(old, Mapping) else None
  if old is None:
    if index is not None:
      raise ValueError(f"index={index} given but there is no prompt bank at {'/'.join(keys)}")
    if prompt.ndim not in (2, 3):
      raise ValueError(f"The prompt must be [P, D] or a bank [N, P, D], got {prompt.shape}")
    new_leaf = prompt
  else:
    current = _unbox(old)
    if index is None:
      if prompt.shape != current.shape:
        raise ValueError(f"The new prompt has shape {prompt.shape} but the model's is "
                         f"{current.shape}; match PROMPT_LENGTH and the model size" + (
                             ", or pass index= to set one prompt of the bank"
                             if current.ndim == 3 and prompt.ndim == 2 else ""))
      new_value = prompt
    else:
      if current.ndim != 3:
        raise ValueError(f"index={index} given but the prompt has shape {current.shape}, not "
                         "a bank [N, P, D]")
      if not -current.shape[0] <= index < current.shape[0]:
        raise IndexError(f"index={index} outside the bank of {current.shape[0]} prompts")
      if prompt.shape != current.shape[1:]:
        raise ValueError(f"The new prompt has shape {prompt.shape} but the bank holds prompts "
                         f"of shape {current.shape[1:]}")
      new_value = jnp.asarray(current, jnp.float32).at[index].set(prompt)
    new_leaf = old.replace_boxed(new_value) if hasattr(old, "replace_boxed") else new_value
  return _replace_path(params, keys, new_leaf, frozen=isinstance(params, FrozenDict))


def add_missing_prompt_params(params: Mapping, prompt_config: prompts_lib.PromptConfig, *,
                              d_model: int, num_layers: int, rng) -> Mapping:
  """`params` with the prompt module's other variables added where absent, freshly initialised.

  A frozen checkpoint plus `set_prompt` holds only `encoder/prompt/prompt`; per-layer prompts
  (`layer_prompts`) and multi-task prompts' task parameters get the initialisers their module
  declares. Variables already present (e.g. from a full `model.init`) are kept.
  """
  import flax.linen as nn
  module = prompts_lib.Prompt(prompt_config, d_model, num_layers=num_layers)
  fresh = nn.meta.unbox(module.init(rng, jnp.zeros((1, 1, d_model), jnp.float32),
                                    jnp.ones((1, 1), bool))["params"])
  present = params.get("encoder", {}).get("prompt", {})
  for name, value in fresh.items():
    if name != PROMPT_PATH[-1] and name not in present:
      params = _replace_path(params, PROMPT_PATH[:-1] + (name,), jnp.asarray(value, jnp.float32),
                             frozen=isinstance(params, FrozenDict))
  return params


def _prompt_keys(params: Mapping) -> tuple[str, ...]:
  if "encoder" not in params and "params" in params:
    return ("params",) + PROMPT_PATH
  return PROMPT_PATH


def _replace_path(tree: Mapping, keys: tuple[str, ...], leaf: Any, frozen: bool) -> Mapping:
  copy = dict(tree) if tree is not None else {}
  if len(keys) == 1:
    copy[keys[0]] = leaf
  else:
    child = tree.get(keys[0]) if tree is not None else None
    copy[keys[0]] = _replace_path(child, keys[1:], leaf, frozen=False)
  return FrozenDict(copy) if frozen else copy


def _unbox(value):
  return value.unbox() if hasattr(value, "unbox") else value


# ----- helpers -----

def _check_positive(**values) -> None:
  for name, value in values.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_table(embedding_VxD) -> tuple[int, int]:
  shape = tuple(getattr(embedding_VxD, "shape", ()))
  if len(shape) != 2:
    raise ValueError(f"Expected an embedding table [vocab, d_model], got shape {shape}")
  return shape


def _encode(vocab, text: str, vocab_size: int, what: str) -> list[int]:
  if not isinstance(text, str):
    raise TypeError(f"The {what} must be a string, got {text!r}")
  ids = [int(i) for i in vocab.encode(text)]
  if not ids:
    raise ValueError(f"The {what} {text!r} tokenises to no tokens")
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"The {what} {text!r} has token ids {bad} outside the embedding table "
                     f"of {vocab_size} rows; is the vocabulary the model's?")
  return ids


def _rows(embedding_VxD, ids) -> np.ndarray:
  """float32 rows of the table; gathering first keeps a bf16 device table off the host."""
  return np.asarray(embedding_VxD[np.asarray(ids, np.int32)]).astype(np.float32)
