"""GPU check: prompt-tuning train step and cached greedy decoding of T5 1.1 Base shapes.

  python benchmarks/gpu_check.py        # on a GPU machine; GPU_CHECK_TINY=1 for a CPU dry run

Variants: float32; bfloat16 activations with bfloat16 frozen weights; float32 activations with
bfloat16-input / float32-accumulate matmuls (T5Config.matmul_dtype). Prints one JSON line each and
a summary. Peak numbers are the H100 SXM dense TF32 / BF16 figures.
"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, flax, flax.linen as nn
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from prompt_tuning import T5, T5Config, PromptConfig
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as train_lib
from prompt_tuning.inference import decoding
from prompt_tuning.training.objective import EncoderDecoderModel

print("devices", jax.devices(), "jax", jax.__version__, "flax", flax.__version__, flush=True)
import os
TINY = bool(os.environ.get("GPU_CHECK_TINY"))  # a CPU dry run of this script
B, L, T, P = (2, 16, 4, 3) if TINY else (32, 512, 32, 100)
PEAK = {"float32": 494e12, "bfloat16": 989e12}  # H100 SXM dense: TF32, BF16
base = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12,
                num_encoder_layers=12, num_decoder_layers=12)
if TINY:
  base = base.replace(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_heads=2,
                      num_encoder_layers=1, num_decoder_layers=1)


def analytic_step_flops(c, B, L, T, P):
  """Matmul FLOPs of a prompt-only step: forward + activation-gradient backward (2x forward);
  XLA:GPU's cost_analysis undercounts library GEMMs, so MFU uses this count."""
  S, inner = L + P, c.num_heads * c.d_kv
  mlp = len(c.mlp_activations) * c.d_model * c.d_ff + c.d_ff * c.d_model
  enc = B * S * c.num_encoder_layers * (4 * c.d_model * inner + mlp)
  enc += c.num_encoder_layers * B * 2 * S * S * inner
  dec = B * T * c.num_decoder_layers * (6 * c.d_model * inner + mlp)
  dec += c.num_decoder_layers * (B * S * 2 * c.d_model * inner + B * (2 * T * T + 2 * T * S) * inner)
  dec += B * T * c.d_model * c.vocab_size
  return 2 * 2 * (enc + dec)


rs = np.random.RandomState(0)
enc = rs.randint(2, 32000, (B, L)).astype(np.int32); enc[:, -1] = 1
tgt = rs.randint(2, 32000, (B, T)).astype(np.int32); tgt[:, -1] = 1
dec = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], 1)
batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(dec),
         "decoder_target_tokens": jnp.asarray(tgt)}
rng = jax.random.PRNGKey(0)
out = {}
params = None
VARIANTS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
            "f32_bf16_matmul": ("float32", "bfloat16")}
for name, (dtype, matmul_dtype) in VARIANTS.items():
  cfg = base.replace(dtype=dtype, matmul_dtype=matmul_dtype)
  module = T5(cfg, prompt=PromptConfig(length=P))
  if params is None:
    params = nn.meta.unbox(jax.jit(module.init)(rng, enc[:1], dec[:1])["params"])
  trainable, frozen = optimizers.split_params(params, optimizers.PROMPT_PATTERNS)
  if "bfloat16" in (dtype, matmul_dtype):
    frozen = optimizers.cast_floats(frozen, jnp.bfloat16)
  model = EncoderDecoderModel(module)
  tx = optimizers.prompt_tuning_optimizer()
  fn = lambda s, f, b, r: train_lib.train_step(s, f, b, r, model=model, tx=tx)
  state = train_lib.create_train_state(jax.tree_util.tree_map(jnp.array, trainable), tx)
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, frozen, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis(); cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])
  losses = []
  for _ in range(3):
    state, m = compiled(state, frozen, batch, rng); losses.append(float(m["loss"]))
  n = 2 if TINY else 20
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = compiled(state, frozen, batch, rng)
  jax.block_until_ready(state); jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / n
  losses.append(float(m["loss"]))
  full = optimizers.merge_params(state.params, frozen)
  greedy = jax.jit(lambda p, e: decoding.greedy(module, p, e, max_decode_length=32))
  toks, _ = greedy(full, batch["encoder_input_tokens"]); jax.block_until_ready(toks)
  t0 = time.perf_counter()
  for _ in range(5):
    toks, sc = greedy(full, batch["encoder_input_tokens"])
  jax.block_until_ready(toks)
  g = (time.perf_counter() - t0) / 5
  peak = PEAK["bfloat16" if "bfloat16" in (dtype, matmul_dtype) else "float32"]
  out[name] = {"step_ms": dt * 1e3, "compile_s": compile_s, "tokens_per_s": B * (L + T) / dt,
                "cost_analysis_tflops_per_s": flops / dt / 1e12, "model_tflops_per_s": analytic_step_flops(cfg, B, L, T, P) / dt / 1e12,
                "mfu": analytic_step_flops(cfg, B, L, T, P) / dt / peak,
                "flops_step": flops, "loss_first": losses[0], "loss_last": losses[-1],
                "greedy32_ms": g * 1e3, "finite": bool(np.isfinite(losses).all())}
  print(name, json.dumps(out[name]), flush=True)
rel = abs(out["bfloat16"]["loss_first"] - out["float32"]["loss_first"]) / out["float32"]["loss_first"]
out["bf16_vs_f32_first_loss_rel_diff"] = rel
print(json.dumps(out))
