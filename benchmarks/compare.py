"""One run of ours and HF PEFT, f32 and bf16, same shapes: the ratios the issue's targets use.

  python benchmarks/compare.py            # about 4 minutes on an idle 2-core machine

Runs `peft_baseline.py` and `train_step.py` one after the other (never at once: they would share
the cores), PEFT then ours for each dtype so that each pair sees the same machine load. Prints a
table of the ratios (ours / PEFT, lower is better) against the targets and, last, one JSON object
holding every run. Extra arguments go to both scripts (e.g. `--steps 7`).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = ["--batch", "8", "--inputs", "128", "--targets", "32", "--prompt", "100", "--json"]


def run(script: str, dtype: str, extra: list[str]) -> dict:
  cmd = [sys.executable, str(HERE / script), *SHAPES, "--dtype", dtype, *extra]
  print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  extra = sys.argv[1:]
  runs = {}
  for dtype in ("f32", "bf16"):
    runs[f"peft_{dtype}"] = run("peft_baseline.py", dtype, extra)
    runs[f"ours_{dtype}"] = run("train_step.py", dtype, extra)

  def ratio(ours, peft, key):
    return runs[ours][key] / runs[peft][key]
  peft_fastest = min(runs["peft_f32"]["prompt_step_ms"], runs["peft_bf16"]["prompt_step_ms"])
  ours_fastest = min(runs["ours_f32"]["prompt_step_ms"], runs["ours_bf16"]["prompt_step_ms"])
  f32 = runs["ours_f32"]
  rows = [
      ("f32 prompt step / PEFT f32", ratio("ours_f32", "peft_f32", "prompt_step_ms"), 0.90),
      ("fastest prompt step / PEFT fastest", ours_fastest / peft_fastest, 0.75),
      ("f32 eval forward / PEFT f32", ratio("ours_f32", "peft_f32", "eval_fwd_ms"), 0.70),
      ("bf16 eval forward / PEFT bf16", ratio("ours_bf16", "peft_bf16", "eval_fwd_ms"), 0.70),
      ("f32 greedy 32 / PEFT f32 generate", ratio("ours_f32", "peft_f32", "greedy32_ms"), 0.33),
      ("bf16 greedy 32 / PEFT bf16 generate", ratio("ours_bf16", "peft_bf16", "greedy32_ms"),
       0.33),
      ("FLOPs prompt step / full step", f32["flops_prompt_step"] / f32["flops_full_step"], 0.70),
  ]
  print(f"{'':40s} {'ratio':>7s} {'target':>7s}")
  for name, value, target in rows:
    print(f"{name:40s} {value:7.2f} {'<=':>3s}{target:4.2f}  {'met' if value <= target else 'MISSED'}")
  util = f32["gflops_per_s"] / f32["matmul_peak_gflops"]
  print(f"{'f32 step GFLOP/s / f32 matmul GFLOP/s':40s} {util:7.2f} {'>=':>3s}0.70  "
        f"{'met' if util >= 0.70 else 'MISSED'}  ({f32['gflops_per_s']:.0f} of "
        f"{f32['matmul_peak_gflops']:.0f} GFLOP/s)")
  print(f"{'':40s} {'ours':>9s} {'PEFT':>9s}   (ms)")
  for dtype in ("f32", "bf16"):
    for key in ("prompt_step_ms", "full_ft_step_ms", "eval_fwd_ms", "greedy32_ms"):
      print(f"{dtype + ' ' + key:40s} {runs['ours_' + dtype][key]:9.1f} "
            f"{runs['peft_' + dtype][key]:9.1f}")
  print(json.dumps(runs))


if __name__ == "__main__":
  main()
