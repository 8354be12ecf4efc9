"""The fast bfloat16 path keeps numerics honest, and the benchmarks cannot rot.

Timings are never asserted (CI machines are shared and noisy); `benchmarks/README.md` holds them.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as train_lib
from prompt_tuning.model import layers
from prompt_tuning.training.objective import EncoderDecoderModel
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = ("prompt_step_ms", "full_ft_step_ms", "eval_fwd_ms", "greedy32_ms", "compile_s",
        "flops_prompt_step", "flops_full_step", "gflops_per_s", "peak_rss_mb")


def _round_bf16(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_mixed_einsum_rounds_inputs_and_accumulates_in_float32_both_ways():
  rng = np.random.RandomState(0)
  x = rng.randn(3, 5, 16).astype(np.float32)
  w = rng.randn(16, 8).astype(np.float32)
  g = rng.randn(3, 5, 8).astype(np.float32)
  out, vjp = jax.vjp(lambda x, w: layers.mixed_einsum("abi,io->abo", x, w, jnp.bfloat16),
                     x, w)
  dx, dw = vjp(jnp.asarray(g))
  assert out.dtype == dx.dtype == dw.dtype == jnp.float32
  xr, wr, gr = _round_bf16(x), _round_bf16(w), _round_bf16(g)
  # float64 references from the rounded inputs: only float32 accumulation error remains.
  np.testing.assert_allclose(out, np.einsum("abi,io->abo", xr, wr, dtype=np.float64), atol=1e-5)
  np.testing.assert_allclose(dx, np.einsum("abo,io->abi", gr, wr, dtype=np.float64), atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("abi,abo->io", xr, gr, dtype=np.float64), atol=1e-5)
  # A bfloat16 input gets a bfloat16 cotangent (the frozen weights' dtype is kept).
  _, vjp16 = jax.vjp(lambda w: layers.mixed_einsum("abi,io->abo", x, w, jnp.bfloat16),
                     w.astype(jnp.bfloat16))
  assert vjp16(jnp.asarray(g))[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="every index"):
    layers._transposed_specs("ij,jk->k")


def _setup(cfg, frozen_dtype, batch_size=8):
  model = EncoderDecoderModel(T5(cfg, prompt=PromptConfig(length=8)))
  rng = np.random.RandomState(0)
  enc = rng.randint(2, cfg.vocab_size, size=(batch_size, 12)).astype(np.int32)
  tgt = rng.randint(2, cfg.vocab_size, size=(batch_size, 6)).astype(np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
           "decoder_input_tokens": np.concatenate([np.zeros((batch_size, 1), np.int32),
                                                   tgt[:, :-1]], 1)}
  params = nn.meta.unbox(jax.jit(model.module.init)(jax.random.PRNGKey(0), enc, tgt)["params"])
  trainable, frozen = optimizers.split_params(params)
  return model, trainable, optimizers.cast_floats(frozen, frozen_dtype), batch


def _bf16_config():
  return tiny_config(d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=128)


def test_bf16_prompt_tuning_losses_track_float32_for_50_steps():
  """50 paper-Adafactor steps in float32 and in the bf16 mode from the same bf16-representable
  frozen weights (as a bf16 checkpoint holds them).

  Along the float32 run's prompts the bf16 loss is within 1e-3 (the forward numerics). The bf16
  run itself follows its own trajectory: Adafactor's first updates are about lr * sign(grad), so
  the ~1% of prompt entries whose gradient sign bf16 rounding flips move differently, and single
  steps differ by up to about 1% (measured); the run's mean and final losses stay within
  1e-2.
  """
  cfg = _bf16_config()
  fast_cfg = cfg.replace(matmul_dtype="bfloat16")
  model, trainable, frozen16, batch = _setup(cfg, jnp.bfloat16, batch_size=32)
  fast_model = EncoderDecoderModel(T5(fast_cfg, prompt=PromptConfig(length=8)))
  frozen32 = optimizers.cast_floats(frozen16, jnp.float32)
  tx = optimizers.prompt_tuning_optimizer(0.3)
  rng = jax.random.PRNGKey(0)
  fast_loss = jax.jit(lambda t: fast_model.loss_fn(optimizers.merge_params(t, frozen16), batch)[0])

  losses = {"f32": [], "bf16": [], "bf16_on_f32_prompts": []}
  for name, m, frozen in (("f32", model, frozen32), ("bf16", fast_model, frozen16)):
    # A fresh copy each run: the jitted step donates (deletes) the state it is given.
    state = train_lib.create_train_state(jax.tree.map(jnp.copy, trainable), tx)
    step = train_lib.jit_train_step(m, tx)
    for _ in range(50):
      if name == "f32":
        losses["bf16_on_f32_prompts"].append(float(fast_loss(state.params)))
      state, metrics = step(state, frozen, batch, rng)
      losses[name].append(float(metrics["loss"]))
    assert state.params["encoder"]["prompt"]["prompt"].dtype == jnp.float32
  f32, bf16, same = (np.array(losses[k]) for k in ("f32", "bf16", "bf16_on_f32_prompts"))
  assert f32[-1] < 0.95 * f32[0]  # the prompt really trains, so the comparison means something
  np.testing.assert_allclose(same, f32, rtol=1e-3)
  rel = np.abs(bf16 - f32) / f32
  print(f"relative loss difference: max {rel.max():.2e}, mean {rel.mean():.2e}; "
        f"loss {f32[0]:.3f} -> {f32[-1]:.3f}")
  assert rel.mean() <= 1e-2
  assert abs(bf16[-10:].mean() - f32[-10:].mean()) <= 1e-2 * f32[-10:].mean()


def _dots(hlo_text):
  """`(lhs rank, lhs dtype, rhs rank, rhs dtype)` of every dot_general in StableHLO text."""
  found = re.findall(r"stablehlo\.dot_general.*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)",
                     hlo_text)
  out = []
  for lhs, rhs in found:
    (*ldims, ldt), (*rdims, rdt) = lhs.split("x"), rhs.split("x")
    out.append((len(ldims), ldt, len(rdims), rdt))
  return out


def test_bf16_train_step_runs_every_weight_matmul_on_bfloat16_inputs():
  """Forward and backward: no float32 weight matmul is left for XLA:CPU to run at the float32
  rate. Attention's two einsums (no weights; batched, rank 4) stay in float32 by design."""
  cfg = _bf16_config().replace(matmul_dtype="bfloat16")
  model, trainable, frozen, batch = _setup(cfg, jnp.bfloat16)
  tx = optimizers.prompt_tuning_optimizer(0.3)
  state = train_lib.create_train_state(trainable, tx)
  text = train_lib.jit_train_step(model, tx).lower(state, frozen, batch,
                                                   jax.random.PRNGKey(0)).as_text()
  dots = _dots(text)
  weight_dots = [d for d in dots if 2 in (d[0], d[2])]  # a `[in, out]` kernel operand
  other = [d for d in dots if d not in weight_dots]
  # Forward: 4 + 6 attention projections and 2-3 MLP kernels per layer, plus the logits;
  # backward: one more per weight (the input cotangent).
  assert len(weight_dots) > 40
  assert {(d[1], d[3]) for d in weight_dots} == {("bf16", "bf16")}
  assert other and all(d[0] == d[2] == 4 and d[1] == d[3] == "f32" for d in other), other
  # The float32 default keeps every dot in float32 (exact).
  model32, trainable32, frozen32, _ = _setup(_bf16_config(), jnp.float32)
  state32 = train_lib.create_train_state(trainable32, tx)
  text32 = train_lib.jit_train_step(model32, tx).lower(state32, frozen32, batch,
                                                       jax.random.PRNGKey(0)).as_text()
  assert {(d[1], d[3]) for d in _dots(text32)} == {("f32", "f32")}


