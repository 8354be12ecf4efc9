"""The T5 building blocks with T5X parameter names and logical axis names: dense layers (with the
optional bfloat16 matmul of `T5Config.matmul_dtype`), RMS norm, embeddings, relative position
biases, attention and the MLP. `prompt_tuning.model.t5` assembles them."""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.model.config import T5Config

Array = jax.Array
constrain = nn.with_logical_constraint


def _normal(stddev: float) -> Callable:
  return nn.initializers.normal(stddev=stddev)


def _activation(name: str) -> Callable:
  if name == "relu":
    return jax.nn.relu
  if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
    return functools.partial(jax.nn.gelu, approximate=True)
  if name == "gelu_exact":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "silu":
    return jax.nn.silu
  if name == "linear":
    return lambda x: x
  raise ValueError(f"Unknown activation {name!r}")


def _transposed_specs(spec: str) -> tuple[str, str]:
  """The einsum specs of the two input cotangents of a two-operand einsum `spec`."""
  inputs, out = spec.split("->")
  lhs, rhs = inputs.split(",")
  for side, other in ((lhs, rhs), (rhs, lhs)):
    if set(side) - set(other) - set(out):
      raise ValueError(f"mixed_einsum needs every index of {side!r} in the other operand or the "
                       f"output; got {spec!r}")
  return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(static, a: Array, b: Array) -> Array:
  spec, low, _, _ = static
  return jnp.einsum(spec, a.astype(low), b.astype(low), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(static, a, b):
  spec, low, _, _ = static
  a_low, b_low = a.astype(low), b.astype(low)
  out = jnp.einsum(spec, a_low, b_low, preferred_element_type=jnp.float32)
  return out, (a_low, b_low)  # residuals in the low dtype: half the activation memory


def _mixed_einsum_bwd(static, residuals, g):
  spec, low, a_dtype, b_dtype = static
  a_low, b_low = residuals
  spec_a, spec_b = _transposed_specs(spec)
  # Without this rule JAX transposes to dots with one float32 operand, which XLA:CPU runs as
  # float32 dots: the backward pass would lose the bfloat16 speed-up.
  g_low = g.astype(low)
  da = jnp.einsum(spec_a, g_low, b_low, preferred_element_type=jnp.float32)
  db = jnp.einsum(spec_b, a_low, g_low, preferred_element_type=jnp.float32)
  return da.astype(a_dtype), db.astype(b_dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def mixed_einsum(spec: str, a: Array, b: Array, low_dtype) -> Array:
  """`einsum(spec, a, b)` with inputs rounded to `low_dtype` and float32 accumulation and result.

  The gradient takes the same route: the float32 cotangent is rounded to `low_dtype` and each
  input's cotangent is again a low-precision-input, float32-accumulating einsum (what
  `torch.autocast` does, but the cotangents of `a` and `b` come back in their own dtypes).
  """
  static = (spec, jnp.dtype(low_dtype), jnp.dtype(a.dtype), jnp.dtype(b.dtype))
  return _mixed_einsum(static, a, b)


def einsum(spec: str, a: Array, b: Array, config: T5Config) -> Array:
  """Every weight matmul of the model goes through here.

  Default (`matmul_dtype=None`): inputs in the activation dtype, as plain `jnp.einsum`. With
  `matmul_dtype` set: `mixed_einsum`, the float32 result cast to the activation dtype.
  """
  dtype = config.activation_dtype
  if config.matmul_dtype is None:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype))
  return mixed_einsum(spec, a, b, config.matmul_dtype).astype(dtype)


def _dense_spec(ndim: int) -> str:
  batch = "abcdefgh"[:ndim - 1]
  return f"{batch}i,io->{batch}o"


def matmul(x: Array, kernel: Array, config: T5Config) -> Array:
  """`x @ kernel` over the last axis of x (see `einsum` for the dtypes)."""
  return einsum(_dense_spec(x.ndim), x, kernel, config)


class Dense(nn.Module):
  """Bias-free dense layer whose kernel is `[in, out]` with logical axes `kernel_axes`."""

  features: int
  kernel_axes: tuple[str, str]
  stddev: float
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(_normal(self.stddev),
                                                               self.kernel_axes),
                        (x.shape[-1], self.features), jnp.dtype(self.config.param_dtype))
    return matmul(x, kernel, self.config)


class RMSNorm(nn.Module):
  """T5's layer norm: no mean subtraction, no bias; statistics in float32."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.dtype(self.config.param_dtype))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.config.activation_dtype)


class Embed(nn.Module):
  """Token embedding `[vocab, embed]`; `attend` gives logits against it (tied output layer)."""

  config: T5Config

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
        (self.config.vocab_size, self.config.d_model), jnp.dtype(self.config.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.config.activation_dtype)

  def attend(self, x: Array) -> Array:
    batch = "abcdefgh"[:x.ndim - 1]
    return einsum(f"{batch}d,vd->{batch}v", x, self.embedding, self.config)


def relative_position_buckets(query_len: int, key_len: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int,
                              query_offset: int = 0) -> np.ndarray:
  """T5's bucketing of `key_pos - query_pos`, computed in numpy float32 like Mesh TF and HF.

  Computed at trace time (shapes are static) so that bucket boundaries match the reference
  implementations exactly; a float rounding difference here would move whole buckets.
  """
  context = np.arange(query_len, dtype=np.int64)[:, None] + query_offset
  memory = np.arange(key_len, dtype=np.int64)[None, :]
  relative = memory - context
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(np.int64) * num_buckets
    relative = np.abs(relative)
  else:
    relative = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  is_small = relative < max_exact
  log_ratio = np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact))
  large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                       * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(is_small, relative, large)
  return buckets.astype(np.int32)


class RelativePositionBiases(nn.Module):
  """Learned per-head bias by relative-position bucket, shared by all layers of a stack."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_len: int, key_len: int, query_position: Array | None = None) -> Array:
    cfg = self.config
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(_normal(cfg.d_model ** -0.5), ("heads", "relpos_buckets")),
        (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.dtype(cfg.param_dtype))
    kwargs = dict(bidirectional=self.bidirectional, num_buckets=cfg.relative_attention_num_buckets,
                  max_distance=cfg.relative_attention_max_distance)
    if query_position is None:
      buckets_QxK = jnp.asarray(relative_position_buckets(query_len, key_len, **kwargs))
    else:
      # One decoding step: the row of the full table at the current position.
      full = jnp.asarray(relative_position_buckets(key_len, key_len, **kwargs))
      buckets_QxK = jax.lax.dynamic_slice_in_dim(full, query_position, query_len, axis=0)
    bias_HxQxK = jnp.take(table.astype(jnp.float32), buckets_QxK, axis=1)
    return bias_HxQxK[None]  # [1, H, Q, K]


