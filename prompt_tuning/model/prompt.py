"""The soft prompt: its parameter, how it is combined with the input, and how it is initialised.

A prompt is a float32 `[P, d_model]` matrix (or a bank `[N, P, d_model]` indexed per example)
inserted into the encoder's embedded input *before* input dropout. It lives at the parameter path
`encoder/prompt/prompt` with logical axes `("prompt", "prompt_embed")` (replicated by default).

Initialisers that need the frozen model's vocabulary embeddings (sampled vocabulary, class
labels) run after the checkpoint is loaded: see `initializers.initialize` (called by
`trainer.build`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

COMBINATIONS = ("prefix", "prefix_after_bos", "suffix_before_eos", "suffix")
# Per-layer ("deep") prompts: what a layer's prompt does to the prompt positions' hidden states.
PER_LAYER_MODES = ("none", "replace", "add")
# Multi-task prompts: how a task's parameters turn the shared prompt into that task's prompt.
TASK_COMBINATIONS = ("concat", "add", "project")
PROMPT_PATH = ("encoder", "prompt", "prompt")
LAYER_PROMPTS_PATH = ("encoder", "prompt", "layer_prompts")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How a prompt is attached to the encoder input."""

  length: int = 100
  # "prefix" (paper default), "prefix_after_bos" (after the first token),
  # "suffix_before_eos" (just before each example's last real token, its EOS) or "suffix"
  # (after the last real token, i.e. after EOS: the original's suffix with before_eos=False).
  # Real tokens are counted as the original does (non-pad ids), so inputs are right-padded.
  combine: str = "prefix"
  # A bank of `bank_size` prompts selected per example by `prompt_index` (None: one prompt).
  bank_size: int | None = None
  # Per-layer ("deep") prompts: besides the input prompt (layer 0's input), every later encoder
  # layer gets its own trainable prompt `encoder/prompt/layer_prompts` [layers - 1, P, D] that
  # "replace"s the prompt positions' hidden states at that layer's input, or is "add"ed to them
  # (the original's `replace_prompt` / `add_prompt`); "none": the paper's input prompt only.
  per_layer: str = "none"
  # Multi-task prompts over `num_tasks` tasks (None: off). `encoder/prompt/prompt` is then the
  # shared prompt [length, D]; each example's first input token is its task sentinel (the
  # `task_index_` tasks' `<extra_id_t>`), read as task `task_token_base - token` and dropped from
  # the input. `task_combine` makes the task's prompt: "concat" (shared rows, then the task's own
  # `task_prompts` [num_tasks, task_length, D]), "add" (shared + `task_prompts`
  # [num_tasks, length, D], which start at zero) or "project" (a per-task affine map of the
  # shared rows, `task_kernel` [num_tasks, D, D] from the identity, `task_bias` [num_tasks, D]
  # from zero) -- the original's concat / add / project multi-task prompts.
  num_tasks: int | None = None
  task_combine: str = "concat"
  task_length: int | None = None  # "concat" only; None: `length`
  # The token id of task 0's sentinel: the vocabulary's `vocab_size - 1` (<extra_id_0>), 32099
  # for T5's SentencePiece vocabulary, 258 for ByT5's / the demo's byte vocabulary.
  task_token_base: int | None = None

  def __post_init__(self):
    if not isinstance(self.length, int) or self.length <= 0:
      raise ValueError(f"PromptConfig.length must be a positive int, got {self.length!r}")
    if self.combine not in COMBINATIONS:
      raise ValueError(f"PromptConfig.combine={self.combine!r}; choose one of {COMBINATIONS}")
    if self.bank_size is not None and self.bank_size <= 0:
      raise ValueError(f"PromptConfig.bank_size must be positive or None, got {self.bank_size}")
    if self.per_layer not in PER_LAYER_MODES:
      raise ValueError(f"PromptConfig.per_layer={self.per_layer!r}; choose one of "
                       f"{PER_LAYER_MODES}")
    if self.per_layer != "none" and self.bank_size is not None:
      raise ValueError("Per-layer prompts with a prompt bank are not supported: set "
                       "PromptConfig.per_layer='none' or bank_size=None")
    if self.num_tasks is not None:
      if not isinstance(self.num_tasks, int) or self.num_tasks <= 0:
        raise ValueError(f"PromptConfig.num_tasks must be a positive int or None, got "
                         f"{self.num_tasks!r}")
      if self.task_combine not in TASK_COMBINATIONS:
        raise ValueError(f"PromptConfig.task_combine={self.task_combine!r}; choose one of "
                         f"{TASK_COMBINATIONS}")
      if self.task_token_base is None:
        raise ValueError("Multi-task prompts read each example's task from its first token: set "
                         "PromptConfig.task_token_base to the id of <extra_id_0> (the inputs "
                         "vocabulary's vocab_size - 1: 32099 for T5, 258 for bytes)")
      if self.bank_size is not None or self.per_layer != "none":
        raise ValueError("Multi-task prompts do not combine with a prompt bank or per-layer "
                         "prompts: set bank_size=None and per_layer='none'")
      if self.task_length is not None and (self.task_combine != "concat" or
                                           self.task_length <= 0):
        raise ValueError(f"PromptConfig.task_length={self.task_length!r} needs "
                         "task_combine='concat' and a positive length")

  @property
  def total_length(self) -> int:
    """Rows the encoder sees: with concatenated multi-task prompts, shared + task rows."""
    if self.num_tasks is not None and self.task_combine == "concat":
      return self.length + (self.task_length or self.length)
    return self.length

  @property
  def reads_task_token(self) -> bool:
    return self.num_tasks is not None
  @property
  def shape_suffix(self) -> tuple[int, ...]:
    return () if self.bank_size is None else (self.bank_size,)


