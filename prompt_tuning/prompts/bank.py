"""Prompt banks: many prompts of one frozen model stacked into one `[N, P, D]` parameter.

The model's `PromptConfig(bank_size=N)` holds the bank; each row of a batch names its prompt with
`prompt_index` (see `prompt_tuning.inference.ensembles` for mixed-task batches and ensembles).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from prompt_tuning.formats import prompt_io
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.model.t5 import T5
from prompt_tuning.prompts import initializers

Params = Any


def build_bank(prompts: Sequence[Any], *,
               expected_shape: Sequence[int] | None = None) -> np.ndarray:
  """Stacks prompts into a float32 bank `[N, P, D]`.

  Each entry is a prompt file in any `prompt_io.load_prompt` format (.npy, extension-less numpy
  export, PEFT adapter folder) or an array. All must share one shape (one frozen model);
  `expected_shape` (P, D) pins it.
  """
  if isinstance(prompts, (str, os.PathLike)):
    raise ValueError(f"build_bank takes a list of prompts, got the single path {prompts!r}; "
                    "write PROMPT_FILES as a list, e.g. ['a.npy', 'b.npy']")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("build_bank needs at least one prompt (PROMPT_FILES is empty)")
  rows, first = [], None
  for i, p in enumerate(prompts):
    if isinstance(p, (str, os.PathLike)):
      row, source = prompt_io.load_prompt(p, expected_shape=expected_shape), p
    else:
      row, source = prompt_io.as_prompt(p, source=f"prompt {i}"), f"prompt {i}"
      if expected_shape is not None:
        prompt_io.check_shape(row, expected_shape, source=source)
    if rows and row.shape != rows[0].shape:
      raise prompt_io.PromptFileError(
          f"{source}: shape {row.shape} differs from {first}'s {rows[0].shape}; the prompts of "
          "a bank must share one length and d_model (one frozen model)")
    first = first or source
    rows.append(row)
  return np.stack(rows)


def bank_model(config: T5Config, num_prompts: int, length: int,
               combine: str = "prefix") -> T5:
  """The frozen model with a bank of `num_prompts` prompts of `length` rows."""
  return T5(config, prompt=PromptConfig(length=length, combine=combine, bank_size=num_prompts))


def with_bank(params: Params, bank_NxPxD) -> Params:
  """A copy of `params` whose prompt (single, bank, or none) is replaced by `bank_NxPxD`."""
  params = dict(params)
  params["encoder"] = {k: v for k, v in params["encoder"].items() if k != "prompt"}
  return initializers.set_prompt(params, np.asarray(bank_NxPxD))


def bank_size(model: T5) -> int:
  if model.prompt is None or model.prompt.bank_size is None:
    raise ValueError("This needs a model with a prompt bank: "
                     "T5(config, prompt=PromptConfig(length=P, bank_size=N)), see bank_model()")
  return model.prompt.bank_size
