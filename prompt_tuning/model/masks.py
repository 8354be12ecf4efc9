"""Attention masks and biases shared by the encoder, the decoder and the prompt.

Masks are boolean `[B, 1, Q, K]` (True = may attend); `mask_to_bias` turns one into the additive
float bias the attention adds to its logits. The prompt changes the encoder's length, so every
encoder-side mask is built from the *combined* (prompt + input) validity vector.
"""
from __future__ import annotations

import jax.numpy as jnp

# Large but finite: keeps softmax of fully masked rows finite (uniform) instead of NaN.
NEG_INF = -1e10


def token_mask(tokens_BxL: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
  """True at real tokens, False at padding."""
  return tokens_BxL != pad_id


def fully_visible_mask(valid_q_BxQ: jnp.ndarray, valid_k_BxK: jnp.ndarray) -> jnp.ndarray:
  """Each valid query sees every valid key: encoder self-attention and cross-attention."""
  return (valid_q_BxQ[:, None, :, None] & valid_k_BxK[:, None, None, :])


def key_mask(valid_k_BxK: jnp.ndarray) -> jnp.ndarray:
  """Every query sees every valid key (queries at padding are left unmasked, like HF T5)."""
  return valid_k_BxK[:, None, None, :]


def causal_mask(length: int) -> jnp.ndarray:
  """`[1, 1, L, L]` lower-triangular mask for the decoder's self-attention."""
  i = jnp.arange(length)
  return (i[:, None] >= i[None, :])[None, None]


def mask_to_bias(mask: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  return jnp.where(mask, jnp.array(0.0, dtype), jnp.array(NEG_INF, dtype))


def reject_packing(**features) -> None:
  """Prompts assume one example per row; packed inputs would let prompts leak across examples."""
  for name, value in features.items():
    if value is not None:
      raise ValueError(
          f"Packed examples ({name} was given) are not supported with prompt tuning: a prompt "
          "is prepended once per row, so packing would share it between examples and break the "
          "masks. Use seqio.EncDecFeatureConverter(pack=False) (the default in this project).")
