r"""Entry point: many prompts on one frozen model (a prompt bank).

  python -m prompt_tuning.multi_infer --gin_file=models/X.gin \
      --gin_file=runs/prompt_ensemble_eval.gin --gin.PROMPT_FILES="['a.npy', 'b.npy']" ...
  python -m prompt_tuning.multi_infer --gin_file=models/X.gin \
      --gin_file=runs/prompt_bank_infer.gin --gin.TASKS="['t1', 't2']" ...

The run file's MULTI_PROMPT_MODE picks what runs: 'ensemble' (`runs.evaluate_ensemble`:
N prompts of one task and their majority vote) or 'mixed' (`runs.infer_mixed`: one
prompt per task, tasks mixed in each batch, JSONL predictions). Prints the results as JSON.
"""
import json
import sys

import gin

from prompt_tuning.cli import flags
from prompt_tuning import runs

MODES = {"ensemble": runs.evaluate_ensemble, "mixed": runs.infer_mixed}


def main(argv=None) -> dict:
  runs.configure_logging()
  argv = sys.argv[1:] if argv is None else argv
  fns = {mode: gin.configurable(fn, module="prompt_tuning.runs")
         for mode, fn in MODES.items()}
  flags.parse_args(argv, "Evaluate a prompt ensemble, or serve several tasks' prompts in "
                             "mixed batches, on one frozen model.")
  try:
    mode = gin.query_parameter("%MULTI_PROMPT_MODE")
  except ValueError:
    raise ValueError("MULTI_PROMPT_MODE is not set: include runs/prompt_ensemble_eval.gin or "
                     "runs/prompt_bank_infer.gin") from None
  if mode not in fns:
    raise ValueError(f"MULTI_PROMPT_MODE = {mode!r}; choose one of {sorted(fns)}")
  result = flags.call_configured(fns[mode])
  print(json.dumps(result, default=float))
  return result


if __name__ == "__main__":
  flags.run_main(main)
