r"""Writes a copy of a frozen model whose residual stream is in another orthonormal basis.

  python -m prompt_tuning.scripts.rotate_model --checkpoint SRC --output DST \
      [--kind signed_permutation|orthogonal] [--seed 0] [--model_gin models/....gin]

DST computes what SRC computes, but its embedding table is SRC's times a random orthogonal matrix
M (written to DST/basis.npy), and every weight reading or writing the residual stream is rotated
to match (`recycling.equivalent_params`). It is the known-answer target for prompt recycling: a
prompt recycled from SRC to DST must score exactly what it scores on SRC, and the prompt itself,
unrecycled, must not. `signed_permutation` works for any T5 (norm scales are permuted with the
features); `orthogonal` (a Haar-random rotation) needs norm scales that are equal across features.
DST is saved in this project's format (`pretrained.save_pretrained`).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from prompt_tuning.formats import pretrained
from prompt_tuning.prompts import recycling


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="the frozen model to copy")
  parser.add_argument("--output", required=True, help="the folder to write (must not exist)")
  parser.add_argument("--kind", choices=("signed_permutation", "orthogonal"),
                      default="signed_permutation")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model_gin", default=None, help="gin model file for a T5X checkpoint")
  args = parser.parse_args(argv)
  try:
    model, params = pretrained.load_pretrained(args.checkpoint, config=args.model_gin)
    basis = recycling.random_basis(model.config.d_model, args.kind, args.seed)
    rotated = recycling.equivalent_params(params, basis)
    pretrained.save_pretrained(args.output, model, rotated)
    np.save(f"{args.output}/basis.npy", basis.astype(np.float32))
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  result = {"checkpoint": args.checkpoint, "output": args.output, "kind": args.kind,
            "seed": args.seed, "d_model": model.config.d_model}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