def test_prompt_step_flops_stay_below_full_finetuning_in_bf16():
  cfg = _bf16_config().replace(matmul_dtype="bfloat16")
  model, trainable, frozen, batch = _setup(cfg, jnp.bfloat16)
  rng = jax.random.PRNGKey(0)

  def flops(trainable, frozen, tx):
    state = train_lib.create_train_state(trainable, tx)
    cost = train_lib.jit_train_step(model, tx).lower(state, frozen, batch, rng).compile()
    cost = cost.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  prompt = flops(trainable, frozen, optimizers.prompt_tuning_optimizer(0.3))
  full_trainable, none = optimizers.split_params(
      optimizers.merge_params(trainable, optimizers.cast_floats(frozen, jnp.float32)),
      optimizers.ALL_PATTERNS)
  full = flops(full_trainable, none, optimizers.model_tuning_optimizer())
  assert prompt / full <= 0.75, (prompt, full)


def _run_benchmark(script, *extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device, as a user runs it
  cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--tiny", "--json",
         "--batch", "2", "--inputs", "8", "--targets", "4", "--prompt", "3", "--decode", "4",
         *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_benchmark_quick_mode_prints_the_json_keys(dtype):
  result = _run_benchmark("train_step.py", "--dtype", dtype)
  assert set(KEYS) <= set(result)
  assert result["dtype"] == dtype
  assert all(result[k] > 0 for k in KEYS)
  assert result["flops_prompt_step"] < result["flops_full_step"]


@pytest.mark.slow
def test_peft_baseline_quick_mode_prints_the_json_keys():
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  result = _run_benchmark("peft_baseline.py", "--dtype", "bf16")
  assert set(KEYS) <= set(result)
  assert all(result[k] > 0 for k in ("prompt_step_ms", "eval_fwd_ms", "greedy32_ms"))