def random_uniform(low: float = -0.5, high: float = 0.5) -> Callable:
  """U[low, high). The paper states U[-0.5, 0.5]; the original code drew U[0, 0.5)."""
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, minval=low, maxval=high)
  return init


def insertion_positions(valid_BxL: jnp.ndarray, combine: str) -> jnp.ndarray:
  """Where the prompt's first row lands in each example, in input coordinates."""
  batch = valid_BxL.shape[0]
  if combine == "prefix":
    return jnp.zeros((batch,), jnp.int32)
  if combine == "prefix_after_bos":
    return jnp.ones((batch,), jnp.int32)
  if combine in ("suffix_before_eos", "suffix"):
    n = valid_BxL.sum(axis=1).astype(jnp.int32)
    return jnp.maximum(n - 1, 0) if combine == "suffix_before_eos" else n
  raise ValueError(f"Unknown prompt combination {combine!r}; choose one of {COMBINATIONS}")


def combine(embedded_BxLxD: jnp.ndarray, prompt_BxPxD: jnp.ndarray, valid_BxL: jnp.ndarray,
            combine_mode: str = "prefix") -> tuple[jnp.ndarray, jnp.ndarray]:
  """Inserts the prompt into the embedded input; returns `(embedded_Bx(P+L)xD, valid_Bx(P+L))`.

  Prompt positions are always valid. The prefix case is a plain concatenation; the others
  insert at a per-example position with one gather, so every combination has static shapes.
  """
  batch, length, _ = embedded_BxLxD.shape
  plen = prompt_BxPxD.shape[1]
  prompt_BxPxD = prompt_BxPxD.astype(embedded_BxLxD.dtype)
  if combine_mode == "prefix":
    return (jnp.concatenate([prompt_BxPxD, embedded_BxLxD], axis=1),
            jnp.concatenate([jnp.ones((batch, plen), bool), valid_BxL], axis=1))
  valid_out, from_prompt, src_x, src_p = _insertion_indices(valid_BxL, plen, combine_mode)
  take = jax.vmap(lambda a, i: jnp.take(a, i, axis=0))
  out = jnp.where(from_prompt[..., None], take(prompt_BxPxD, src_p), take(embedded_BxLxD, src_x))
  return out, valid_out


