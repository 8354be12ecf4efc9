"""Model configuration: one frozen dataclass for every T5-family architecture we load.

T5 1.0, T5 1.1 (incl. LM-adapted and Flan-T5), mT5 and ByT5 differ only in these fields; the
presets below give the published sizes. `from_hf_dict` reads an HF `config.json`, so that
checkpoints without a config can be described the way users already know.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_exact", "silu", "linear")
# How a model runs, not what it is: a checkpoint's weights fit any value of these, so a run may
# choose them for a checkpoint that carries its own architecture (see `with_runtime`).
RUNTIME_FIELDS = ("dtype", "dropout_rate", "remat_policy", "matmul_dtype", "scan_layers")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of an encoder-decoder T5. Defaults are T5 1.1 Small."""

  vocab_size: int = 32128
  d_model: int = 512           # embedding / residual width
  d_kv: int = 64               # per-head query/key/value width
  d_ff: int = 1024             # MLP hidden width
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8  # ByT5 and mT5 XL-style models use a different depth than the encoder
  # ("gelu", "linear") is T5 1.1's gated-GELU (wi_0, wi_1); ("relu",) is T5 1.0's single `wi`.
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  # T5 1.0 ties the output layer to the token embedding and scales logits by d_model**-0.5.
  tie_word_embeddings: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"        # activations (and matmul inputs unless matmul_dtype is set)
  param_dtype: str = "float32"  # storage of newly initialised parameters
  # Rematerialisation of each layer in the backward pass: "none", "full" or "dots".
  remat_policy: str = "none"
  # None: matmuls take `dtype` inputs (exact float32 by default). "bfloat16": every weight
  # matmul rounds its inputs to bfloat16 and accumulates in float32, in the forward and the
  # backward pass, while activations, attention, norms, softmax and the loss stay in `dtype`.
  # With frozen weights stored in bfloat16 this is the fast path on CPU (about 2x the float32
  # matmul rate) and on GPUs.
  matmul_dtype: str | None = None
  # Stack each stack's layers under one `layers` parameter with a leading "layers" axis and run
  # them with `nn.scan`: one layer's program, compiled once (T5X's scanned layout; convert
  # per-layer checkpoints with `prompt_tuning.model.scan_conversion`).
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                 "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
    if isinstance(self.mlp_activations, list):
      object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    unknown = [a for a in self.mlp_activations if a not in _ACTIVATIONS]
    if unknown or not self.mlp_activations:
      raise ValueError(f"T5Config.mlp_activations={self.mlp_activations!r}: each must be one of "
                       f"{_ACTIVATIONS}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.remat_policy not in ("none", "full", "dots"):
      raise ValueError(f"T5Config.remat_policy must be 'none', 'full' or 'dots', "
                       f"got {self.remat_policy!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"T5Config.scan_layers must be True or False, got {self.scan_layers!r}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raise early on a bad dtype name
    if self.matmul_dtype is not None and not jnp.issubdtype(jnp.dtype(self.matmul_dtype),
                                                            jnp.floating):
      raise ValueError(f"T5Config.matmul_dtype must be None or a float dtype such as 'bfloat16', "
                       f"got {self.matmul_dtype!r}")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mlp_activations"] = list(self.mlp_activations)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"Unknown T5Config fields {unknown}; known fields: {sorted(fields)}")
    return cls(**d)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, has_lm_head: bool | None = None) -> "T5Config":
    """Builds a config from an HF `T5Config` dict (the contents of `config.json`).

    `has_lm_head` overrides `tie_word_embeddings`: transformers 5 writes
    `tie_word_embeddings: true` even for untied T5 1.1 checkpoints, so the presence of
    `lm_head.weight` in the weights (or `scale_decoder_outputs`) is the reliable signal.
    """
    ff = d.get("feed_forward_proj", "relu")
    if ff.startswith("gated-"):
      act = ff[len("gated-"):]
      activations = (act, "linear")
    else:
      # HF's plain "gelu" is the exact (erf) GELU; its gated variant uses the tanh approximation.
      activations = ("gelu_exact",) if ff == "gelu" else (ff,)
    tied = d.get("tie_word_embeddings", True)
    if "scale_decoder_outputs" in d:
      tied = bool(d["scale_decoder_outputs"])
    if has_lm_head is not None:
      tied = tied and not has_lm_head
    num_layers = int(d["num_layers"])
    return cls(
        vocab_size=int(d["vocab_size"]),
        d_model=int(d["d_model"]),
        d_kv=int(d["d_kv"]),
        d_ff=int(d["d_ff"]),
        num_heads=int(d["num_heads"]),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(d.get("num_decoder_layers") or num_layers),
        mlp_activations=activations,
        tie_word_embeddings=bool(tied),
        relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
        dropout_rate=float(d.get("dropout_rate", 0.0)),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `T5Config` fields describing this architecture."""
    if len(self.mlp_activations) == 2:
      ff = "gated-" + self.mlp_activations[0]
    else:
      ff = {"gelu_exact": "gelu", "gelu": "gelu_new"}.get(self.mlp_activations[0],
                                                          self.mlp_activations[0])
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": self.vocab_size,
        "d_model": self.d_model,
        "d_kv": self.d_kv,
        "d_ff": self.d_ff,
        "num_layers": self.num_encoder_layers,
        "num_decoder_layers": self.num_decoder_layers,
        "num_heads": self.num_heads,
        "feed_forward_proj": ff,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "tie_word_embeddings": self.tie_word_embeddings,
        "scale_decoder_outputs": self.tie_word_embeddings,
        "dropout_rate": self.dropout_rate,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def check_runtime(overrides: Mapping[str, Any] | None) -> None:
  """Refuses runtime overrides (gin's MODEL_RUNTIME) that are not `RUNTIME_FIELDS` or not valid.

  Anything else would change the architecture under a checkpoint's weights.
  """
  if not overrides:
    return
  bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
  if bad:
    fields = {f.name for f in dataclasses.fields(T5Config)}
    arch = [k for k in bad if k in fields]
    raise ValueError(
        f"MODEL_RUNTIME may set only the runtime fields {list(RUNTIME_FIELDS)}; got {bad}"
        + (f" ({arch} describe the architecture, which comes from the checkpoint or "
           "MODEL_CONFIG)" if arch else ""))
  T5Config().replace(**overrides)  # a bad value (e.g. remat_policy) raises naming the field


def with_runtime(config: T5Config, overrides: Mapping[str, Any] | None) -> T5Config:
  """`config` with the runtime-only fields in `overrides` replaced (see `check_runtime`)."""
  check_runtime(overrides)
  return config.replace(**overrides) if overrides else config


def _t5_1_1(d_model, num_heads, d_ff, num_layers, vocab_size=32128, **kw) -> T5Config:
  return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=64, d_ff=d_ff,
                  num_heads=num_heads, num_encoder_layers=num_layers,
                  num_decoder_layers=kw.pop("num_decoder_layers", num_layers),
                  mlp_activations=("gelu", "linear"), tie_word_embeddings=False, **kw)


def _t5_1_0(d_model, num_heads, d_ff, num_layers) -> T5Config:
  return T5Config(vocab_size=32128, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                  num_heads=num_heads, num_encoder_layers=num_layers,
                  num_decoder_layers=num_layers, mlp_activations=("relu",),
                  tie_word_embeddings=True)


# Published architectures (DESIGN.md). LM-adapted and Flan-T5 share T5 1.1's shapes.
PRESETS: dict[str, T5Config] = {
    "t5_1_1_small": _t5_1_1(512, 6, 1024, 8),
    "t5_1_1_base": _t5_1_1(768, 12, 2048, 12),
    "t5_1_1_large": _t5_1_1(1024, 16, 2816, 24),
    "t5_1_1_xl": _t5_1_1(2048, 32, 5120, 24),
    "t5_1_1_xxl": _t5_1_1(4096, 64, 10240, 24),
    "t5_1_0_small": _t5_1_0(512, 8, 2048, 6),
    "t5_1_0_base": _t5_1_0(768, 12, 3072, 12),
    "t5_1_0_large": _t5_1_0(1024, 16, 4096, 24),
    "mt5_small": _t5_1_1(512, 6, 1024, 8, vocab_size=250112),
    "mt5_base": _t5_1_1(768, 12, 2048, 12, vocab_size=250112),
    "mt5_large": _t5_1_1(1024, 16, 2816, 24, vocab_size=250112),
    "mt5_xl": _t5_1_1(2048, 32, 5120, 24, vocab_size=250112),
    "mt5_xxl": _t5_1_1(4096, 64, 10240, 24, vocab_size=250112),
    # ByT5: byte vocabulary (256 bytes + 3 specials, padded to 384) and a 3x deeper encoder.
    "byt5_small": _t5_1_1(1472, 6, 3584, 12, vocab_size=384, num_decoder_layers=4),
    "byt5_base": _t5_1_1(1536, 12, 3968, 18, vocab_size=384, num_decoder_layers=6),
    "byt5_large": _t5_1_1(1536, 16, 3840, 36, vocab_size=384, num_decoder_layers=12),
    "byt5_xl": _t5_1_1(2560, 32, 6720, 36, vocab_size=384, num_decoder_layers=12),
    "byt5_xxl": _t5_1_1(4672, 64, 12352, 36, vocab_size=384, num_decoder_layers=12),
}
