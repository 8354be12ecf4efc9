"""Entry point: `python -m prompt_tuning.eval --gin_file=runs/prompt_eval.gin ...`.

Evaluates MODEL_DIR's latest checkpoint or a prompt file; prints the metrics as JSON. The task,
TASK_FEATURE_LENGTHS, PROMPT_LENGTH, PROMPT_COMBINE and INITIAL_CHECKPOINT_PATH default to those
of the run in MODEL_DIR.
"""
import json
import sys

import gin

from prompt_tuning.cli import flags
from prompt_tuning.cli import gin_utils
from prompt_tuning import runs


def main(argv=None) -> dict:
  runs.configure_logging()
  argv = sys.argv[1:] if argv is None else argv
  evaluate = gin.configurable(runs.evaluate, module="prompt_tuning.runs")
  # Settings not given (task, lengths, prompt, frozen model) come from MODEL_DIR's run.
  remembered = lambda: runs.remembered_settings(
      gin_utils.bound_value("prompt_tuning.runs.evaluate", "model_dir"))
  flags.parse_args(argv, "Evaluate a prompt on a SeqIO task or mixture.", remembered=remembered)
  result = flags.call_configured(evaluate)
  print(json.dumps(result, default=float))
  return result


if __name__ == "__main__":
  flags.run_main(main)
