"""Shared by the benchmarks: shapes, the random batch, timing, peak memory and the JSON line.

Both `train_step.py` (ours) and `peft_baseline.py` (HF PEFT) build the same batch from the same
seed, so their numbers compare like for like. Neither needs the other's framework.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Callable

import numpy as np

# T5 1.1 Small: the shape the issue asks for (8+8 layers, 6 heads, gated-GELU, untied logits).
SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8)
# Compiles in seconds: for CI (`--quick --tiny`), not for numbers.
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2)
BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12)
SIZES = {"small": SMALL, "tiny": TINY, "base": BASE}

KEYS = ("prompt_step_ms", "full_ft_step_ms", "eval_fwd_ms", "greedy32_ms", "compile_s",
        "flops_prompt_step", "flops_full_step", "gflops_per_s", "peak_rss_mb")


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--inputs", type=int, default=128, help="encoder input tokens (prompt excluded)")
  p.add_argument("--targets", type=int, default=32)
  p.add_argument("--prompt", type=int, default=100, help="prompt length P")
  p.add_argument("--decode", type=int, default=32, help="new tokens for the greedy figure")
  p.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--tiny", action="store_true", help="the tiny config (same as --size tiny)")
  p.add_argument("--steps", type=int, default=5, help="timed repetitions of each measurement")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="CI mode: 2 timed steps, 1 warm-up")
  p.add_argument("--json", action="store_true", help="print only the JSON line")
  p.add_argument("--only", default="prompt,eval,greedy,full",
                 help="comma-separated subset of prompt,eval,greedy,full (others are null)")
  return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  args = p.parse_args(argv)
  if args.tiny:
    args.size = "tiny"
  if args.quick:
    args.steps, args.warmup = 2, 1
  args.only = set(args.only.split(","))
  unknown = args.only - {"prompt", "eval", "greedy", "full"}
  if unknown:
    p.error(f"--only: unknown measurements {sorted(unknown)}")
  return args


def forward_flops(size: dict, args) -> float:
  """Analytic matmul FLOPs of one teacher-forced forward pass (T5 1.1: gated MLP, untied logits).

  A prompt-only train step costs about twice this (the backward computes activation gradients
  only, no weight gradients): `2 * forward_flops` is the model-FLOPs count for MFU. XLA:GPU's
  cost_analysis leaves out library GEMMs, so MFU on GPUs must not use it.
  """
  b, s, t = args.batch, args.inputs + args.prompt, args.targets
  d, inner, ff = size["d_model"], size["num_heads"] * size["d_kv"], size["d_ff"]
  mlp = 3 * d * ff
  enc = b * s * (4 * d * inner + mlp) + b * 2 * s * s * inner
  dec = b * t * (2 * d * inner + 2 * d * inner + mlp) + b * s * 2 * d * inner
  dec += b * (2 * t * t + 2 * t * s) * inner
  return 2.0 * (size["num_layers"] * (enc + dec) + b * t * d * size["vocab_size"])


def random_batch(args, vocab_size: int) -> dict[str, np.ndarray]:
  """Full-length inputs and targets (no padding) ending in EOS, like a packed-free T5 batch."""
  rng = np.random.RandomState(0)
  enc = rng.randint(2, vocab_size, size=(args.batch, args.inputs)).astype(np.int32)
  tgt = rng.randint(2, vocab_size, size=(args.batch, args.targets)).astype(np.int32)
  enc[:, -1] = 1
  tgt[:, -1] = 1
  dec_in = np.concatenate([np.zeros((args.batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt}


def median_ms(fn: Callable[[], object], *, steps: int, warmup: int,
              sync: Callable[[object], object] = lambda x: x) -> float:
  """Median wall time of `sync(fn())` in milliseconds, after `warmup` untimed calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def peak_rss_mb() -> float:
  # ru_maxrss is KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(args, msg: str) -> None:
  if not args.json:
    print(msg, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
  """The last line printed: one JSON object (the external harness parses it)."""
  print(json.dumps(result, sort_keys=False), flush=True)
