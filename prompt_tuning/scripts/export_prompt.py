"""Exports a run's prompt as `.npy` and as an HF PEFT prompt-tuning adapter.

  python -m prompt_tuning.scripts.export_prompt --model_dir /tmp/prompt_rte \
      --output_dir /tmp/prompt_rte/export [--step 30000] [--base_model_name_or_path google/t5-base-lm-adapt]

Writes OUTPUT_DIR/prompt.npy (float32 [P, d_model]) and OUTPUT_DIR/peft_adapter/
(adapter_config.json + adapter_model.safetensors), loadable with
`peft.PeftModel.from_pretrained(T5ForConditionalGeneration..., OUTPUT_DIR/peft_adapter)`.
Both folders may be local paths or gs:// URLs (on gs:// the adapter folder also holds a
`commit_success.txt` marker, written last).
"""
from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import storage


def find_prompt(model_dir: epath.Path, step: int | None) -> tuple[epath.Path, int]:
  """The `.npy` prompt the trainer exported at `step` (default: the latest complete export)."""
  root = model_dir / "numpy_checkpoints"
  steps = sorted(int(p.name.split("_")[1]) for p in root.glob("checkpoint_*")
                 if storage.is_complete(p) and (p / "encoder.prompt.prompt.npy").exists())
  if not steps:
    raise ValueError(f"No exported prompt under {root}: is {model_dir} a prompt-tuning MODEL_DIR "
                     "with at least one checkpoint?")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"No prompt for step {step} under {root}; available: {steps}")
  return root / f"checkpoint_{step}" / "encoder.prompt.prompt.npy", step


def read_metadata(model_dir: epath.Path, step: int) -> dict:
  path = model_dir / "checkpoints" / str(step) / "metadata" / "metadata"
  return json.loads(path.read_text()) if path.exists() else {}


def export(model_dir, output_dir, *, step: int | None = None,
           base_model_name_or_path: str | None = None) -> dict:
  model_dir = storage.check_run_folder(model_dir, "--model_dir", write=False)
  output_dir = storage.check_run_folder(output_dir, "--output_dir")
  path, step = find_prompt(model_dir, step)
  prompt = prompt_io.load_prompt(path)
  meta = read_metadata(model_dir, step)
  config = meta.get("model_config") or {}
  if not config:
    raise ValueError(f"Checkpoint {step} in {model_dir} has no model_config metadata; cannot "
                     "describe the base model for PEFT")
  npy = prompt_io.save_prompt_npy(output_dir / "prompt.npy", prompt)
  base = base_model_name_or_path or meta.get("initial_checkpoint_path") or "unknown"
  adapter = prompt_io.export_peft_adapter(
      output_dir / "peft_adapter", prompt, base_model_name_or_path=str(base),
      num_layers=int(config["num_encoder_layers"]), num_attention_heads=int(config["num_heads"]),
      token_dim=int(config["d_model"]), overwrite=True)
  return {"step": step, "shape": list(prompt.shape), "npy": str(npy), "peft_adapter": str(adapter),
          "base_model_name_or_path": str(base)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--base_model_name_or_path", default=None,
                      help="Recorded in adapter_config.json (default: INITIAL_CHECKPOINT_PATH)")
  args = parser.parse_args(argv)
  try:
    out = export(args.model_dir, args.output_dir, step=args.step,
                 base_model_name_or_path=args.base_model_name_or_path)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
