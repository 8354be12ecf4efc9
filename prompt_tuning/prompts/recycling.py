"""Prompt recycling (Lester et al., 2022, "Reducing Retraining by Recycling Parameter-Efficient
Prompts"): map a prompt trained on one frozen model to another model, through a map learned from
the two models' embeddings of the same vocabulary tokens.

Both models must share a vocabulary (token i is the same string in both). The recyclers learn from
`num_words` vocabulary rows after skipping the first `word_offset` (the original's defaults: 4,000
rows after 1,000; it also filtered the rows to English words with a list of its own, which this
module leaves to the caller through `word_offset`/`num_words` or `rows`):

- `v2v-lin` (vocab-to-vocab, linear): the least-squares `X` with `source_rows @ X ~= target_rows`;
  the recycled prompt is `prompt @ X`. Exact when the target embeddings are a linear map of the
  source ones and the rows span the source space.
- `v2v-nn` (vocab-to-vocab, neural): a two-layer ReLU MLP, hidden width `hidden_scale` (4) times
  the target d_model, trained on the row pairs with Adam (learning rate 3e-4, batch 50, 25 epochs,
  mean squared error), the original's settings; the recycled prompt is the MLP of each row.
- `lin-comb` (linear combination): each prompt row written as the least-squares (minimum-norm)
  combination of the source rows, then the same combination of the target rows.

`equivalent_params` builds the known-answer test case: a model computing the same function as a
given one with its residual stream in another orthonormal basis, so its embeddings are the
source's times a known matrix and a correctly recycled prompt must reproduce the source outputs.
`scripts/recycle_prompt.py` recycles a prompt file; `runs/recycled_prompt_eval.gin` evaluates it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

RECYCLERS = ("v2v-lin", "v2v-nn", "lin-comb")
DEFAULT_NUM_WORDS = 4000
DEFAULT_WORD_OFFSET = 1000


def vocabulary_rows(embedding_VxD, *, num_words: int = DEFAULT_NUM_WORDS,
                    word_offset: int = DEFAULT_WORD_OFFSET, rows=None) -> np.ndarray:
  """The embedding rows the recycler learns from: `rows` if given, else
  `[word_offset, word_offset + num_words)`, as float64 `[N, D]`."""
  table = np.asarray(embedding_VxD, np.float64)
  if table.ndim != 2:
    raise ValueError(f"Expected an embedding table [vocab, d_model], got shape {table.shape}")
  if rows is None:
    if num_words <= 0 or word_offset < 0:
      raise ValueError(f"num_words must be positive and word_offset >= 0, got {num_words} and "
                       f"{word_offset}")
    if word_offset + num_words > table.shape[0]:
      raise ValueError(f"word_offset {word_offset} + num_words {num_words} exceeds the "
                       f"vocabulary of {table.shape[0]} rows: lower them (e.g. --word_offset 3 "
                       "--num_words 256 for a byte vocabulary)")
    rows = np.arange(word_offset, word_offset + num_words)
  return table[np.asarray(rows)]


def _lstsq(a, b) -> np.ndarray:
  return np.linalg.lstsq(np.asarray(a, np.float64), np.asarray(b, np.float64), rcond=None)[0]


@dataclasses.dataclass
class LinearRecycler:
  """v2v-lin: `prompt @ projection`, the projection `[D, E]` fit by least squares."""

  projection: np.ndarray | None = None

  def fit(self, source_NxD, target_NxE) -> "LinearRecycler":
    self.projection = _lstsq(source_NxD, target_NxE)
    return self

  def __call__(self, prompt_PxD) -> np.ndarray:
    return np.asarray(prompt_PxD, np.float64) @ self.projection


@dataclasses.dataclass
class LinearCombinationRecycler:
  """lin-comb: the prompt as a least-squares combination of source rows, applied to target rows."""

  source_NxD: np.ndarray | None = None
  target_NxE: np.ndarray | None = None

  def fit(self, source_NxD, target_NxE) -> "LinearCombinationRecycler":
    self.source_NxD = np.asarray(source_NxD, np.float64)
    self.target_NxE = np.asarray(target_NxE, np.float64)
    return self

  def __call__(self, prompt_PxD) -> np.ndarray:
    # source.T @ weights_NxP = prompt.T; with N > D the minimum-norm solution.
    weights_NxP = _lstsq(self.source_NxD.T, np.asarray(prompt_PxD, np.float64).T)
    return weights_NxP.T @ self.target_NxE


def _mlp(params, x):
  hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


@dataclasses.dataclass
class MLPRecycler:
  """v2v-nn: `W2 relu(W1 x + b1) + b2`, hidden `hidden_scale * E`, trained with Adam on MSE."""

  hidden_scale: int = 4
  learning_rate: float = 3e-4
  batch_size: int = 50
  epochs: int = 25
  seed: int = 0
  params: Any = None

  def fit(self, source_NxD, target_NxE) -> "MLPRecycler":
    x = jnp.asarray(source_NxD, jnp.float32)
    y = jnp.asarray(target_NxE, jnp.float32)
    d, e = x.shape[1], y.shape[1]
    hidden = self.hidden_scale * e
    init_rng, rng = jax.random.split(jax.random.PRNGKey(self.seed))
    k1, k2 = jax.random.split(init_rng)
    lecun = jax.nn.initializers.lecun_normal()
    params = {"w1": lecun(k1, (d, hidden)), "b1": jnp.zeros(hidden),
              "w2": lecun(k2, (hidden, e)), "b2": jnp.zeros(e)}
    tx = optax.adam(self.learning_rate)
    opt_state = tx.init(params)
    loss_fn = lambda p, bx, by: jnp.mean(jnp.square(_mlp(p, bx) - by))

    @jax.jit
    def step(params, opt_state, bx, by):
      grads = jax.grad(loss_fn)(params, bx, by)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    n = x.shape[0]
    for _ in range(self.epochs):
      epoch_rng, rng = jax.random.split(rng)
      order = np.asarray(jax.random.permutation(epoch_rng, n))
      for start in range(0, n, self.batch_size):
        idx = order[start:start + self.batch_size]
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    self.params = params
    return self

  def __call__(self, prompt_PxD) -> np.ndarray:
    return np.asarray(_mlp(self.params, jnp.asarray(prompt_PxD, jnp.float32)), np.float64)


def make_recycler(name: str, **options):
  """A recycler by the paper's name (`RECYCLERS`); `options` go to v2v-nn's settings."""
  if name == "v2v-lin":
    recycler = LinearRecycler()
  elif name == "lin-comb":
    recycler = LinearCombinationRecycler()
  elif name == "v2v-nn":
    return MLPRecycler(**options)
  else:
    raise ValueError(f"Unknown recycler {name!r}; choose one of {RECYCLERS}")
  if options:
    raise ValueError(f"{name} takes no options, got {sorted(options)} (they are v2v-nn's)")
  return recycler


def fit_error(recycler, source_NxD, target_NxE) -> float:
  """Mean squared error of the fitted map on the row pairs, relative to the targets' mean
  square (0: exact; 1: no better than predicting zeros)."""
  target = np.asarray(target_NxE, np.float64)
  residual = recycler(source_NxD) - target
  return float(np.mean(residual ** 2) / max(np.mean(target ** 2), 1e-30))


def recycle(prompt_PxD, source_embedding_VxD, target_embedding_VxE, method: str = "v2v-lin", *,
            num_words: int = DEFAULT_NUM_WORDS, word_offset: int = DEFAULT_WORD_OFFSET,
            rows=None, **options) -> tuple[np.ndarray, dict[str, float]]:
  """The recycled prompt `[P, E]` (float32) and `{"fit_error": ...}` of the learned map."""
  source = vocabulary_rows(source_embedding_VxD, num_words=num_words, word_offset=word_offset,
                           rows=rows)
  target = vocabulary_rows(target_embedding_VxE, num_words=num_words, word_offset=word_offset,
                           rows=rows)
  if len(source) != len(target):
    raise ValueError("The two models' vocabularies differ in size: recycling maps token i of one "
                     "model to token i of the other, so they must share a vocabulary")
  prompt = np.asarray(prompt_PxD, np.float64)
  if prompt.ndim != 2 or prompt.shape[1] != source.shape[1]:
    raise ValueError(f"The prompt has shape {prompt.shape} but the source model's d_model is "
                     f"{source.shape[1]}: pass the model the prompt was trained on")
  recycler = make_recycler(method, **options).fit(source, target)
  recycled = recycler(prompt).astype(np.float32)
  return recycled, {"fit_error": fit_error(recycler, source, target)}


def load_embedding(checkpoint: str, config=None) -> np.ndarray:
  """A frozen checkpoint's token embedding table `[V, D]` (float32). `config`: anything
  `pretrained.load_pretrained` takes (None for checkpoints that carry theirs; T5X ones need a
  `T5Config`, e.g. `gin_utils.config_from_gin(model_gin_file)`)."""
  from prompt_tuning.formats import pretrained
  if hasattr(config, "scan_layers"):  # a T5Config: checkpoints hold per-layer weights
    config = config.replace(scan_layers=False)
  _, params = pretrained.load_pretrained(checkpoint, config=config)
  return np.asarray(params["token_embedder"]["embedding"], np.float32)


def recycle_file(*, source_checkpoint: str, target_checkpoint: str, prompt: str, output: str,
                 recycler: str = "v2v-lin", num_words: int = DEFAULT_NUM_WORDS,
                 word_offset: int = DEFAULT_WORD_OFFSET, source_config=None, target_config=None,
                 **options) -> dict[str, Any]:
  """Recycles the prompt file `prompt` (trained on `source_checkpoint`) for `target_checkpoint`
  and writes it to `output` (float32 `.npy`); returns what it did, `output` included.

  Only the checkpoints' embedding tables are kept (`load_embedding`).
  """
  from prompt_tuning.formats import prompt_io
  from prompt_tuning.formats import storage
  storage.path(output, "the recycled prompt's path")  # a URL scheme we cannot write: now
  source_prompt = prompt_io.load_prompt(prompt)
  source = load_embedding(source_checkpoint, source_config)
  target = load_embedding(target_checkpoint, target_config)
  recycled, info = recycle(source_prompt, source, target, recycler, num_words=num_words,
                           word_offset=word_offset, **options)
  path = prompt_io.save_prompt_npy(output, recycled)
  return {"recycler": recycler, "prompt": str(prompt), "output": str(path),
          "shape": list(recycled.shape), "fit_error": info["fit_error"],
          "rows": [word_offset, word_offset + num_words]}


def recycled_prompt(**kwargs) -> str:
  """`recycle_file`, returning the recycled prompt's path (gin: runs/recycled_prompt_eval.gin)."""
  import logging
  result = recycle_file(**kwargs)
  logging.info("Recycled %s with %s (relative fit error %.3e on vocabulary rows %s) to %s",
               result["prompt"], result["recycler"], result["fit_error"], result["rows"],
               result["output"])
  return result["output"]


