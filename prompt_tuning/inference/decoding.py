"""Decoding from a (prompted) T5: greedy, sampling, beam search, and rank classification.

Every decoder runs the encoder once (with the example's prompt, or its `prompt_index` into a
prompt bank), projects the encoder output to every layer's cross-attention keys and values once,
and then steps the decoder's key/value cache inside one `lax.while_loop` that stops
as soon as every row has produced EOS (beam search: as soon as no alive beam can beat the
finished ones) or `max_decode_length` tokens were written. All functions are jitted with the
model and the decoding settings as static arguments, so one compilation serves every batch of
the same shape.

T5 conventions: the decoder starts from token 0, EOS is 1, padding is 0; returned sequences hold
the generated tokens (EOS included) followed by zeros. Scores are summed log-probabilities of
the returned tokens under the model (temperature 1), EOS included.

`rank_classification` scores fixed candidate targets by teacher forcing instead of generating:
the evaluation used in the paper for classification tasks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from prompt_tuning.inference import scoring
from prompt_tuning.inference.scoring import (pad_candidates, rank_classification, score_targets,
                                             shift_right)

Array = jax.Array
Params = Any

# Large but finite: -inf would turn `a - b` comparisons into NaN (T5X uses the same value).
NEG_INF = -1.0e7
METHODS = ("greedy", "sample", "beam", "rank_classification")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How `decode` turns encoder inputs into output tokens. Hashable: a static jit argument."""

  method: str = "greedy"  # one of METHODS
  max_decode_length: int = 64  # tokens generated at most, EOS included
  num_beams: int = 4  # beam search only
  alpha: float = 0.6  # beam search length penalty ((5 + length) / 6) ** alpha, as in T5X
  temperature: float = 1.0  # sampling only; 0 means argmax
  top_k: int = 0  # sampling only; 0 keeps the whole vocabulary
  top_p: float = 1.0  # sampling only (nucleus); 1 keeps the whole vocabulary
  # rank_classification only: each candidate's token ids, ending in EOS. `batch` may instead
  # carry them as "candidate_targets" [C, T] or [B, C, T].
  candidate_targets: tuple[tuple[int, ...], ...] | None = None
  eos_id: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"DecodingConfig.method={self.method!r}; choose one of {METHODS}")
    if self.max_decode_length <= 0:
      raise ValueError(f"DecodingConfig.max_decode_length must be positive, got "
                       f"{self.max_decode_length}")
    if self.num_beams <= 0:
      raise ValueError(f"DecodingConfig.num_beams must be positive, got {self.num_beams}")
    if self.temperature < 0:
      raise ValueError(f"DecodingConfig.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"DecodingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"DecodingConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.candidate_targets is not None:
      # Gin and YAML give lists; tuples keep the config hashable.
      object.__setattr__(self, "candidate_targets",
                         tuple(tuple(int(t) for t in c) for c in self.candidate_targets))


_jit = scoring.jit_with_defaults
_encode = scoring.encode


def _cache_shapes(model, params, encoded, encoder_input_tokens, max_len):
  """Shapes of the decoder cache for this batch, found by tracing (no FLOPs, no init RNG)."""
  batch = encoded.shape[0]
  dec = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
  init = functools.partial(model.apply, method="decode", decode=True, mutable=["cache"])
  _, variables = jax.eval_shape(init, {"params": params}, encoded, encoder_input_tokens, dec)
  return variables["cache"]


def _init_cache(model, params, encoded, encoder_input_tokens, max_len):
  # All-zero is the empty cache: index 0, nothing `written`, zero keys and values.
  shapes = _cache_shapes(model, params, encoded, encoder_input_tokens, max_len)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _cache_has_batch_axis(model, params, encoded, encoder_input_tokens, max_len):
  """A pytree of bools: which cache leaves have a leading batch axis.

  Decided by comparing the cache's shapes at batch sizes 1 and 2, never by the leaf's rank or
  size: the decoder's `written` vector is `[T]`, which a rule like "leading dim == batch" would
  mistake for a batch axis whenever `T == batch * num_beams`.
  """
  def shapes(n):
    enc = jax.ShapeDtypeStruct((n,) + encoded.shape[1:], encoded.dtype)
    toks = jax.ShapeDtypeStruct((n,) + encoder_input_tokens.shape[1:],
                                encoder_input_tokens.dtype)
    return _cache_shapes(model, params, enc, toks, max_len)
  return jax.tree.map(lambda a, b: a.shape != b.shape, shapes(1), shapes(2))


def _cross_kv(model, params, encoded):
  """The decoder's encoder-decoder keys and values: computed once, read by every step.

  They are not part of the cache, so beam search never reorders them (every beam of an example
  holds the same copy).
  """
  return model.apply({"params": params}, encoded, method="cross_attention_kv")


def _step(model, params, cache, encoded, encoder_input_tokens, tokens_B, cross_kv=None):
  """One cached decoder step: log-probabilities `[B, V]` of the next token, and the new cache."""
  logits_Bx1xV, mutated = model.apply(
      {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens_B[:, None],
      decode=True, method="decode", mutable=["cache"], cross_kv=cross_kv)
  return jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32)), mutated["cache"]


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling: one token per row per step.


