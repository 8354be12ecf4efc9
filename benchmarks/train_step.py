"""Speed of prompt tuning T5 1.1 Small on this machine: train step, forward, greedy decoding.

  python benchmarks/train_step.py --batch 8 --inputs 128 --targets 32 --prompt 100 --dtype f32 --json
  python benchmarks/train_step.py --batch 8 --inputs 128 --targets 32 --prompt 100 --dtype bf16 --json

Random weights, dropout 0, full-length rows (no padding). The last line printed is one JSON object
(keys in `common.KEYS`); `benchmarks/peft_baseline.py` prints the same keys for HF PEFT, and
`benchmarks/compare.py` runs both and prints the ratios. `--quick --tiny` is the CI smoke run.

`--dtype bf16` is the fast path (`T5Config.matmul_dtype="bfloat16"`): frozen weights stored in
bfloat16, every matmul takes bfloat16 inputs and accumulates in float32, forward and backward;
the prompt, the residual stream, norms, softmax and the loss stay float32.
"""
from __future__ import annotations

import functools
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from prompt_tuning.inference import decoding
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as train_lib  # noqa: E402
from prompt_tuning.model.config import T5Config  # noqa: E402
from prompt_tuning.model.t5 import T5  # noqa: E402
from prompt_tuning.training.objective import EncoderDecoderModel  # noqa: E402
from prompt_tuning.model.prompt import PromptConfig  # noqa: E402


def build_config(args) -> T5Config:
  s = common.SIZES[args.size]
  cfg = T5Config(vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"],
                 d_ff=s["d_ff"], num_heads=s["num_heads"], num_encoder_layers=s["num_layers"],
                 num_decoder_layers=s["num_layers"], mlp_activations=("gelu", "linear"),
                 tie_word_embeddings=False, dropout_rate=0.0)
  if args.dtype == "bf16":
    cfg = cfg.replace(matmul_dtype="bfloat16")
  return cfg


def compile_timed(jitted, *example_args):
  """`(compiled, seconds to lower and compile)`."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*example_args).compile()
  return compiled, time.perf_counter() - t0


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def matmul_peak_gflops(dtype: str, n: int) -> float:
  """This machine's rate on an n x n x n matmul: float32, or bf16 inputs with f32 accumulation."""
  low = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(low)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  ms = common.median_ms(lambda: dot(a, a), steps=5, warmup=2, sync=jax.block_until_ready)
  return 2 * n ** 3 / (ms / 1e3) / 1e9


