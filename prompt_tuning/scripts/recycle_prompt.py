r"""Recycles a prompt trained on one frozen model for another (Lester et al., 2022).

  python -m prompt_tuning.scripts.recycle_prompt \
      --source_checkpoint SRC --target_checkpoint TGT --prompt PROMPT --output OUT.npy \
      [--recycler v2v-lin|v2v-nn|lin-comb] [--num_words 4000] [--word_offset 1000] \
      [--source_gin models/t5_1_1_lm100k_base.gin] [--target_gin ...]

SRC and TGT are frozen checkpoints (HF folder, this project's export, or T5X/orbax with a gin
model file) that share a vocabulary; PROMPT is a prompt file (.npy, the original's numpy export,
a PEFT adapter folder) trained on SRC. The recycler is learned from both models' embeddings of
vocabulary rows `[word_offset, word_offset + num_words)` (the original's defaults; a byte
vocabulary needs e.g. `--word_offset 3 --num_words 256`) and applied to the prompt; OUT is a
float32 `.npy` `[P, d_model of TGT]`. Prints the map's relative fit error on those rows. Evaluate
OUT with `prompt_tuning.eval`, runs/prompt_eval.gin and prompts/from_file.gin (PROMPT_FILE=OUT),
or recycle and evaluate in one command with runs/recycled_prompt_eval.gin.
The v2v-nn settings default to the original's: --hidden_scale 4 --learning_rate 3e-4
--batch_size 50 --epochs 25.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from prompt_tuning.prompts import recycling


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source_checkpoint", required=True, help="the model the prompt fits")
  parser.add_argument("--target_checkpoint", required=True, help="the model to recycle it to")
  parser.add_argument("--prompt", required=True, help="the prompt file trained on the source")
  parser.add_argument("--output", required=True, help="where to write the recycled .npy")
  parser.add_argument("--recycler", choices=recycling.RECYCLERS, default="v2v-lin")
  parser.add_argument("--num_words", type=int, default=recycling.DEFAULT_NUM_WORDS)
  parser.add_argument("--word_offset", type=int, default=recycling.DEFAULT_WORD_OFFSET)
  parser.add_argument("--source_gin", default=None, help="model gin file for a T5X source")
  parser.add_argument("--target_gin", default=None, help="model gin file for a T5X target")
  nn_group = parser.add_argument_group("v2v-nn")
  nn_group.add_argument("--hidden_scale", type=int, default=4)
  nn_group.add_argument("--learning_rate", type=float, default=3e-4)
  nn_group.add_argument("--batch_size", type=int, default=50)
  nn_group.add_argument("--epochs", type=int, default=25)
  nn_group.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  options = ({"hidden_scale": args.hidden_scale, "learning_rate": args.learning_rate,
              "batch_size": args.batch_size, "epochs": args.epochs, "seed": args.seed}
             if args.recycler == "v2v-nn" else {})
  try:
    from prompt_tuning.cli import gin_utils  # gin is parsed here, at the edge
    configs = [gin_utils.config_from_gin(g) if g else None
               for g in (args.source_gin, args.target_gin)]
    result = recycling.recycle_file(
        source_checkpoint=args.source_checkpoint, target_checkpoint=args.target_checkpoint,
        prompt=args.prompt, output=args.output, recycler=args.recycler,
        num_words=args.num_words, word_offset=args.word_offset, source_config=configs[0],
        target_config=configs[1], **options)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{args.recycler}: learned on {args.num_words} vocabulary rows from {args.word_offset}; "
        f"relative fit error {result['fit_error']:.3e}; wrote {result['output']} "
        f"{tuple(result['shape'])}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
