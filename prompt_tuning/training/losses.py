"""Cross-entropy with z-loss and label smoothing, and T5X-style loss normalisation.

Losses are returned as *sums* plus the quantities needed to normalise them, so that gradient
accumulation over microbatches normalises by the whole batch, exactly as one big batch would.
"""
from __future__ import annotations

import functools
import math

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

  The gradient is written by hand (`_cross_entropy`, a `custom_vjp`, as T5X does): one fused
  elementwise pass `softmax * (1 + 2 z log Z) - target distribution` over the `[B, T, V]`
  logits, where autodiff would materialise a zero `[B, T, V]` array, scatter the one-hot target
  into it and take separate passes for the softmax and the z-loss terms.
  """
  logits = logits_BxTxV.astype(jnp.float32)
  return _cross_entropy((float(z_loss), float(label_smoothing)), logits, targets_BxT)


def _target_distribution(vocab: int, label_smoothing: float):
  """`(on-target value, off-target value, entropy offset)` of the (smoothed) target."""
  confidence = 1.0 - label_smoothing
  if label_smoothing <= 0:
    return confidence, 0.0, 0.0
  low = label_smoothing / (vocab - 1)
  normalizing = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
  return confidence, low, normalizing


def _soft_targets(targets_BxT, vocab: int, on: float, off: float) -> jnp.ndarray:
  """The target distribution `[B, T, V]` as an elementwise expression XLA fuses into its user."""
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, targets_BxT.shape + (vocab,), 2)
  hit = vocab_ids == targets_BxT[..., None]
  return jnp.where(hit, jnp.float32(on), jnp.float32(off))


def _cross_entropy_fwd(static, logits, targets_BxT):
  z_loss, label_smoothing = static
  vocab = logits.shape[-1]
  on, off, normalizing = _target_distribution(vocab, label_smoothing)
  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  if off:
    # sum_v soft_v * logits_v, with soft = off everywhere and `on` at the target.
    soft_dot = off * jnp.sum(logits, axis=-1) + (on - off) * target_logit
    ce = log_z_BxT - soft_dot - normalizing
  else:
    ce = log_z_BxT - target_logit
  z = z_loss * jnp.square(log_z_BxT)
  return (ce + z, z), (logits, targets_BxT, log_z_BxT)


def _cross_entropy_bwd(static, residuals, cotangents):
  z_loss, label_smoothing = static
  logits, targets_BxT, log_z_BxT = residuals
  g_total, g_z = cotangents
  vocab = logits.shape[-1]
  on, off, _ = _target_distribution(vocab, label_smoothing)
  # d(ce)/dlogits = softmax - soft;  d(z)/dlogits = 2 z_loss log Z softmax.
  softmax_scale = g_total + (g_total + g_z) * (2.0 * z_loss) * log_z_BxT
  softmax = jnp.exp(logits - log_z_BxT[..., None])
  grad = softmax * softmax_scale[..., None] - g_total[..., None] * _soft_targets(
      targets_BxT, vocab, on, off)
  return grad, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(static, logits, targets_BxT):
  return _cross_entropy_fwd(static, logits, targets_BxT)[0]


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_correct(logits_BxTxV: jnp.ndarray, targets_BxT: jnp.ndarray) -> jnp.ndarray:
  """Whether the target is the highest-scoring token, `[B, T]` bool.

  Compares the target's logit with the maximum instead of taking an argmax: the same answer
  except on exact ties (where this counts the target as correct), and on XLA:CPU a plain max
  reduction (shared with the loss's log-sum-exp) instead of a much slower index-tracking one.
  """
  target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return target_logit >= jnp.max(logits_BxTxV, axis=-1)


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


def squared_l2_distance(x_PxD: jnp.ndarray, y_PxD: jnp.ndarray) -> jnp.ndarray:
  """`sum((x - y)^2) / P`: each row's squared Euclidean distance, averaged over the P rows.

  The prompt-waywardness distance (Khashabi et al., 2022, as their code and the original
  implementation compute it; see `wayward.py`).
  """
  if x_PxD.shape != y_PxD.shape or x_PxD.ndim != 2:
    raise ValueError(f"squared_l2_distance needs two [P, D] arrays of one shape, got "
                     f"{x_PxD.shape} and {y_PxD.shape}")
  return jnp.sum(jnp.square(x_PxD - y_PxD)) / x_PxD.shape[0]
