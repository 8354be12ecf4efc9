"""The runs behind `python -m prompt_tuning.{train,eval,infer,multi_infer}`: setup, the training
loop, evaluation and inference over saved checkpoints, and prompt-bank runs.

Gin run files configure these names: `runs.train` with `runs.CheckpointConfig` and
`runs.EvalConfig`, `runs.evaluate`, `runs.infer`, `runs.PartitionConfig`, `runs.PromptInit`,
`runs.evaluate_ensemble` and `runs.infer_mixed`.
"""
from prompt_tuning.runs.ensembles import evaluate_ensemble, infer_mixed
from prompt_tuning.runs.eval_infer import evaluate, infer
from prompt_tuning.runs.guards import Interrupted, NonFiniteLossError
from prompt_tuning.runs.loop import CheckpointConfig, EvalConfig, train
from prompt_tuning.runs.run_log import configure_logging
from prompt_tuning.runs.settings import remembered_settings
from prompt_tuning.runs.setup import PartitionConfig, PromptInit

__all__ = ["CheckpointConfig", "EvalConfig", "Interrupted", "NonFiniteLossError",
           "PartitionConfig", "PromptInit", "configure_logging", "evaluate", "evaluate_ensemble",
           "infer", "infer_mixed", "remembered_settings", "train"]
