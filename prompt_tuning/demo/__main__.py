"""`make demo`: prompt-tune the bundled frozen model on the held-out task, end to end.

Runs the same commands a user runs at scale (echoed before each runs):
  1. python -m prompt_tuning.train   (evaluates the fresh prompt first, trains, evaluates again)
  2. python -m prompt_tuning.scripts.export_prompt   (.npy + HF PEFT adapter)
then checks that the frozen weights the run trained against are byte-identical to the bundled
checkpoint, and prints one JSON line: task, metric, before, after, parameter counts, time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

from prompt_tuning.demo import FROZEN_MODEL_DIR

TASK = "demo_taskless_last"
METRIC = "exact_match"


def _quote(arg: str) -> str:
  """Shell quoting that keeps gin flags readable: --gin.X="'value'"."""
  if "'" in arg and '"' not in arg and "$" not in arg and "`" not in arg:
    return f'"{arg}"'
  return shlex.quote(arg)


def _run(cmd: list[str]) -> str:
  print("+ " + " ".join(_quote(c) for c in cmd), flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log")):
      print("  " + line, end="", flush=True)
  if proc.wait() != 0:
    raise SystemExit(f"demo step failed (exit {proc.returncode}): {cmd[2]}")
  return "".join(lines)


def _eval_metric(model_dir: pathlib.Path) -> tuple[float, float]:
  rows = [json.loads(l) for l in (model_dir / "metrics_eval.jsonl").read_text().splitlines()]
  key = f"{TASK}/{METRIC}"
  rows = [r for r in rows if key in r]
  return rows[0][key], rows[-1][key]


def _check_frozen_unchanged(model_dir: pathlib.Path, step: int) -> int:
  """The frozen weights saved with the final checkpoint equal the bundled ones, byte for byte."""
  import orbax.checkpoint as ocp
  from prompt_tuning.formats import pretrained
  _, bundled = pretrained.load_pretrained(str(FROZEN_MODEL_DIR))
  manager = ocp.CheckpointManager((model_dir / "checkpoints").absolute(),
                                  item_names=("frozen",))
  saved = manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.StandardRestore()))
  manager.close()
  import flax
  a = flax.traverse_util.flatten_dict(bundled, sep="/")
  b = flax.traverse_util.flatten_dict(saved["frozen"], sep="/")
  if set(a) != set(b):
    raise SystemExit(f"frozen parameter sets differ: {sorted(set(a) ^ set(b))[:5]}")
  changed = [k for k in a if np.asarray(a[k]).tobytes() != np.asarray(b[k]).tobytes()]
  if changed:
    raise SystemExit(f"frozen parameters changed during prompt tuning: {changed[:5]}")
  return len(a)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", default="runs/demo")
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)
  if not (FROZEN_MODEL_DIR / "t5_config.json").exists():
    raise SystemExit(f"The bundled frozen model is missing at {FROZEN_MODEL_DIR}; regenerate it "
                     "with `python -m prompt_tuning.demo.make_frozen_model`.")
  model_dir = pathlib.Path(args.model_dir).absolute()
  if model_dir.exists():  # a fresh run every time, so before/after are this run's
    import shutil
    shutil.rmtree(model_dir)
  start = time.time()
  py = sys.executable
  train_out = _run([
      py, "-m", "prompt_tuning.train",
      "--gin_file=models/from_checkpoint.gin",
      "--gin_file=runs/prompt_finetune.gin",
      "--gin_file=prompts/from_sampled_vocab.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{FROZEN_MODEL_DIR}'",
      f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
      "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 40, 'targets': 8}",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={args.steps}",
      f"--gin.EVAL_PERIOD={args.steps}",
      f"--gin.CHECKPOINT_PERIOD={args.steps}",
      "--gin.BATCH_SIZE=32",
      "--gin.EVAL_BATCH_SIZE=64",
      "--gin.EVAL_MAX_EXAMPLES=256",
      "--gin.PROMPT_LENGTH=20",
      "--gin.DROPOUT_RATE=0.0",
      "--gin.runs.EvalConfig.at_start=True",
      "--gin.runs.CheckpointConfig.save_frozen=True",
      "--gin.runs.train.log_period=25",
  ])
  result = json.loads(train_out.strip().splitlines()[-1])
  _run([py, "-m", "prompt_tuning.scripts.export_prompt", f"--model_dir={model_dir}",
        f"--output_dir={model_dir / 'export'}"])
  n_frozen = _check_frozen_unchanged(model_dir, result["step"])
  print(f"  frozen parameters unchanged: {n_frozen} arrays byte-identical to the bundled model")
  print(f"  TensorBoard: tensorboard --logdir {model_dir}")
  before, after = _eval_metric(model_dir)
  summary = {"task": TASK, "metric": METRIC, "before": round(before, 4),
             "after": round(after, 4), "trainable_params": result["trainable_params"],
             "frozen_params": result["frozen_params"], "steps": result["step"],
             "seconds": round(time.time() - start, 1), "model_dir": str(model_dir)}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