def main(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="nominal peak for MFU (default: the matmul rate measured here)")
  args = common.parse(p, argv)
  cfg = build_config(args)
  module = T5(cfg, prompt=PromptConfig(length=args.prompt))
  model = EncoderDecoderModel(module)
  batch = {k: jnp.asarray(v) for k, v in common.random_batch(args, cfg.vocab_size).items()}
  rng = jax.random.PRNGKey(0)
  sync = jax.block_until_ready
  timing = dict(steps=args.steps, warmup=args.warmup, sync=sync)
  common.log(args, f"config {args.size} dtype {args.dtype} devices {jax.devices()}")

  init_tokens = jnp.ones((1, 4), jnp.int32)
  params = jax.jit(lambda r: nn.meta.unbox(module.init(r, init_tokens, init_tokens)["params"]))(
      jax.random.PRNGKey(1))
  trainable, frozen = optimizers.split_params(params)
  frozen_dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  frozen = optimizers.cast_floats(frozen, frozen_dtype)
  result = dict.fromkeys(common.KEYS)

  # Prompt tuning: gradients of the prompt only, Adafactor as in the paper. Always compiled: its
  # FLOPs and compile time are reported even when it is not timed.
  tx = optimizers.prompt_tuning_optimizer(0.3)
  state = train_lib.create_train_state(trainable, tx)
  step, compile_s = compile_timed(train_lib.jit_train_step(model, tx), state, frozen, batch, rng)
  flops_prompt = flops_of(step)
  result.update(compile_s=round(compile_s, 2), flops_prompt_step=flops_prompt)
  common.log(args, f"prompt step compiled in {compile_s:.1f}s, {flops_prompt / 1e9:.1f} GFLOP")
  holder = [state]

  if "prompt" in args.only:
    def prompt_step():
      holder[0], metrics = step(holder[0], frozen, batch, rng)
      return metrics["loss"]
    prompt_ms = common.median_ms(prompt_step, **timing)
    common.log(args, f"prompt step {prompt_ms:.0f} ms")
    tokens = args.batch * (args.inputs + args.prompt + args.targets)
    result.update(prompt_step_ms=round(prompt_ms, 2),
                  gflops_per_s=round(flops_prompt / (prompt_ms / 1e3) / 1e9, 1),
                  tokens_per_s=round(tokens / (prompt_ms / 1e3), 1))

  if "eval" in args.only:  # teacher-forced forward (the eval loss)
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model))
    eval_c, _ = compile_timed(eval_fn, holder[0].params, frozen, batch)
    eval_ms = common.median_ms(lambda: eval_c(holder[0].params, frozen, batch), **timing)
    result["eval_fwd_ms"] = round(eval_ms, 2)
    common.log(args, f"eval forward {eval_ms:.0f} ms")

  if "greedy" in args.only:
    # Cached greedy decoding of exactly `--decode` tokens: eos_id=-1 is never produced, so no
    # row stops early (the loop would otherwise exit once every row has emitted EOS).
    full_params = optimizers.merge_params(holder[0].params, frozen)
    enc = batch["encoder_input_tokens"]
    greedy = lambda: decoding.greedy(module, full_params, enc, max_decode_length=args.decode,
                                     eos_id=-1)
    greedy_ms = common.median_ms(greedy, **timing)
    result["greedy32_ms"] = round(greedy_ms, 2)
    common.log(args, f"greedy {args.decode} tokens {greedy_ms:.0f} ms")
    del full_params

  if "full" in args.only:
    # Full fine-tuning of the same shapes: every parameter trainable (float32 master weights).
    all_params = optimizers.merge_params(holder[0].params,
                                         optimizers.cast_floats(frozen, jnp.float32))
    ft_tx = optimizers.model_tuning_optimizer(1e-3)
    ft_trainable, ft_frozen = optimizers.split_params(all_params, optimizers.ALL_PATTERNS)
    ft_state = train_lib.create_train_state(ft_trainable, ft_tx)
    del holder[:], all_params
    ft_step, ft_compile_s = compile_timed(train_lib.jit_train_step(model, ft_tx), ft_state,
                                          ft_frozen, batch, rng)
    flops_full = flops_of(ft_step)
    ft_holder = [ft_state]

    def full_step():
      ft_holder[0], metrics = ft_step(ft_holder[0], ft_frozen, batch, rng)
      return metrics["loss"]
    full_ms = common.median_ms(full_step, **timing)
    result.update(full_ft_step_ms=round(full_ms, 2), flops_full_step=flops_full,
                  flops_ratio_prompt_full=round(flops_prompt / max(flops_full, 1.0), 3))
    common.log(args, f"full fine-tuning step {full_ms:.0f} ms, compiled in {ft_compile_s:.1f}s")

  # The machine's matmul rate in the same process, so utilisation is measured, not assumed.
  # Utilisation uses the analytic model FLOPs (XLA:GPU's cost_analysis leaves out GEMMs).
  on_cpu = jax.default_backend() == "cpu"
  peak = matmul_peak_gflops(args.dtype, 2048 if on_cpu else 8192)
  model_flops = 2 * common.forward_flops(common.SIZES[args.size], args)
  result.update(matmul_peak_gflops=round(peak, 1), model_flops_prompt_step=model_flops)
  if result["prompt_step_ms"]:
    model_gflops = model_flops / (result["prompt_step_ms"] / 1e3) / 1e9
    result["model_gflops_per_s"] = round(model_gflops, 1)
    result["utilisation_of_matmul_peak"] = round(model_gflops / peak, 3)
    if args.peak_tflops:
      result["mfu"] = round(model_gflops / (args.peak_tflops * 1e3), 4)
  result.update(
      peak_rss_mb=round(common.peak_rss_mb(), 1), framework=f"jax {jax.__version__}",
      dtype=args.dtype, size=args.size, batch=args.batch, inputs=args.inputs,
      targets=args.targets, prompt=args.prompt, decode_tokens=args.decode, steps=args.steps,
      backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))
  common.emit(result)
  return result


if __name__ == "__main__":
  main()
