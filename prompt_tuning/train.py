"""Entry point: `python -m prompt_tuning.train --gin_file=... --gin.MODEL_DIR="'...'"`.

T5X-style flags (see gin_utils); the run's configuration is gin-bound `runs.train`. Rerunning
the same command resumes MODEL_DIR's run; SIGTERM and Ctrl-C save the current step first
(Ctrl-C then exits with status 130).
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
  train = gin.configurable(runs.train, module="prompt_tuning.runs")
  args = flags.parse_args(argv, "Prompt-tune (or model-tune) a frozen T5 with gin configs.")
  run_config = gin_utils.run_config(args.parsed)  # recorded with the run's settings
  result = flags.call_configured(lambda: train(run_config=run_config))
  print(json.dumps({k: v for k, v in result.items() if k not in ("eval", "initial_eval")},
                   default=float))
  return result


if __name__ == "__main__":
  flags.run_main(main)
