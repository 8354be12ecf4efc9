"""The runs behind `python -m prompt_tuning.{train,eval,infer,multi_infer}`: setup, the training
loop, evaluation and inference over saved checkpoints, and prompt-bank runs.

Gin run files configure these names (`runs.train`, `runs.evaluate`, `runs.infer`,
`runs.PartitionConfig`, `runs.PromptInit`, `runs.evaluate_ensemble`, `runs.infer_mixed`).
"""
from prompt_tuning.runs.trainer import (Interrupted, NonFiniteLossError, PartitionConfig,
                                        PromptInit, configure_logging, evaluate, infer,
                                        remembered_settings, train)
from prompt_tuning.runs.ensembles import evaluate_ensemble, infer_mixed

__all__ = ["Interrupted", "NonFiniteLossError", "PartitionConfig", "PromptInit",
           "configure_logging", "evaluate", "evaluate_ensemble", "infer", "infer_mixed",
           "remembered_settings", "train"]
