"""Exports each task's effective multi-task prompt (shared combined with task) as `.npy`.

  python -m prompt_tuning.scripts.export_task_prompts --model_dir /tmp/multitask_demo \
      --task_combine concat --output_dir /tmp/multitask_demo/task_prompts \
      [--step 300] [--shared_prompt shared.npy] [--task_names copy,first,last,upper]

Reads the run's numpy export (numpy_checkpoints/checkpoint_<step>/encoder.prompt.*.npy) and
writes OUTPUT_DIR/task_<t>.npy (or <name>.npy), float32 [P_eff, d_model], the prompt task t's
examples saw (`prompts.task_prompts`: the model's own combination), each usable as a plain
single-task prompt (e.g. PROMPT_FILE) on inputs without the task sentinel. A run whose shared
prompt was frozen did not export it: pass the file it was initialised from as --shared_prompt.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np

from prompt_tuning.formats import prompt_io
from prompt_tuning.model import prompt as prompts
from prompt_tuning.formats import storage

TASK_PARAMS = {"concat": ("task_prompts",), "add": ("task_prompts",),
               "project": ("task_kernel", "task_bias")}


def export(model_dir, output_dir, *, task_combine: str, step: int | None = None,
           shared_prompt=None, task_names=None) -> dict:
  if task_combine not in TASK_PARAMS:
    raise ValueError(f"--task_combine={task_combine!r}; choose one of {tuple(TASK_PARAMS)} "
                     "(the run's PromptConfig.task_combine)")
  model_dir = storage.check_run_folder(model_dir, "--model_dir", write=False)
  output_dir = storage.check_run_folder(output_dir, "--output_dir")
  root = model_dir / "numpy_checkpoints"
  names = TASK_PARAMS[task_combine]
  steps = sorted(int(p.name.split("_")[1]) for p in root.glob("checkpoint_*")
                 if storage.is_complete(p) and (p / f"encoder.prompt.{names[0]}.npy").exists())
  if not steps:
    raise ValueError(f"No exported task parameters (encoder.prompt.{names[0]}.npy) under {root}: "
                     "is this a multi-task prompt run with a checkpoint, trained with the task "
                     "prompts trainable, and is --task_combine the run's?")
  step = steps[-1] if step is None else step
  folder = root / f"checkpoint_{step}"
  load = lambda p: np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)
  params = {name: load(folder / f"encoder.prompt.{name}.npy") for name in names}
  shared_file = folder / "encoder.prompt.prompt.npy"
  if shared_prompt is not None:
    shared = prompt_io.load_prompt(shared_prompt)
  elif shared_file.exists():
    shared = load(shared_file)
  else:
    raise ValueError(f"{folder} has no shared prompt (it was frozen in this run): pass the file "
                     "it was initialised from as --shared_prompt")
  every = np.asarray(prompts.task_prompts(shared, params, task_combine), np.float32)
  if task_names is None:
    task_names = [f"task_{t}" for t in range(every.shape[0])]
  if len(task_names) != every.shape[0]:
    raise ValueError(f"--task_names has {len(task_names)} names for {every.shape[0]} tasks")
  written = {}
  for name, prompt_PxD in zip(task_names, every):
    buffer = io.BytesIO()
    np.save(buffer, prompt_PxD)
    written[name] = str(storage.atomic_write(output_dir / f"{name}.npy", buffer.getvalue()))
  return {"step": step, "shape": list(every.shape[1:]), "files": written}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--task_combine", required=True, choices=tuple(TASK_PARAMS))
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--shared_prompt", default=None)
  parser.add_argument("--task_names", default=None, help="comma-separated, in task-index order")
  args = parser.parse_args(argv)
  try:
    out = export(args.model_dir, args.output_dir, task_combine=args.task_combine,
                 step=args.step, shared_prompt=args.shared_prompt,
                 task_names=None if args.task_names is None else args.task_names.split(","))
  except ValueError as e:
    sys.exit(f"export_task_prompts: {e}")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
