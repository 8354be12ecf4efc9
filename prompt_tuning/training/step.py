"""The train step: gradients with respect to the trainable parameters (the prompt) only.

Frozen parameters are an argument of the jitted step, never closed over (closing over them would
bake gigabytes of constants into the executable). Because we differentiate only with respect to
the prompt, XLA computes no weight gradients for the frozen model: a step costs about two forward
passes instead of three. Gradient accumulation keeps that property (it scans over microbatches and
still differentiates only the prompt).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from prompt_tuning.training import objective as models
from prompt_tuning.training import optimizers
from prompt_tuning.training.objective import EncoderDecoderModel

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any      # the trainable subtree only (by default {"encoder": {"prompt": {"prompt": P}}})
  opt_state: Any   # optimizer state for `params` only: frozen weights have none


def create_train_state(trainable: Any, tx: optax.GradientTransformation, step: int = 0):
  return TrainState(step=jnp.asarray(step, jnp.int32), params=trainable,
                    opt_state=tx.init(trainable))


def _split_microbatches(batch, num_microbatches: int):
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"Batch size {x.shape[0]} is not divisible by num_microbatches="
                       f"{num_microbatches}")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, frozen: Any, batch: dict, rng: jax.Array, *,
               model: EncoderDecoderModel, tx: optax.GradientTransformation,
               num_microbatches: int = 1, skip_nonfinite: bool = False,
               learning_rate_fn: Callable | None = None) -> tuple[TrainState, Metrics]:
  """One optimizer update of the trainable parameters."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout = model.module.config.dropout_rate > 0
  token_weights, normalizer = model.token_weights_and_normalizer(batch)

  def loss_sums(trainable, mb, weights, mb_rng):
    params = optimizers.merge_params(trainable, frozen)
    sums = model.loss_sums(params, mb, weights, dropout_rng=mb_rng if dropout else None)
    return sums["loss"], sums

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  if num_microbatches <= 1:
    (_, sums), grads = grad_fn(state.params, batch, token_weights, step_rng)
  else:
    mbs = _split_microbatches((batch, token_weights), num_microbatches)

    def accumulate(carry, xs):
      i, (mb, weights) = xs
      (_, mb_sums), mb_grads = grad_fn(state.params, mb, weights, jax.random.fold_in(step_rng, i))
      grads, sums = carry
      return (jax.tree_util.tree_map(jnp.add, grads, mb_grads),
              jax.tree_util.tree_map(jnp.add, sums, mb_sums)), None

    zeros_grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    zeros_sums = {k: jnp.zeros((), jnp.float32)
                  for k in ("loss", "z_loss", "correct_tokens", "target_tokens")}
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros_grads, zeros_sums),
                                    (jnp.arange(num_microbatches), mbs))

  grads = jax.tree_util.tree_map(lambda g: g / normalizer, grads)
  loss = sums["loss"] / normalizer
  regularization, reg_metrics = jnp.zeros((), jnp.float32), {}
  if model.regularizer is not None:
    # A function of the parameters, not of the batch: added once per step, after accumulation.
    reg_fn = lambda t: model.regularization(optimizers.merge_params(t, frozen))
    (regularization, reg_metrics), reg_grads = jax.value_and_grad(reg_fn, has_aux=True)(
        state.params)
    grads = jax.tree_util.tree_map(jnp.add, grads, reg_grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
  # Finite norms too: parameters that grew past ~1e19 are finite one by one while their norm
  # overflows, and such a prompt only ever gets zero updates after that.
  finite = (jnp.isfinite(loss) & jnp.isfinite(regularization) & _tree_all_finite(grads)
            & _tree_all_finite(params) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  metrics = {
      "loss": loss,
      "z_loss": sums["z_loss"] / normalizer,
      "accuracy": sums["correct_tokens"] / jnp.maximum(sums["target_tokens"], 1.0),
      "target_tokens": sums["target_tokens"],
      "grad_norm": grad_norm,
      "param_norm": optax.global_norm(params),
      "finite": finite,
  }
  if model.regularizer is not None:  # "loss" stays the task loss, comparable across runs
    metrics.update(reg_metrics, objective=loss + regularization)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(trainable: Any, frozen: Any, batch: dict, *,
              model: EncoderDecoderModel) -> dict[str, jax.Array]:
  """Teacher-forced loss sums over real target tokens (summable across eval batches)."""
  params = optimizers.merge_params(trainable, frozen)
  return model.loss_sums(params, batch, models.loss_weights(batch))


def jit_train_step(model: EncoderDecoderModel, tx: optax.GradientTransformation, *,
                   num_microbatches: int = 1, skip_nonfinite: bool = False,
                   learning_rate_fn: Callable | None = None, in_shardings=None,
                   out_shardings=None):
  """`train_step` jitted with the state donated (updated in place on device)."""
  fn = functools.partial(train_step, model=model, tx=tx, num_microbatches=num_microbatches,
                         skip_nonfinite=skip_nonfinite, learning_rate_fn=learning_rate_fn)
  kwargs = {}
  if in_shardings is not None:
    kwargs["in_shardings"] = in_shardings
  if out_shardings is not None:
    kwargs["out_shardings"] = out_shardings
  return jax.jit(fn, donate_argnums=(0,), **kwargs)
