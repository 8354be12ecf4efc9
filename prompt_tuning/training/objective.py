"""The model wrapper: loss, scoring and prediction around the Flax T5 (like T5X's
`EncoderDecoderModel`).

Batches are the dicts seqio's `EncDecFeatureConverter` produces: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, optionally `decoder_loss_weights`, plus
`prompt_index` when the model holds a prompt bank.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from prompt_tuning.training import losses
from prompt_tuning.model.t5 import T5

Batch = Mapping[str, jnp.ndarray]


def loss_weights(batch: Batch) -> jnp.ndarray:
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = batch["decoder_target_tokens"] > 0
  return weights.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """Frozen T5 (+ prompt) with the paper's loss: cross-entropy + z-loss 1e-4, no smoothing."""

  module: T5
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  # T5X names: None (sum), a constant, "NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS",
  # "AVERAGE_PER_SEQUENCE". Per-token mean by default, so logged losses are comparable.
  loss_normalizing_factor: Any = "NUM_REAL_TARGET_TOKENS"
  # A term of the parameters added once per step to the training objective, e.g.
  # `wayward.WaywardRegularizer`: `regularizer(params) -> (value, metrics)`. None: the task loss.
  regularizer: Any = None

  def logits(self, params, batch: Batch, *, dropout_rng=None) -> jnp.ndarray:
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        prompt_index=batch.get("prompt_index"), enable_dropout=dropout_rng is not None,
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"), rngs=rngs)

  def token_weights_and_normalizer(self, batch: Batch):
    return losses.normalizing_factor(loss_weights(batch), self.loss_normalizing_factor)

  def loss_sums(self, params, batch: Batch, token_weights: jnp.ndarray, *,
                dropout_rng=None) -> dict[str, jnp.ndarray]:
    """Weighted sums over the batch (un-normalised), for exact microbatch accumulation."""
    logits = self.logits(params, batch, dropout_rng=dropout_rng)
    targets = batch["decoder_target_tokens"]
    per_token, z = losses.token_losses(logits, targets, z_loss=self.z_loss,
                                       label_smoothing=self.label_smoothing)
    real = loss_weights(batch)
    correct = losses.token_correct(logits, targets).astype(jnp.float32) * real
    return {
        "loss": jnp.sum(per_token * token_weights),
        "z_loss": jnp.sum(z * token_weights),
        "correct_tokens": jnp.sum(correct),
        "target_tokens": jnp.sum(real),
    }

  def regularization(self, params) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`(value, metrics)` of the regulariser (0 without one); not part of the task loss."""
    if self.regularizer is None:
      return jnp.zeros((), jnp.float32), {}
    return self.regularizer(params)

  def loss_fn(self, params, batch: Batch, *, dropout_rng=None):
    """`(normalised loss + regularizer, metrics)` for one batch: the training objective."""
    weights, normalizer = self.token_weights_and_normalizer(batch)
    sums = self.loss_sums(params, batch, weights, dropout_rng=dropout_rng)
    regularization, _ = self.regularization(params)
    return sums["loss"] / normalizer + regularization, sums

  def score_batch(self, params, batch: Batch) -> jnp.ndarray:
    """Per-example log-likelihood of the targets (sum over real target tokens), `[B]`."""
    logits = self.logits(params, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = batch["decoder_target_tokens"]
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_ll * loss_weights(batch), axis=-1)
