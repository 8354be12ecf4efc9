"""Entry point: `python -m prompt_tuning.eval --gin_file=runs/prompt_eval.gin ...`.

Evaluates MODEL_DIR's latest checkpoint or a prompt file; prints the metrics as JSON.
"""
import json
import sys

import gin

from prompt_tuning import gin_utils
from prompt_tuning import trainer


def main(argv=None) -> dict:
  trainer.configure_logging()
  argv = sys.argv[1:] if argv is None else argv
  evaluate = gin.configurable(trainer.evaluate, module="prompt_tuning.trainer")
  gin_utils.parse_args(argv, "Evaluate a prompt on a SeqIO task or mixture.")
  result = gin_utils.call_configured(evaluate)
  print(json.dumps(result, default=float))
  return result


if __name__ == "__main__":
  gin_utils.run_main(main)