# ----- the known-answer model: same function, residual stream in another basis -----

# How each parameter touches the residual stream: "in" kernels read it ([D, X] -> M.T @ W),
# "out" kernels and the embedding write it ([X, D] -> W @ M), norm scales act on it.
_ROLES = (
    (r"token_embedder/embedding", "out"),
    (r".*/(attention|self_attention|encoder_decoder_attention)/(query|key|value)/kernel", "in"),
    (r".*/(attention|self_attention|encoder_decoder_attention)/out/kernel", "out"),
    (r".*/mlp/(wi|wi_\d+)/kernel", "in"),
    (r".*/mlp/wo/kernel", "out"),
    (r"decoder/logits_dense/kernel", "in"),
    (r".*(_layer_norm|encoder_norm|decoder_norm)/scale", "scale"),
    (r".*/relpos_bias/rel_embedding", "keep"),
    (r"encoder/prompt/prompt", "out"),
)


def _signed_permutation(m: np.ndarray) -> np.ndarray | None:
  """For a signed permutation matrix, `perm` with `m[i, perm[i]] = +-1`; else None."""
  nonzero = m != 0
  if not (np.all(nonzero.sum(0) == 1) and np.all(nonzero.sum(1) == 1)
          and np.all(np.abs(m[nonzero]) == 1)):
    return None
  return np.argmax(nonzero, axis=1)


