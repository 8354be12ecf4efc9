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
float32, in the forward and the backward pass (`layers.mixed_einsum`); `scan_layers` stacks each
stack's layers under one `layers` parameter with a leading `layers` axis (see
`scan_conversion.py` for the T5X per-layer layout); `remat_policy` rematerialises each layer
in the backward pass. For decoding, `T5.cross_attention_kv` computes every layer's
encoder-decoder keys and values once per sequence instead of once per generated token.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_tuning.model import masks
from prompt_tuning.model import prompt as prompts_lib
from prompt_tuning.model.config import T5Config

from prompt_tuning.model.layers import (MLP, Attention, Dense, Embed, RMSNorm,
                                        RelativePositionBiases, split_heads, matmul)

Array = jax.Array
constrain = nn.with_logical_constraint


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
      return tuple(split_heads(matmul(encoded_BxSxD, attention[name]["kernel"], cfg),
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