def _token_loop(model, params, encoder_input_tokens, prompt_index, rng, *, max_decode_length,
                eos_id, choose: Callable[[Array, Array], Array]):
  """Generates with `choose(log_probs_BxV, rng) -> tokens_B` until every row has emitted EOS."""
  batch = encoder_input_tokens.shape[0]
  encoded = _encode(model, params, encoder_input_tokens, prompt_index)
  cache = _init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)
  cross_kv = _cross_kv(model, params, encoded)

  def cond(state):
    i, _, _, done_B, _, _ = state
    return (i < max_decode_length) & ~jnp.all(done_B)

  def body(state):
    i, tokens_BxT, last_B, done_B, scores_B, cache = state
    log_probs_BxV, cache = _step(model, params, cache, encoded, encoder_input_tokens, last_B,
                                 cross_kv)
    next_B = choose(log_probs_BxV, jax.random.fold_in(rng, i))
    next_B = jnp.where(done_B, 0, next_B)  # finished rows emit padding
    picked_B = jnp.take_along_axis(log_probs_BxV, next_B[:, None], axis=1)[:, 0]
    scores_B = scores_B + jnp.where(done_B, 0.0, picked_B)
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, next_B[:, None], i, axis=1)
    return i + 1, tokens_BxT, next_B, done_B | (next_B == eos_id), scores_B, cache

  state = (jnp.array(0, jnp.int32), jnp.zeros((batch, max_decode_length), jnp.int32),
           jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32), cache)
  _, tokens_BxT, _, _, scores_B, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BxT, scores_B


@_jit("model", "max_decode_length", "eos_id")
def greedy(model, params: Params, encoder_input_tokens: Array, *, max_decode_length: int,
           prompt_index: Array | None = None, eos_id: int = 1) -> tuple[Array, Array]:
  """Greedy decoding: `(tokens_BxT, scores_B)` with T = max_decode_length."""
  return _token_loop(model, params, encoder_input_tokens, prompt_index, jax.random.PRNGKey(0),
                     max_decode_length=max_decode_length, eos_id=eos_id, choose=_argmax)


def _argmax(log_probs_BxV, rng):
  del rng  # deterministic
  return argmax_last_axis(log_probs_BxV)


