"""The memory-plan table of benchmarks/README.md: T5 1.1 Small..XXL, prompt tuning on 16 devices.

  python benchmarks/memory_table.py            # about 3 minutes on 2 CPU cores

Runs `prompt_tuning.scripts.memory_plan` in-process (one jax with 16 simulated devices) for every
size and option set below, and prints a markdown table of per-device GiB.
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=16").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from prompt_tuning.scripts import memory_plan  # noqa: E402

SHAPES = ["--batch", "32", "--inputs", "512", "--targets", "8", "--prompt", "100", "--json"]
# Small has 6 heads: its model-parallel size must divide 6.
MESH = {"small": "data=8,model=2"}
SIZES = ("small", "base", "large", "xl", "xxl")
OPTIONS = {
    "f32": [],
    "bf16 weights + activations": ["--frozen_dtype", "bfloat16", "--dtype", "bfloat16"],
    "scan + remat full, f32": ["--scan", "--remat", "full"],
    "scan + remat full, bf16 weights, bf16 matmuls": [
        "--scan", "--remat", "full", "--frozen_dtype", "bfloat16", "--matmul_dtype", "bfloat16"],
}
GIB = 1024 ** 3


def main():
  rows = []
  for size in SIZES:
    for name, opts in OPTIONS.items():
      r = memory_plan.plan(memory_plan._parser().parse_args(
          [f"--gin_file=models/t5_1_1_{size}.gin", "--mesh", MESH.get(size, "data=4,model=4"),
           *SHAPES, *opts]))
      b = r["per_device_bytes"]
      mesh = "{data}x{model}".format(**r["mesh"])
      rows.append((f"{size} ({mesh})", name, b["parameters"] / GIB, b["temporaries"] / GIB,
                   b["cpu_weight_copies"] / GIB, b["total_on_accelerators"] / GIB,
                   "yes" if r["fits"] else "no", r["compile_s"]))
      print(rows[-1], file=sys.stderr, flush=True)
  print("| size | options | parameters | temporaries (CPU) | of which CPU weight copies | "
        "total | fits 16 GiB | compile s |")
  print("|---|---|---:|---:|---:|---:|---|---:|")
  for size, name, p, t, c, total, fits, cs in rows:
    print(f"| {size} | {name} | {p:.2f} | {t:.2f} | {c:.2f} | {total:.2f} | {fits} | {cs:.1f} |")


if __name__ == "__main__":
  main()
