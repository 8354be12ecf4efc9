"""SPoT (Vu et al., 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer"):
prompt-based task embeddings, and ranking source tasks for a target by their similarity.

SPoT's transfer recipe: train a prompt on a source task or mixture, then train the target task's
prompt starting from it (`runs/spot_finetune.gin`, loaded after `runs/prompt_finetune.gin`: the
initial prompt is SOURCE_PROMPT, a prompt file or the source run's folder, `latest_prompt`).
The rest of this module is the paper's retrieval step: a task's embedding is its trained prompt,
and the source tasks most likely to transfer to a target are those whose prompts are most similar
to a prompt trained on the target. The paper's two measures:

- `average_tokens` ("cosine similarity of average tokens"): the cosine of the two prompts'
  mean token vectors, `cos(mean_i s_i, mean_j t_j)`;
- `per_token` ("per-token average cosine similarity"): the mean cosine over every pair of
  tokens, `1/(P Q) sum_i sum_j cos(s_i, t_j)`.

Prompts are only comparable when trained for the same frozen model (same d_model); they may
differ in length. `scripts/rank_source_prompts.py` is the command line.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping, Sequence

import numpy as np

from prompt_tuning.formats import prompt_io

METHODS = ("average_tokens", "per_token")
# A zero vector has no direction: the epsilon makes its cosine 0 instead of NaN.
_EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _check(prompt_PxD, name: str) -> np.ndarray:
  prompt = np.asarray(prompt_PxD, np.float64)
  if prompt.ndim != 2 or not prompt.size:
    raise ValueError(f"{name}: expected a prompt [P, d_model], got shape {prompt.shape}")
  return prompt


def task_embedding(prompt_PxD, method: str = "average_tokens") -> np.ndarray:
  """A task's embedding: its prompt's mean token `[D]` (average_tokens), or its tokens `[P, D]`
  (per_token, compared pair by pair)."""
  prompt = _check(prompt_PxD, "task_embedding")
  if method == "average_tokens":
    return prompt.mean(axis=0)
  if method == "per_token":
    return prompt
  raise ValueError(f"Unknown task-embedding method {method!r}; choose one of {METHODS}")


def similarity(source_PxD, target_QxD, method: str = "average_tokens") -> float:
  """SPoT's similarity of two task prompts (see the module docstring), in [-1, 1]."""
  source = _check(source_PxD, "source prompt")
  target = _check(target_QxD, "target prompt")
  if source.shape[1] != target.shape[1]:
    raise ValueError(f"The prompts have d_model {source.shape[1]} and {target.shape[1]}: task "
                     "embeddings are only comparable between prompts of the same frozen model")
  a, b = task_embedding(source, method), task_embedding(target, method)
  if method == "average_tokens":
    return float(_unit(a) @ _unit(b))
  return float((_unit(a) @ _unit(b).T).mean())


def rank(target_QxD, library: Mapping[str, np.ndarray],
         method: str = "average_tokens") -> list[tuple[str, float]]:
  """`(name, similarity)` of every library prompt to the target, most similar first.

  Ties keep the library's order.
  """
  if not library:
    raise ValueError("The library of source prompts is empty")
  scores = [(name, similarity(prompt, target_QxD, method)) for name, prompt in library.items()]
  return sorted(scores, key=lambda item: -item[1])


# ----- finding prompts on disk -----

_STEP = re.compile(r"^checkpoint_(\d+)$")
EXPORT_NAME = "encoder.prompt.prompt.npy"


def prompt_file(path: str | os.PathLike) -> pathlib.Path:
  """A prompt file, or a run's MODEL_DIR resolved to its latest exported prompt.

  A MODEL_DIR holds `numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.npy`; anything
  else is returned as it is, for `prompt_io.load_prompt` (.npy, numpy export, PEFT folder).
  """
  path = pathlib.Path(path)
  exports = path / "numpy_checkpoints"
  if path.is_dir() and exports.is_dir():
    steps = sorted((int(m.group(1)), p) for p in exports.iterdir()
                   if (m := _STEP.match(p.name)) and (p / EXPORT_NAME).is_file())
    if not steps:
      raise ValueError(f"{path} is a run folder without exported prompts "
                       f"({exports}/checkpoint_<step>/{EXPORT_NAME})")
    return steps[-1][1] / EXPORT_NAME
  return path


def latest_prompt(path: str | os.PathLike) -> str:
  """`prompt_file` as a string, for gin (runs/spot_finetune.gin's SOURCE_PROMPT)."""
  return str(prompt_file(path))


def source_paths(sources: Sequence[str]) -> dict[str, pathlib.Path]:
  """Prompt files by name from `NAME=PATH` or `PATH` entries (the name is then the file's stem
  or the run folder's name); each PATH resolved by `prompt_file`."""
  paths: dict[str, pathlib.Path] = {}
  for entry in sources:
    name, sep, path = entry.partition("=")
    if not sep:
      path = entry
      name = pathlib.Path(entry).name if pathlib.Path(entry).is_dir() else pathlib.Path(entry).stem
    if not name or not path:
      raise ValueError(f"Source {entry!r}: expected NAME=PATH or PATH")
    if name in paths:
      raise ValueError(f"Two sources are named {name!r}: name them with NAME=PATH")
    paths[name] = prompt_file(path)
  return paths


def load_library(sources: Sequence[str]) -> dict[str, np.ndarray]:
  """Prompts by name (see `source_paths` for the entries)."""
  return {name: prompt_io.load_prompt(path) for name, path in source_paths(sources).items()}
