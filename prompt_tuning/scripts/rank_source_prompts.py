r"""Ranks source tasks for a target task by the similarity of their prompts (SPoT retrieval).

  python -m prompt_tuning.scripts.rank_source_prompts --target TARGET \
      --source NAME=PATH [--source NAME=PATH ...] [--method average_tokens|per_token|both] \
      [--json ranking.json]

TARGET and each PATH are prompt files (.npy, the original's numpy exports, PEFT adapter folders)
or run folders (MODEL_DIR: its latest `numpy_checkpoints/checkpoint_<step>` prompt). All must be
prompts of the same frozen model. Prints, for each method, the sources from most to least
similar; `--json` also writes `{"target": ..., "rankings": {method: [{"source", "path",
"similarity", "rank"}, ...]}}`. The methods are SPoT's (Vu et al., 2022): `average_tokens`, the
cosine of the prompts' mean tokens, and `per_token`, the mean cosine over all token pairs
(`prompt_tuning/prompts/spot.py`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

from prompt_tuning.formats import prompt_io
from prompt_tuning.prompts import spot


def rankings(target: str, sources: Sequence[str], methods: Sequence[str]) -> dict:
  """`{"target": path, "rankings": {method: [{rank, source, path, similarity}, ...]}}`."""
  paths = spot.source_paths(sources)
  library = {name: prompt_io.load_prompt(path) for name, path in paths.items()}
  target_path = spot.prompt_file(target)
  target_prompt = prompt_io.load_prompt(target_path)
  out = {"target": str(target_path), "rankings": {}}
  for method in methods:
    out["rankings"][method] = [
        {"rank": i + 1, "source": name, "path": str(paths[name]), "similarity": score}
        for i, (name, score) in enumerate(spot.rank(target_prompt, library, method))]
  return out


def format_ranking(method: str, rows: Sequence[dict]) -> str:
  width = max(len(r["source"]) for r in rows)
  lines = [f"{method}:"]
  lines += [f"  {r['rank']:>3}  {r['source']:<{width}}  {r['similarity']:+.4f}" for r in rows]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", required=True, help="the target task's prompt or run folder")
  parser.add_argument("--source", action="append", required=True,
                      help="a source task's prompt or run folder, NAME=PATH or PATH (repeat)")
  parser.add_argument("--method", choices=spot.METHODS + ("both",), default="both")
  parser.add_argument("--json", default=None, help="also write the rankings here")
  args = parser.parse_args(argv)
  methods = spot.METHODS if args.method == "both" else (args.method,)
  try:
    out = rankings(args.target, args.source, methods)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"target {out['target']}: {len(args.source)} source prompts")
  for method, rows in out["rankings"].items():
    print(format_ranking(method, rows))
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
  return out


if __name__ == "__main__":
  main()
