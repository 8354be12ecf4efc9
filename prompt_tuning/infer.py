"""Entry point: `python -m prompt_tuning.infer --gin_file=runs/prompt_infer.gin ...`.

Writes one JSONL of {inputs, prediction, target} per task to INFER_OUTPUT_DIR. Settings not given
(task, lengths, prompt, frozen model) default to those of the run in MODEL_DIR.
"""
import sys

import gin

from prompt_tuning.cli import flags
from prompt_tuning.cli import gin_utils
from prompt_tuning import runs


def main(argv=None):
  runs.configure_logging()
  argv = sys.argv[1:] if argv is None else argv
  infer = gin.configurable(runs.infer, module="prompt_tuning.runs")
  # Settings not given (task, lengths, prompt, frozen model) come from MODEL_DIR's run.
  remembered = lambda: runs.remembered_settings(
      gin_utils.bound_value("prompt_tuning.runs.infer", "model_dir"))
  flags.parse_args(argv, "Run inference with a prompt on a SeqIO task or mixture.",
                       remembered=remembered)
  paths = flags.call_configured(infer)
  for p in paths:
    print(p)
  return paths


if __name__ == "__main__":
  flags.run_main(main)
