"""T5 encoder-decoder in Flax linen with T5X parameter paths and logical axis names.

One module covers T5 1.0 (ReLU MLP, tied embeddings, logits scaled by d_model**-0.5), T5 1.1 /
LM-adapted / Flan-T5 (gated-GELU, untied logits), mT5 and ByT5. Parameter paths follow T5X
(`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`, ...), so T5X checkpoints
load by name; every parameter and activation carries T5X logical axis names, so the same module
runs on one CPU or sharded over a mesh.

An optional `PromptConfig` adds the trainable prompt at `encoder/prompt/prompt`, inserted into
the embedded encoder input before dropout (with `per_layer` set, also a prompt per later
encoder layer, injected at the prompt positions of that layer's input). Everything else is the
frozen model. Multi-task prompts (`num_tasks`) read each example's task from its first input
token, which the encoder drops.

Speed and scale options (all in `T5Config`, all off by default so float32 stays exact):
`matmul_dtype="bfloat16"` rounds every weight matmul's inputs to bfloat16 and accumulates in
float32, in the forward and the backward pass (`mixed_einsum`); `scan_layers` stacks each
stack's layers under one `layers` parameter with a leading `layers` axis (see
`scan_conversion.py` for the T5X per-layer layout); `remat_policy` rematerialises each layer
in the backward pass. For decoding, `T5.cross_attention_kv` computes every layer's
encoder-decoder keys and values once per sequence instead of once per generated token.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.model import masks
from prompt_tuning.model import prompt as prompts_lib
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


def _split_heads(x_BxLxHD: Array, num_heads: int) -> Array:
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

    q_BxHxQxD = _split_heads(q_BxQxHD, h)
    if kv is None:
      k_BxHxKxD, v_BxHxKxD = _split_heads(k_BxKxHD, h), _split_heads(v_BxKxHD, h)
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


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
    y = Attention(cfg, name="attention")(y, y, bias, deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    y = MLP(cfg, name="mlp")(y, deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
               deterministic: bool = True, decode: bool = False,
               decode_index: Array | None = None,
               cross_kv: tuple[Array, Array] | None = None) -> Array:
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
    y = Attention(cfg, name="self_attention")(y, y, self_bias, decode=decode,
                                              decode_index=decode_index,
                                              deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
    y = Attention(cfg, name="encoder_decoder_attention")(y, encoded, cross_bias,
                                                         deterministic=deterministic, kv=cross_kv)
    x = x + drop(y, deterministic=deterministic)
    y = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    y = MLP(cfg, name="mlp")(y, deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    return constrain(x, ("batch", "length", "embed"))


def _remat(layer_cls, policy: str, static_argnums: tuple[int, ...]):
  if policy == "none":
    return layer_cls
  jax_policy = None if policy == "full" else jax.checkpoint_policies.checkpoint_dots
  return nn.remat(layer_cls, policy=jax_policy, static_argnums=static_argnums)


def _scan_layers(body: Callable, length: int, in_axes) -> Callable:
  """`nn.scan` of `body(layer, carry, *xs) -> (carry, None)` over stacked layer parameters.

  Parameters get a leading `layers` axis (logical name "layers"); decoding caches are stacked on
  axis 1 so that their batch axis stays leading, as `decoding` expects of every cache leaf.
  """
  return nn.scan(body, variable_axes={"params": 0, "cache": 1},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: Embed
  prompt: prompts_lib.PromptConfig | None = None

  @nn.compact
  def __call__(self, tokens_BxL: Array, prompt_index_B: Array | None = None, *,
               enable_dropout: bool = False) -> Array:
    cfg = self.config
    deterministic = not enable_dropout
    task_index_B = None
    if self.prompt is not None and self.prompt.reads_task_token:
      task_index_B, tokens_BxL = prompts_lib.split_task_token(tokens_BxL, self.prompt)
    x = self.shared_embedding(tokens_BxL)
    valid = masks.token_mask(tokens_BxL)
    input_valid = valid
    layer_prompts = None  # per-layer prompts of layers 1.. ([layers - 1, P, D])
    if self.prompt is not None:
      prompt = prompts_lib.Prompt(self.prompt, cfg.d_model, num_layers=cfg.num_encoder_layers,
                                  name="prompt")
      x, valid = prompt(x, valid, prompt_index_B, task_index_B)
      if self.prompt.per_layer != "none":
        layer_prompts = prompt.layer_prompts()
    x = constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    length = x.shape[1]
    bias = RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")(length, length)
    bias = bias + masks.mask_to_bias(masks.fully_visible_mask(valid, valid))
    layer = _remat(EncoderLayer, cfg.remat_policy, static_argnums=(3,))

    def inject(x, layer_prompt_PxD):
      return prompts_lib.inject_layer_prompt(x, layer_prompt_PxD, input_valid,
                                             self.prompt.combine, self.prompt.per_layer)
    if cfg.scan_layers:
      if layer_prompts is None:
        body = lambda mdl, x, bias: (mdl(x, bias, deterministic), None)
        x, _ = _scan_layers(body, cfg.num_encoder_layers, nn.broadcast)(
            layer(cfg, name="layers"), x, bias)
      else:
        # Layer 0's input already holds the input prompt: a zero row and a False flag for it.
        stacked = jnp.concatenate([jnp.zeros_like(layer_prompts[:1]), layer_prompts], axis=0)
        flags = jnp.arange(cfg.num_encoder_layers) > 0

        def body(mdl, x, bias, layer_prompt_PxD, flag):
          x = jnp.where(flag, inject(x, layer_prompt_PxD), x)
          return mdl(x, bias, deterministic), None
        x, _ = _scan_layers(body, cfg.num_encoder_layers, (nn.broadcast, 0, 0))(
            layer(cfg, name="layers"), x, bias, stacked, flags)
    else:
      for i in range(cfg.num_encoder_layers):
        if layer_prompts is not None and i > 0:
          x = inject(x, layer_prompts[i - 1])
        x = layer(cfg, name=f"layers_{i}")(x, bias, deterministic)
    x = RMSNorm(cfg, name="encoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    # Zero the outputs at padding so nothing downstream can depend on what pads computed.
    return x * valid[..., None].astype(x.dtype)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded_BxSxD: Array, encoder_valid_BxS: Array, tokens_BxT: Array, *,
               enable_dropout: bool = False, decode: bool = False,
               cross_kv: dict | None = None) -> Array:
    cfg = self.config
    deterministic = not enable_dropout
    y = self.shared_embedding(tokens_BxT)
    y = constrain(y, ("batch", "length", "embed"))
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
    length = y.shape[1]
    index = None
    if decode and self.has_variable("cache", "position"):
      # One step: attend to the cache positions written so far, this one included.
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      written = self.variable("cache", "written", lambda: None)
      index = position.value
      written.value = written.value.at[index].set(True)
      max_len = written.value.shape[0]
      self_bias = relpos(1, max_len, query_position=index)
      self_bias = self_bias + masks.mask_to_bias(written.value[None, None, None, :])
      position.value = index + 1
    else:
      if decode:  # initialising the cache: its length is this call's length
        self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
        self.variable("cache", "written", jnp.zeros, (length,), bool)
      self_bias = relpos(length, length) + masks.mask_to_bias(masks.causal_mask(length))
    cross_bias = masks.mask_to_bias(masks.key_mask(encoder_valid_BxS))
    layer = _remat(DecoderLayer, cfg.remat_policy, static_argnums=(5, 6))
    if cfg.scan_layers:
      def body(mdl, y, encoded, self_bias, cross_bias, index, kv):
        return mdl(y, encoded, self_bias, cross_bias, deterministic, decode, index, kv), None
      kv = None if cross_kv is None else cross_kv["layers"]
      y, _ = _scan_layers(body, cfg.num_decoder_layers, (nn.broadcast,) * 4 + (0,))(
          layer(cfg, name="layers"), y, encoded_BxSxD, self_bias, cross_bias, index, kv)
    else:
      for i in range(cfg.num_decoder_layers):
        kv = None if cross_kv is None else cross_kv[f"layers_{i}"]
        y = layer(cfg, name=f"layers_{i}")(y, encoded_BxSxD, self_bias, cross_bias,
                                           deterministic, decode, index, kv)
    y = RMSNorm(cfg, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(y) * (cfg.d_model ** -0.5)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.d_model ** -0.5, cfg,
                     name="logits_dense")(y)
    logits = logits.astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
  """Encoder-decoder T5 (optionally with a soft prompt) returning float32 logits `[B, T, V]`."""

  config: T5Config
  prompt: prompts_lib.PromptConfig | None = None

  def setup(self):
    self.token_embedder = Embed(self.config)
    self.encoder = Encoder(self.config, shared_embedding=self.token_embedder, prompt=self.prompt)
    self.decoder = Decoder(self.config, shared_embedding=self.token_embedder)

  def encoder_valid(self, encoder_input_tokens: Array) -> Array:
    """Validity of each encoder output position (prompt + non-pad input)."""
    if self.prompt is None:
      return masks.token_mask(encoder_input_tokens)
    if self.prompt.reads_task_token:  # the task sentinel is not part of the encoded input
      encoder_input_tokens = prompts_lib.split_task_token(encoder_input_tokens, self.prompt)[1]
    valid = masks.token_mask(encoder_input_tokens)
    return prompts_lib.combine_mask(valid, self.prompt.total_length, self.prompt.combine)

  def encode(self, encoder_input_tokens: Array, *, prompt_index: Array | None = None,
             enable_dropout: bool = False) -> Array:
    return self.encoder(encoder_input_tokens, prompt_index, enable_dropout=enable_dropout)

  def cross_attention_kv(self, encoded_BxSxD: Array) -> dict:
    """Each decoder layer's encoder-decoder attention keys and values `[B, H, S, D]`.

    They depend on the encoder output only, so cached decoding computes them once per sequence
    and passes them to every step (`decode(..., cross_kv=...)`) instead of projecting the whole
    encoder output again for each generated token. Keyed like the decoder's layers
    (`layers_{i}`, or `layers` with a leading layer axis when scanned). Held in the activation
    dtype, like the keys and values of the teacher-forced pass (attention runs in that dtype even
    when `matmul_dtype` is set), so decoding sees exactly what the forward pass sees and no step
    converts them again.
    """
    cfg = self.config
    layers = nn.meta.unbox(self.variables["params"]["decoder"])
    dtype = jnp.dtype(cfg.activation_dtype)

    def project(attention):
      return tuple(_split_heads(matmul(encoded_BxSxD, attention[name]["kernel"], cfg),
                                cfg.num_heads).astype(dtype) for name in ("key", "value"))
    if cfg.scan_layers:
      return {"layers": jax.vmap(project)(layers["layers"]["encoder_decoder_attention"])}
    return {f"layers_{i}": project(layers[f"layers_{i}"]["encoder_decoder_attention"])
            for i in range(cfg.num_decoder_layers)}

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             *, enable_dropout: bool = False, decode: bool = False,
             cross_kv: dict | None = None) -> Array:
    return self.decoder(encoded, self.encoder_valid(encoder_input_tokens), decoder_input_tokens,
                        enable_dropout=enable_dropout, decode=decode, cross_kv=cross_kv)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None, *, prompt_index: Array | None = None,
               enable_dropout: bool = False, decode: bool = False,
               encoder_segment_ids: Any = None, decoder_segment_ids: Any = None) -> Array:
    """Teacher-forced logits. `decoder_target_tokens` is accepted for T5X compatibility."""
    del decoder_target_tokens  # causal masking needs only the inputs' shape
    masks.reject_packing(encoder_segment_ids=encoder_segment_ids,
                         decoder_segment_ids=decoder_segment_ids)
    encoded = self.encode(encoder_input_tokens, prompt_index=prompt_index,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       enable_dropout=enable_dropout, decode=decode)