def argmax_last_axis(x_BxV: Array) -> Array:
  """`jnp.argmax(x, -1)` (the first index of the maximum) as two plain reductions.

  XLA:CPU runs argmax as one index-tracking reduction that does not vectorise: over a T5
  vocabulary it took 1.2 ms for 8 rows against 0.16 ms for a max followed by a min over the
  indices that reach it, about a tenth of a decoding step. A row of NaNs gives index 0.
  """
  vocab = x_BxV.shape[-1]
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
  first = jnp.min(jnp.where(x_BxV == max_Bx1, ids, vocab), axis=-1)
  return jnp.where(first == vocab, 0, first).astype(jnp.int32)


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top-k and outside the nucleus of mass top_p to NEG_INF."""
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, NEG_INF, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass strictly before it is below top_p: the top token always stays.
    keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, NEG_INF, logits_BxV)
  return logits_BxV


@_jit("model", "max_decode_length", "temperature", "top_k", "top_p", "eos_id")
def sample(model, params: Params, encoder_input_tokens: Array, rng: Array, *,
           max_decode_length: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, prompt_index: Array | None = None,
           eos_id: int = 1) -> tuple[Array, Array]:
  """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

  `temperature=0` is argmax. Scores are log-probabilities under the unmodified model, so they
  are comparable with greedy and beam scores.
  """
  def choose(log_probs_BxV, step_rng):
    if temperature == 0.0:
      return _argmax(log_probs_BxV, step_rng)
    logits_BxV = filter_logits(log_probs_BxV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(step_rng, logits_BxV, axis=-1).astype(jnp.int32)
  return _token_loop(model, params, encoder_input_tokens, prompt_index, rng,
                     max_decode_length=max_decode_length, eos_id=eos_id, choose=choose)


# ----------------------------------------------------------------------------------------------
# Beam search (T5X / tensor2tensor style: `num_beams` alive and `num_beams` finished hypotheses).


def length_penalty(length: Array, alpha: float) -> Array:
  """T5X's brevity penalty ((5 + length) / 6) ** alpha; a finished beam's score is lp / this."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(x, beam_BxK):
  """x: `[B, K', ...]`, beam_BxK indices into K' -> `[B, K, ...]`."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, beam_BxK)


def _reorder_cache(cache, has_batch_axis, beam_BxK):
  """Gathers every per-row cache leaf (`[B*K, ...]`) by beam; index/position leaves stay."""
  batch, k = beam_BxK.shape
  rows = (jnp.arange(batch)[:, None] * k + beam_BxK).reshape(-1)
  return jax.tree.map(lambda x, b: jnp.take(x, rows, axis=0) if b else x, cache, has_batch_axis)


def beam_search(model, params: Params, encoder_input_tokens: Array, *, max_decode_length: int,
                num_beams: int, alpha: float = 0.6, prompt_index: Array | None = None,
                eos_id: int = 1, return_all_beams: bool = False):
  """Beam search with T5X's length penalty.

  Returns the best hypothesis `(tokens_BxT, scores_B)`, or with `return_all_beams` every
  finished hypothesis `(tokens_BxKxT, scores_BxK)` sorted best first. Scores are length-
  normalised: log-probability / `length_penalty(length, alpha)`, length counting EOS.
  Hypotheses still alive at `max_decode_length` count as finished there.
  """
  tokens_BxKxT, scores_BxK = _beam_search(
      model, params, encoder_input_tokens, max_decode_length=max_decode_length,
      num_beams=num_beams, alpha=alpha, prompt_index=prompt_index, eos_id=eos_id)
  if return_all_beams:
    return tokens_BxKxT, scores_BxK
  return tokens_BxKxT[:, 0], scores_BxK[:, 0]


@_jit("model", "max_decode_length", "num_beams", "eos_id")
def _beam_search(model, params, encoder_input_tokens, *, max_decode_length, num_beams, alpha,
                 prompt_index, eos_id):
  batch, k, t_max = encoder_input_tokens.shape[0], num_beams, max_decode_length
  encoded = _encode(model, params, encoder_input_tokens, prompt_index)
  # The encoder ran once; each beam gets its own copy of its example's encoder outputs.
  encoded_beams = jnp.repeat(encoded, k, axis=0)
  inputs_beams = jnp.repeat(encoder_input_tokens, k, axis=0)
  cache = _init_cache(model, params, encoded_beams, inputs_beams, t_max)
  has_batch_axis = _cache_has_batch_axis(model, params, encoded_beams, inputs_beams, t_max)
  cross_kv = _cross_kv(model, params, encoded_beams)
  best_possible_penalty = length_penalty(t_max, alpha)

  def cond(state):
    i, _, alive_lp_BxK, _, finished_BxK, finished_flags_BxK, _ = state
    # Log-probabilities only fall as a beam grows, and the penalty is largest at t_max: no
    # alive beam can score above this bound, so a row is done once its worst finished beats it.
    best_alive_B = alive_lp_BxK[:, 0] / best_possible_penalty
    worst_finished_B = jnp.min(jnp.where(finished_flags_BxK, finished_BxK, NEG_INF), axis=1)
    done_B = jnp.all(finished_flags_BxK, axis=1) & (worst_finished_B >= best_alive_B)
    return (i < t_max) & ~jnp.all(done_B)

  def body(state):
    i, alive_BxKxT, alive_lp_BxK, fin_BxKxT, fin_BxK, fin_flags_BxK, cache = state
    last = jax.lax.dynamic_index_in_dim(alive_BxKxT, jnp.maximum(i - 1, 0), axis=2,
                                        keepdims=False)
    last_BK = jnp.where(i == 0, 0, last).reshape(-1)
    log_probs, cache = _step(model, params, cache, encoded_beams, inputs_beams, last_BK,
                             cross_kv)
    vocab = log_probs.shape[-1]
    cand_BxKV = (alive_lp_BxK[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(
        batch, k * vocab)
    # 2K candidates: at most K of them end in EOS, so K can always stay alive.
    top_lp_Bx2K, top_idx_Bx2K = jax.lax.top_k(cand_BxKV, 2 * k)
    top_beam_Bx2K = top_idx_Bx2K // vocab
    top_tok_Bx2K = (top_idx_Bx2K % vocab).astype(jnp.int32)
    top_seqs = _gather_beams(alive_BxKxT, top_beam_Bx2K)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_tok_Bx2K[:, :, None], i, axis=2)
    ends_Bx2K = (top_tok_Bx2K == eos_id) | (i == t_max - 1)
    real_Bx2K = top_lp_Bx2K > NEG_INF / 2  # not an extension of an initial dummy beam

    # Alive: the best K candidates that did not end.
    alive_lp_BxK, pick_BxK = jax.lax.top_k(jnp.where(ends_Bx2K, NEG_INF, top_lp_Bx2K), k)
    alive_BxKxT = _gather_beams(top_seqs, pick_BxK)
    cache = _reorder_cache(cache, has_batch_axis, _gather_beams(top_beam_Bx2K, pick_BxK))

    # Finished: the best K of the old finished and the candidates that ended this step. Like
    # HF and fairseq, an ending only counts within the top K candidates: with one beam this is
    # exactly greedy decoding.
    in_top_k = jnp.arange(2 * k)[None, :] < k
    new_fin = ends_Bx2K & real_Bx2K & in_top_k
    new_scores = jnp.where(new_fin, top_lp_Bx2K / length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_BxK, new_scores], axis=1)
    fin_BxK, fin_pick_BxK = jax.lax.top_k(all_scores, k)
    fin_BxKxT = _gather_beams(jnp.concatenate([fin_BxKxT, top_seqs], axis=1), fin_pick_BxK)
    fin_flags_BxK = _gather_beams(jnp.concatenate([fin_flags_BxK, new_fin], axis=1),
                                  fin_pick_BxK)
    return i + 1, alive_BxKxT, alive_lp_BxK, fin_BxKxT, fin_BxK, fin_flags_BxK, cache

  # Start with one live beam per example so the first step does not pick K copies of the same.
  alive_lp_BxK = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  state = (jnp.array(0, jnp.int32), jnp.zeros((batch, k, t_max), jnp.int32), alive_lp_BxK,
           jnp.zeros((batch, k, t_max), jnp.int32), jnp.full((batch, k), NEG_INF, jnp.float32),
           jnp.zeros((batch, k), bool), cache)
  _, _, _, fin_BxKxT, fin_BxK, _, _ = jax.lax.while_loop(cond, body, state)
  return fin_BxKxT, fin_BxK


# ----------------------------------------------------------------------------------------------
# Scoring fixed targets and rank classification.


def decode(model, params: Params, batch: dict, cfg: DecodingConfig,
           rng: Array | None = None) -> tuple[Array, Array]:
  """Decodes `batch["encoder_input_tokens"]` (and optional `batch["prompt_index"]`) per `cfg`.

  Returns `(tokens_BxT, scores_B)` for every method; for rank classification the tokens are the
  winning candidate (zero-padded to the longest candidate) and the score its log-likelihood.
  """
  tokens = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
  prompt_index = batch.get("prompt_index")
  kw = dict(max_decode_length=cfg.max_decode_length, prompt_index=prompt_index,
            eos_id=cfg.eos_id)
  if cfg.method == "greedy":
    return greedy(model, params, tokens, **kw)
  if cfg.method == "sample":
    if rng is None:
      raise ValueError("DecodingConfig.method='sample' needs an rng: decode(..., rng=key)")
    return sample(model, params, tokens, rng, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, **kw)
  if cfg.method == "beam":
    return beam_search(model, params, tokens, num_beams=cfg.num_beams, alpha=cfg.alpha, **kw)
  candidates = batch.get("candidate_targets", cfg.candidate_targets)
  if candidates is None:
    raise ValueError("rank_classification needs candidate targets: set "
                     "DecodingConfig.candidate_targets or batch['candidate_targets']")
  if isinstance(candidates, (list, tuple)):
    candidates = pad_candidates(candidates)
  candidates = jnp.asarray(candidates, jnp.int32)
  best_B, scores_BxC = rank_classification(model, params, tokens, candidates,
                                           prompt_index=prompt_index)
  if candidates.ndim == 2:
    candidates = jnp.broadcast_to(candidates[None], (tokens.shape[0],) + candidates.shape)
  best_tokens_BxT = _gather_beams(candidates, best_B[:, None])[:, 0]
  return best_tokens_BxT, jnp.take_along_axis(scores_BxC, best_B[:, None], axis=1)[:, 0]
