"""Registers every built-in task and mixture: GLUE, SuperGLUE, QQP<->MRPC transfer, SQuAD/MRQA."""
import tasks.glue
import tasks.glue_transfer
import tasks.qa
import tasks.super_glue

_MODULES = (tasks.glue, tasks.super_glue, tasks.glue_transfer, tasks.qa)
TASK_NAMES = [name for module in _MODULES for name in module.TASK_NAMES]
MIXTURE_NAMES = [name for module in _MODULES for name in module.MIXTURE_NAMES]