def combine_mask(valid_BxL: jnp.ndarray, prompt_length: int,
                 combine_mode: str = "prefix") -> jnp.ndarray:
  """The validity vector of the combined sequence, without touching embeddings."""
  if combine_mode == "prefix":
    batch = valid_BxL.shape[0]
    return jnp.concatenate([jnp.ones((batch, prompt_length), bool), valid_BxL], axis=1)
  return _insertion_indices(valid_BxL, prompt_length, combine_mode)[0]


def _insertion_indices(valid_BxL, plen, combine_mode):
  _, length = valid_BxL.shape
  pos_B1 = insertion_positions(valid_BxL, combine_mode)[:, None]
  j_1xT = jnp.arange(length + plen)[None, :]
  from_prompt = (j_1xT >= pos_B1) & (j_1xT < pos_B1 + plen)
  src_x = jnp.clip(jnp.where(j_1xT < pos_B1, j_1xT, j_1xT - plen), 0, length - 1)
  src_p = jnp.clip(j_1xT - pos_B1, 0, plen - 1)
  valid_src = jnp.take_along_axis(valid_BxL, src_x, axis=1)
  valid_out = from_prompt | (valid_src & (j_1xT - plen < length))
  return valid_out, from_prompt, src_x, src_p


def split_task_token(tokens_BxL: jnp.ndarray, config: PromptConfig
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`(task_index_B, tokens_Bx(L-1))`: each row's task from its first token, which is dropped.

  Indices outside `[0, num_tasks)` (an all-padding row, whose first token is 0, or a sentinel
  from another vocabulary) are clipped into range; those rows still get some task's prompt.
  """
  task_B = config.task_token_base - tokens_BxL[:, 0].astype(jnp.int32)
  return jnp.clip(task_B, 0, config.num_tasks - 1), tokens_BxL[:, 1:]


def task_prompts(shared_PxD: jnp.ndarray, task_params: dict, task_combine: str) -> jnp.ndarray:
  """Every task's effective prompt `[num_tasks, P_eff, D]` from the shared prompt.

  The model takes each example's row of this; exports write it, so an exported task prompt is
  exactly what that task's examples saw.
  """
  shared_PxD = shared_PxD.astype(jnp.float32)
  if task_combine == "concat":
    rows_TxPtxD = task_params["task_prompts"]
    shared_TxPxD = jnp.broadcast_to(shared_PxD[None], (rows_TxPtxD.shape[0],) + shared_PxD.shape)
    return jnp.concatenate([shared_TxPxD, rows_TxPtxD], axis=1)
  if task_combine == "add":
    return shared_PxD[None] + task_params["task_prompts"]
  if task_combine == "project":
    projected = jnp.einsum("pd,tde->tpe", shared_PxD, task_params["task_kernel"])
    return projected + task_params["task_bias"][:, None, :]
  raise ValueError(f"Unknown task_combine {task_combine!r}; choose one of {TASK_COMBINATIONS}")


def _zeros(rng, shape, dtype=jnp.float32):
  del rng
  return jnp.zeros(shape, dtype)


def _identities(rng, shape, dtype=jnp.float32):
  del rng
  return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def inject_layer_prompt(hidden_BxTxD: jnp.ndarray, layer_prompt_PxD: jnp.ndarray,
                        valid_BxL: jnp.ndarray, combine_mode: str = "prefix",
                        mode: str = "replace") -> jnp.ndarray:
  """A layer's prompt put at the prompt positions of `hidden` (the combined sequence).

  `valid_BxL` is the validity of the input *before* the prompt was combined (it says where the
  prompt sits for the non-prefix combinations). "replace" overwrites those hidden states, "add"
  adds the layer prompt to them; every other position is returned unchanged.
  """
  plen = layer_prompt_PxD.shape[0]
  layer_prompt_PxD = layer_prompt_PxD.astype(hidden_BxTxD.dtype)
  if combine_mode == "prefix":
    head = hidden_BxTxD[:, :plen]
    new_head = (jnp.broadcast_to(layer_prompt_PxD[None], head.shape) if mode == "replace"
                else head + layer_prompt_PxD[None])
    return jnp.concatenate([new_head, hidden_BxTxD[:, plen:]], axis=1)
  _, from_prompt, _, src_p = _insertion_indices(valid_BxL, plen, combine_mode)
  rows_BxTxD = jnp.take(layer_prompt_PxD, src_p, axis=0)
  at_prompt = from_prompt[..., None]
  if mode == "replace":
    return jnp.where(at_prompt, rows_BxTxD, hidden_BxTxD)
  return hidden_BxTxD + jnp.where(at_prompt, rows_BxTxD, jnp.zeros_like(rows_BxTxD))


class Prompt(nn.Module):
  """The trainable prompt parameter and its insertion into the encoder input.

  With `config.per_layer` set it also holds the later layers' prompts (`layer_prompts`,
  `[num_layers - 1, P, D]`), which the encoder injects with `inject_layer_prompt`.
  """

  config: PromptConfig
  d_model: int
  init_fn: Callable = dataclasses.field(default_factory=random_uniform)
  num_layers: int = 1  # encoder layers; only per-layer prompts need it

  def setup(self):
    cfg = self.config
    if cfg.bank_size is None:
      axes = ("prompt", "prompt_embed")
      shape = (cfg.length, self.d_model)
    else:
      axes = ("prompt_bank", "prompt", "prompt_embed")
      shape = (cfg.bank_size, cfg.length, self.d_model)
    self.prompt_table = self.param("prompt", nn.with_logical_partitioning(self.init_fn, axes),
                                   shape, jnp.float32)
    if cfg.per_layer != "none":
      if self.num_layers < 2:
        raise ValueError(f"Per-layer prompts need an encoder of 2 or more layers; this one has "
                         f"{self.num_layers}")
      self.layer_table = self.param(
          "layer_prompts", nn.with_logical_partitioning(
              self.init_fn, ("prompt_layers", "prompt", "prompt_embed")),
          (self.num_layers - 1, cfg.length, self.d_model), jnp.float32)
    if cfg.num_tasks is not None:
      t, d = cfg.num_tasks, self.d_model
      param = lambda name, init, axes, shape: self.param(
          name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
      task_axes = ("prompt_tasks", "prompt", "prompt_embed")
      if cfg.task_combine == "concat":
        self.task_params = {"task_prompts": param(
            "task_prompts", self.init_fn, task_axes, (t, cfg.task_length or cfg.length, d))}
      elif cfg.task_combine == "add":  # zero: every task starts at the shared prompt
        self.task_params = {"task_prompts": param("task_prompts", _zeros, task_axes,
                                                  (t, cfg.length, d))}
      else:  # identity map and zero bias: every task starts at the shared prompt
        self.task_params = {
            "task_kernel": param("task_kernel", _identities,
                                 ("prompt_tasks", "prompt_embed", "prompt_embed_out"), (t, d, d)),
            "task_bias": param("task_bias", _zeros, ("prompt_tasks", "prompt_embed"), (t, d))}

  def layer_prompts(self) -> jnp.ndarray:
    """`[num_layers - 1, P, D]`: the prompt of encoder layers 1, 2, ... (per-layer prompts)."""
    return self.layer_table

  def __call__(self, embedded_BxLxD, valid_BxL, prompt_index_B=None, task_index_B=None):
    cfg = self.config
    prompt = self.prompt_table
    batch = embedded_BxLxD.shape[0]
    if cfg.num_tasks is not None:
      if task_index_B is None:
        task_index_B = jnp.zeros((batch,), jnp.int32)
      every_TxPxD = task_prompts(prompt, self.task_params, cfg.task_combine)
      prompt_BxPxD = jnp.take(every_TxPxD, task_index_B, axis=0)
    elif cfg.bank_size is None:
      if prompt_index_B is not None:
        raise ValueError("prompt_index was given but the model has a single prompt; set "
                         "PromptConfig.bank_size to use a prompt bank")
      prompt_BxPxD = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
    else:
      if prompt_index_B is None:
        prompt_index_B = jnp.zeros((batch,), jnp.int32)
      prompt_BxPxD = jnp.take(prompt, prompt_index_B, axis=0)
    prompt_BxPxD = nn.with_logical_constraint(prompt_BxPxD, ("batch", "prompt", "prompt_embed"))
    return combine(embedded_BxLxD, prompt_BxPxD, valid_BxL, cfg.combine)
