"""Teacher-forced scoring of a (prompted) T5: each target's log-likelihood, and rank
classification (the paper's evaluation of classification tasks: score fixed candidate targets,
pick the best). Also the jit wrapper every decoder uses (`jit_with_defaults`)."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any


def jit_with_defaults(*static_argnames: str):
  """`jax.jit` that fills in defaults first, so `f(x)` and `f(x, eos_id=1)` share a compilation.

  (jit keys its cache on how arguments were passed, not only on their values.)
  """
  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      return jitted(*bound.args, **bound.kwargs)
    return call
  return wrap


# ----------------------------------------------------------------------------------------------
# Model plumbing: encode once, build an empty cache, take one decoder step.


def encode(model, params, encoder_input_tokens, prompt_index):
  return model.apply({"params": params}, encoder_input_tokens, prompt_index=prompt_index,
                     method="encode")



def shift_right(targets_BxT: Array) -> Array:
  """Decoder inputs for teacher forcing: start token 0, then the targets shifted by one."""
  return jnp.pad(targets_BxT, ((0, 0), (1, 0)))[:, :-1]


def _target_log_likelihood(logits_BxTxV, targets_BxT):
  log_probs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  token_lp_BxT = jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(targets_BxT > 0, token_lp_BxT, 0.0), axis=1)


@jit_with_defaults("model")
def score_targets(model, params: Params, encoder_input_tokens: Array,
                  decoder_input_tokens: Array, decoder_target_tokens: Array, *,
                  prompt_index: Array | None = None) -> Array:
  """Per-example sum of target log-probabilities over non-pad targets, `[B]` (teacher forcing)."""
  logits_BxTxV = model.apply({"params": params}, encoder_input_tokens, decoder_input_tokens,
                             prompt_index=prompt_index)
  return _target_log_likelihood(logits_BxTxV, decoder_target_tokens)


def pad_candidates(candidate_targets: Sequence[Sequence[int]]) -> np.ndarray:
  """Candidate token-id sequences as a zero-padded `[C, T]` int32 array."""
  if not len(candidate_targets):
    raise ValueError("rank_classification needs at least one candidate target")
  length = max(len(c) for c in candidate_targets)
  out = np.zeros((len(candidate_targets), length), np.int32)
  for i, c in enumerate(candidate_targets):
    if not len(c) or 0 in list(c):
      raise ValueError(f"candidate {i} is {list(c)}: it must be non-empty and contain no pad "
                       "id 0 (end each candidate with EOS, id 1)")
    out[i, :len(c)] = c
  return out


@jit_with_defaults("model")
def _rank(model, params, encoder_input_tokens, candidates_BxCxT, prompt_index):
  batch, num_c, t = candidates_BxCxT.shape
  # Encode each example once and share its encoder outputs with all of its candidates.
  encoded = encode(model, params, encoder_input_tokens, prompt_index)
  targets = candidates_BxCxT.reshape(batch * num_c, t)
  logits = model.apply({"params": params}, jnp.repeat(encoded, num_c, axis=0),
                       jnp.repeat(encoder_input_tokens, num_c, axis=0), shift_right(targets),
                       method="decode")
  scores_BxC = _target_log_likelihood(logits, targets).reshape(batch, num_c)
  return jnp.argmax(scores_BxC, axis=1).astype(jnp.int32), scores_BxC


def rank_classification(model, params: Params, encoder_input_tokens: Array,
                        candidate_targets, *,
                        prompt_index: Array | None = None) -> tuple[Array, Array]:
  """Scores every candidate target; returns `(best_index_B, scores_BxC)`.

  `candidate_targets` is a list of token-id sequences (each ending in EOS) shared by all
  examples, or an array `[C, T]` / `[B, C, T]` padded with 0. A candidate's score is the sum of
  its tokens' log-probabilities under the frozen model with the prompt.
  """
  if isinstance(candidate_targets, (list, tuple)):
    candidate_targets = pad_candidates(candidate_targets)
  candidates = jnp.asarray(candidate_targets, jnp.int32)
  batch = encoder_input_tokens.shape[0]
  if candidates.ndim == 2:
    candidates = jnp.broadcast_to(candidates[None], (batch,) + candidates.shape)
  if candidates.ndim != 3 or candidates.shape[0] != batch:
    raise ValueError(f"candidate_targets must be [C, T] or [B={batch}, C, T]; got shape "
                     f"{candidates.shape}")
  return _rank(model, params, encoder_input_tokens, candidates, prompt_index)


# ----------------------------------------------------------------------------------------------
# One entry point for evaluation and inference.
