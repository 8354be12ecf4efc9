#!/usr/bin/env bash
# GPU check for benchmarks/README.md: T5 1.1 Base prompt tuning on one GPU, in under 4 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Runs benchmarks/train_step.py (random Base weights, P=100, batch 32, 512 input + 32 target
# tokens) in bf16 (prompt step, teacher-forced forward, greedy decoding of 32 tokens) and in f32
# (prompt step), then prints tokens/s and model-FLOPs utilisation (analytic model FLOPs, as
# XLA:GPU's cost_analysis leaves out library GEMMs; nominal peak PEAK_TFLOPS, default 989 =
# H100/H200 SXM dense bf16). Needs python3 with jax[cuda], flax and optax (no gin, seqio or torch). Writes the JSON
# lines to $OUT (or /tmp) as gpu_check.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEAK=${PEAK_TFLOPS:-989}
LOG=${OUT:-/tmp}/gpu_check.jsonl
: > "$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false

$PY -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

SHAPES=${SHAPES:-"--size base --batch 32 --inputs 512 --targets 32 --prompt 100 --decode 32 --steps 10"}
run() {  # $1: dtype, $2: measurements; keeps going if one run fails or times out
  echo "== $1: $2" >&2
  timeout 110 $PY benchmarks/train_step.py $SHAPES --dtype "$1" --only "$2" \
      --peak_tflops "$PEAK" | tail -n 1 | tee -a "$LOG"
}
run bf16 prompt,eval,greedy
run f32 prompt

$PY - "$LOG" "$PEAK" <<'EOF'
import json, sys
peak = float(sys.argv[2])
for line in open(sys.argv[1]):
  if not line.startswith("{"):
    continue
  r = json.loads(line)
  parts = [f"{r['dtype']} on {r['device']}:",
           f"prompt step {r['prompt_step_ms']:.1f} ms",
           f"{r['tokens_per_s']:.0f} tokens/s",
           f"{r['model_gflops_per_s'] / 1e3:.1f} model TFLOP/s",
           f"MFU {100 * r['model_gflops_per_s'] / 1e3 / peak:.1f}% of {peak:g} TFLOP/s",
           f"({100 * r['utilisation_of_matmul_peak']:.1f}% of the measured "
           f"{r['matmul_peak_gflops'] / 1e3:.0f} TFLOP/s matmul)",
           f"compile {r['compile_s']:.1f} s"]
  if r.get("eval_fwd_ms"):
    parts.append(f"forward {r['eval_fwd_ms']:.1f} ms")
  if r.get("greedy32_ms"):
    parts.append(f"greedy 32 tokens {r['greedy32_ms']:.1f} ms")
  print("  ".join(parts))
EOF