def equivalent_params(params: Mapping, basis_DxD) -> dict:
  """The parameters of a T5 that computes what `params` computes, with its residual stream `x`
  carried as `x @ basis`: its embedding table is `embedding @ basis`.

  `basis` must be orthogonal, which keeps T5's RMSNorm statistics unchanged (`|x M| = |x|`). A
  norm's per-feature scale commutes with the basis only when the basis is a signed permutation
  (the scale is then permuted with the features) or the scale is the same for every feature;
  other combinations are refused. Readers of the stream get `basis.T @ kernel`, writers
  `kernel @ basis`; the relative position biases are unchanged. A prompt in `params` is mapped
  like the embeddings. Works on T5X per-layer parameter paths (and stacked ones).
  """
  m = np.asarray(basis_DxD, np.float64)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"The basis must be a square [d_model, d_model] matrix, got {m.shape}")
  if not np.allclose(m @ m.T, np.eye(len(m)), atol=1e-6):
    raise ValueError("The basis must be orthogonal (M @ M.T = I): RMSNorm is invariant only "
                     "to orthogonal maps of the residual stream")
  perm = _signed_permutation(m)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = {}
  for path, value in flat.items():
    role = next((r for pattern, r in _ROLES if re.fullmatch(pattern, path)), None)
    if role is None:
      raise ValueError(f"equivalent_params does not know how parameter {path} touches the "
                       "residual stream")
    v = np.asarray(value, np.float64)
    if role == "in":
      new = np.einsum("de,...dx->...ex", m, v)
    elif role == "out":
      new = v @ m
    elif role == "scale":
      if perm is not None:
        new = np.empty_like(v)
        new[..., perm] = v  # feature i moves to perm[i]; a sign does not change a scale
      elif np.all(v == v[..., :1]):
        new = v
      else:
        raise ValueError(f"{path} has per-feature scales, which only a signed permutation basis "
                         "commutes with: use one (kind 'signed_permutation'), or a model whose "
                         "norm scales are constant")
    else:
      new = v
    out[path] = new.astype(np.asarray(value).dtype)
  return flax.traverse_util.unflatten_dict(out, sep="/")


def random_basis(d_model: int, kind: str = "signed_permutation", seed: int = 0) -> np.ndarray:
  """A random orthogonal `[D, D]`: a signed permutation, or (kind 'orthogonal') Haar-random."""
  rs = np.random.RandomState(seed)
  if kind == "signed_permutation":
    m = np.zeros((d_model, d_model))
    m[np.arange(d_model), rs.permutation(d_model)] = rs.choice([-1.0, 1.0], d_model)
    return m
  if kind == "orthogonal":
    q, r = np.linalg.qr(rs.normal(size=(d_model, d_model)))
    return q * np.sign(np.diag(r))
  raise ValueError(f"Unknown basis kind {kind!r}: 'signed_permutation' or 'orthogonal'")
