"""Cross-entropy with z-loss and label smoothing, and T5X-style loss normalisation.

Losses are returned as *sums* plus the quantities needed to normalise them, so that gradient
accumulation over microbatches normalises by the whole batch, exactly as one big batch would.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# T5X's names for loss normalisation; a float means "divide by this constant"; None: plain sum.
NORMALIZERS = ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE")


def token_losses(logits_BxTxV: jnp.ndarray, targets_BxT: jnp.ndarray, *, z_loss: float = 1e-4,
                 label_smoothing: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-token `(cross_entropy + z_loss * log(Z)^2, z_loss term)`, both `[B, T]` float32.

  The z-loss keeps the softmax normaliser log(Z) near zero (T5's stabiliser). Label smoothing
  mixes the one-hot target with the uniform distribution, offset by the smoothed distribution's
  entropy so that a perfect prediction scores 0 (as in T5X).
  """
  logits = logits_BxTxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z_BxT[..., None]
  confidence = 1.0 - label_smoothing
  if label_smoothing > 0:
    low = label_smoothing / (vocab - 1)
    normalizing = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    soft = jax.nn.one_hot(targets_BxT, vocab) * (confidence - low) + low
    ce = -jnp.sum(soft * log_probs, axis=-1) - normalizing
  else:
    ce = -jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]
  z = z_loss * jnp.square(log_z_BxT)
  return ce + z, z


def normalizing_factor(weights_BxT: jnp.ndarray, kind) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`(per-token weights to apply, divisor)` for a T5X normaliser name, a float, or None."""
  weights = weights_BxT.astype(jnp.float32)
  if kind is None:
    return weights, jnp.array(1.0, jnp.float32)
  if isinstance(kind, (int, float)):
    return weights, jnp.array(float(kind), jnp.float32)
  if kind == "NUM_REAL_TARGET_TOKENS":
    return weights, jnp.maximum(weights.sum(), 1.0)
  if kind == "NUM_TOTAL_TARGET_TOKENS":
    return weights, jnp.array(float(weights.size), jnp.float32)
  if kind == "AVERAGE_PER_SEQUENCE":
    # Each sequence contributes its mean token loss; then average over sequences.
    per_seq = jnp.maximum(weights.sum(axis=-1, keepdims=True), 1.0)
    return weights / per_seq, jnp.array(float(weights.shape[0]), jnp.float32)
  raise ValueError(f"Unknown loss_normalizing_factor {kind!r}: use None, a number, or one of "
                   f"{NORMALIZERS}")
