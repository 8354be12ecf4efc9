"""The paper's optimizer, learning-rate schedules, and the trainable/frozen parameter split.

Only parameters whose whole path matches a trainable regex (default: the prompt; `re.fullmatch`,
so `'prompt'` does not select `encoder/prompt/prompt`: write `'.*prompt'`) get gradients and
optimizer state; every other parameter is frozen and carries no optimizer memory at all, because
the optimizer is only ever given the trainable subtree.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

PROMPT_PATTERNS = (r"^encoder/prompt/prompt$",)
# Every variable of the prompt module: per-layer prompts, shared + task prompts.
ALL_PROMPT_PATTERNS = (r"^encoder/prompt/.*",)
# Multi-task prompts with the shared prompt frozen: only the task parameters train.
TASK_PROMPT_PATTERNS = (r"^encoder/prompt/task_.*",)


def multitask_patterns(train: str = "both") -> tuple[str, ...]:
  """Trainable patterns of multi-task prompts: 'both', 'tasks' (shared frozen) or 'shared'."""
  choices = {"both": ALL_PROMPT_PATTERNS, "tasks": TASK_PROMPT_PATTERNS,
             "shared": PROMPT_PATTERNS}
  if train not in choices:
    raise ValueError(f"multi-task prompts train {train!r}?; choose one of {tuple(choices)}")
  return choices[train]
ALL_PATTERNS = (r".*",)


# --- Trainable / frozen split -------------------------------------------------------------------

def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def split_params(params: dict, patterns: Sequence[str] = PROMPT_PATTERNS) -> tuple[dict, dict]:
  """Splits a nested dict into `(trainable, frozen)` nested dicts by full-path regex match.

  A path is trainable when some pattern matches all of it (`re.fullmatch`): `'dogs'` selects
  `dogs` but not `i/love/dogs`, which needs `'.*/dogs'`.
  """
  if isinstance(patterns, str):
    raise TypeError(f"trainable patterns must be a list of regexes, got the string {patterns!r}")
  compiled = [re.compile(p) for p in patterns]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  trainable = {k: v for k, v in flat.items() if any(c.fullmatch(k) for c in compiled)}
  if not trainable:
    raise ValueError(f"No parameter path matches the trainable patterns {list(patterns)}; "
                     f"paths look like {sorted(flat)[:3]}. Did the model get a PromptConfig?")
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  unflatten = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")
  return unflatten(trainable), unflatten(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The full parameter tree; trainable leaves win (there is no overlap by construction)."""
  flat = flax.traverse_util.flatten_dict(frozen)
  flat.update(flax.traverse_util.flatten_dict(trainable))
  return flax.traverse_util.unflatten_dict(flat)


def cast_floats(tree: Any, dtype) -> Any:
  """Stores frozen parameters in e.g. bfloat16 (computation still happens in config.dtype)."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --- Schedules ----------------------------------------------------------------------------------

def schedule(learning_rate: float = 0.3, *, kind: str = "constant", warmup_steps: int = 0,
             total_steps: int | None = None, end_value: float = 0.0) -> optax.Schedule:
  """constant (paper), rsqrt (T5 pre-training), linear or cosine decay; optional linear warmup."""
  if kind == "constant":
    main = optax.constant_schedule(learning_rate)
  elif kind == "rsqrt":
    offset = max(warmup_steps, 1)
    main = lambda step: learning_rate * jnp.sqrt(offset / jnp.maximum(step + warmup_steps, offset))
  elif kind in ("linear", "cosine"):
    if not total_steps:
      raise ValueError(f"The {kind} schedule needs total_steps (TRAIN_STEPS)")
    decay = max(total_steps - warmup_steps, 1)
    main = (optax.linear_schedule(learning_rate, end_value, decay) if kind == "linear"
            else optax.cosine_decay_schedule(learning_rate, decay, alpha=end_value / learning_rate))
  else:
    raise ValueError(f"Unknown schedule {kind!r}: constant, rsqrt, linear or cosine")
  if warmup_steps <= 0:
    return main
  warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warm, main], [warmup_steps])


# --- Optimizers ---------------------------------------------------------------------------------

def adafactor(learning_rate: float | optax.Schedule = 0.3, *, decay_rate: float = 0.8,
              weight_decay: float = 1e-5, factored: bool = False, clipping_threshold: float = 1.0,
              min_dim_size_to_factor: int = 128, epsilon: float = 1e-30,
              momentum: float | None = None) -> optax.GradientTransformation:
  """Adafactor as the paper tunes prompts: constant LR 0.3, second-moment decay t^-0.8, no
  parameter scaling, no momentum, an unfactored second moment (the prompt is small), update
  clipping at RMS 1.

  Weight decay is T5X's decoupled form: each step subtracts `weight_decay * param`, independent of
  the learning rate (optax's built-in option would multiply it by the learning rate).
  """
  lr = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
  parts = [
      optax.scale_by_factored_rms(factored=factored, decay_rate=decay_rate, step_offset=0,
                                  min_dim_size_to_factor=min_dim_size_to_factor,
                                  epsilon=epsilon),
  ]
  if clipping_threshold is not None:
    parts.append(optax.clip_by_block_rms(clipping_threshold))
  if momentum is not None:
    parts.append(optax.ema(momentum, debias=False))
  parts.append(optax.scale_by_learning_rate(lr))
  if weight_decay:
    parts.append(optax.add_decayed_weights(-weight_decay))
  return optax.chain(*parts)


class ScheduledOptimizer(NamedTuple):
  """An optax transformation that also exposes its learning-rate schedule (for logging)."""

  init: Callable
  update: Callable
  schedule: optax.Schedule


def prompt_tuning_optimizer(learning_rate: float = 0.3, *, schedule_kind: str = "constant",
                            warmup_steps: int = 0, total_steps: int | None = None,
                            **adafactor_kwargs) -> ScheduledOptimizer:
  """The paper's defaults (constant LR 0.3); schedule options for experiments."""
  lr = schedule(learning_rate, kind=schedule_kind, warmup_steps=warmup_steps,
                total_steps=total_steps)
  tx = adafactor(lr, **adafactor_kwargs)
  return ScheduledOptimizer(tx.init, tx.update, lr)


def model_tuning_optimizer(learning_rate: float = 1e-3, **kwargs) -> optax.GradientTransformation:
  """The paper's "model tuning" baseline: every weight trainable, Adafactor LR 1e-3, factored."""
  kwargs.setdefault("factored", True)
  kwargs.setdefault("weight_decay", 0.0)
  return prompt_tuning_optimizer(learning_rate, **kwargs)
