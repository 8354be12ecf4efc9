"""Regenerates the demo's bundled frozen model (prompt_tuning/demo/frozen_model).

Trains a small byte-level T5 from scratch with this project's own trainer (gin/runs/
demo_pretrain.gin: model tuning on the `demo_pretrain` mixture of tasks/demo.py), then exports
the final weights with `pretrained.save_pretrained`. About 15 minutes on 2 CPU cores.

  python -m prompt_tuning.demo.make_frozen_model [--model_dir /tmp/demo_pretrain] [--steps N]
"""
import argparse
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from prompt_tuning import T5
from prompt_tuning.formats import pretrained
from prompt_tuning import train as train_main
from prompt_tuning.model.config import T5Config
from prompt_tuning.demo import FROZEN_MODEL_DIR


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model_dir", default="/tmp/demo_pretrain")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--out", default=str(FROZEN_MODEL_DIR))
  args = parser.parse_args(argv)
  flags = ["--gin_file=models/demo_byte_t5.gin", "--gin_file=runs/demo_pretrain.gin",
           f"--gin.MODEL_DIR='{args.model_dir}'"]
  if args.steps:
    flags.append(f"--gin.TRAIN_STEPS={args.steps}")
  result = train_main.main(flags)
  export(args.model_dir, result["step"], args.out)


def export(model_dir: str, step: int, out: str) -> None:
  """Writes the model-tuning run's weights at `step` as a standalone frozen checkpoint."""
  manager = ocp.CheckpointManager(f"{model_dir}/checkpoints",
                                  item_names=("params", "metadata"))
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
  manager.close()
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), restored["params"])
  config = T5Config.from_dict(restored["metadata"]["model_config"])
  shutil.rmtree(out, ignore_errors=True)
  pretrained.save_pretrained(out, T5(config), params)
  print(f"Saved the frozen model (step {step}) to {out}")


if __name__ == "__main__":
  main()