def split_heads(x_BxLxHD: Array, num_heads: int) -> Array:
  """`[B, L, H * D] -> [B, H, L, D]`."""
  b, length, _ = x_BxLxHD.shape
  x_BxHxLxD = x_BxLxHD.reshape(b, length, num_heads, -1).transpose(0, 2, 1, 3)
  return constrain(x_BxHxLxD, ("batch", "heads", "length", "kv"))


def _attention_einsum(spec: str, a: Array, b: Array, config: T5Config, *,
                      float32_out: bool = False) -> Array:
  """Attention's two einsums (no weights involved) always run in the activation dtype.

  `matmul_dtype` is for weight matmuls: in bfloat16, attention's small batched matmuls were
  slower on XLA:CPU (extra converts) and less accurate (logits and softmax weights rounded).
  """
  dtype = config.activation_dtype
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32 if float32_out else None)


class Attention(nn.Module):
  """Multi-head attention without 1/sqrt(d) scaling (T5 folds it into the query weights).

  Heads are laid out `[B, H, L, D]` for the two attention einsums: with batch and heads leading
  XLA:CPU runs them as plain batched matmuls (from `[B, L, H, D]` the forward pass took about
  three times as long, measured on T5 Small).

  With `decode=True` keys and values are kept in a cache (collection "cache") of the length it
  was initialised with, laid out `[B, H, T, D]`; each step writes one position, `decode_index`,
  given by the decoder. `kv` passes precomputed keys and values `[B, H, S, D]`
  (cross-attention while decoding).
  """

  config: T5Config

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array | None, bias: Array, *, decode: bool = False,
               decode_index: Array | None = None, deterministic: bool = True,
               kv: tuple[Array, Array] | None = None) -> Array:
    cfg = self.config
    h, dh, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    inner = h * dh
    proj = functools.partial(Dense, config=cfg)
    dropout = nn.Dropout(cfg.dropout_rate)
    q_BxQxHD = proj(inner, ("embed", "joined_kv"), (d * dh) ** -0.5, name="query")(x_q)
    if kv is None:
      k_BxKxHD = proj(inner, ("embed", "joined_kv"), d ** -0.5, name="key")(x_kv)
      v_BxKxHD = proj(inner, ("embed", "joined_kv"), d ** -0.5, name="value")(x_kv)

    q_BxHxQxD = split_heads(q_BxQxHD, h)
    if kv is None:
      k_BxHxKxD, v_BxHxKxD = split_heads(k_BxKxHD, h), split_heads(v_BxKxHD, h)
    else:
      k_BxHxKxD, v_BxHxKxD = kv
    if decode:
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxHxKxD.shape,
                               k_BxHxKxD.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxHxKxD.shape,
                               v_BxHxKxD.dtype)
      if decode_index is not None:
        if q_BxHxQxD.shape[2] != 1:
          raise ValueError("Cached decoding takes one token per step; got "
                           f"{q_BxHxQxD.shape[2]} positions")
        k_BxHxKxD = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k_BxHxKxD,
                                                        decode_index, axis=2)
        v_BxHxKxD = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v_BxHxKxD,
                                                        decode_index, axis=2)
        cached_k.value, cached_v.value = k_BxHxKxD, v_BxHxKxD

    logits_BxHxQxK = _attention_einsum("bhqd,bhkd->bhqk", q_BxHxQxD, k_BxHxKxD, cfg,
                                       float32_out=True)
    weights = jax.nn.softmax(logits_BxHxQxK + bias, axis=-1)
    weights = dropout(weights, deterministic=deterministic)
    out_BxHxQxD = _attention_einsum("bhqk,bhkd->bhqd", weights, v_BxHxKxD, cfg)
    out_BxQxHxD = constrain(out_BxHxQxD.transpose(0, 2, 1, 3), ("batch", "length", "heads", "kv"))
    out = out_BxQxHxD.reshape(out_BxQxHxD.shape[:2] + (inner,))
    return proj(d, ("joined_kv", "embed"), inner ** -0.5, name="out")(out)


class MLP(nn.Module):
  """T5 feed-forward: `wi` (ReLU) for T5 1.0, gated `wi_0 * wi_1` for T5 1.1."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    cfg = self.config
    acts = cfg.mlp_activations
    hidden = None
    for i, act in enumerate(acts):
      name = "wi" if len(acts) == 1 else f"wi_{i}"
      y = _activation(act)(Dense(cfg.d_ff, ("embed", "mlp"), cfg.d_model ** -0.5, cfg,
                                 name=name)(x))
      hidden = y if hidden is None else hidden * y
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    return Dense(cfg.d_model, ("mlp", "embed"), cfg.d_ff ** -0.5, cfg, name="wo")(hidden)
