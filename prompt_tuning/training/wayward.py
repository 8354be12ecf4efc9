"""Wayward prompts (Khashabi et al., 2022, "Prompt Waywardness"): a regulariser that keeps the
soft prompt close to the embeddings of a given discrete text.

The training objective becomes

    task loss + weight * (1/P) * sum_i ||prompt_i - E[text_i]||^2

where `E[text_i]` is the frozen model's embedding of the text's i-th token (the task's inputs
vocabulary, no EOS) and P the prompt length, which equals the text's length in tokens. This is
the distance the authors' code and the original implementation (`extended/train/wayward.py`,
`gamma = 0.01`) compute: the squared Euclidean distance per position, averaged over positions
(`losses.squared_l2_distance`).

The term is a function of the prompt alone (the embedding table is frozen and held fixed with
`stop_gradient`), so gradients are still taken with respect to the prompt only. The train step
adds it once per step, outside the microbatch accumulation of the task loss
(`train_lib.train_step`), and logs `wayward_distance` and `objective` next to the task `loss`.
The paper's finding: a prompt can solve a task while its nearest vocabulary tokens
(`scripts/nearest_tokens.py`) spell an arbitrary text.

Gin: `prompts/wayward.gin` (WAYWARD_TEXT, WAYWARD_WEIGHT) sets PROMPT_LENGTH from the text and
passes a `WaywardRegularizer` to the model through `runs.train.model_kwargs`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from prompt_tuning.prompts import initializers
from prompt_tuning.training import losses

# The original implementation's default weight (its `gamma`).
DEFAULT_WEIGHT = 0.01


def tokenize(text: str, *, task: str | None = None, module=None,
             initial_checkpoint_path: str | None = None, vocabulary=None) -> tuple[int, ...]:
  """The token ids of `text` in `vocabulary`, else in the task's `inputs` vocabulary (no EOS).

  The task's vocabulary is settled the way a run settles it (`dataset.prepare_vocabularies`:
  the checkpoint folder's `spiece.model` where it has one), so the ids are the ones the frozen
  model's embedding table is indexed by.
  """
  if not isinstance(text, str) or not text:
    raise ValueError(f"WAYWARD_TEXT must be a non-empty string, got {text!r}: pass e.g. "
                     "--gin.WAYWARD_TEXT=\"'Classify the sentiment'\"")
  if vocabulary is None:
    if not task:
      raise ValueError("The wayward text needs a vocabulary: pass one, or the task "
                       "(MIXTURE_OR_TASK_NAME) whose inputs vocabulary to use")
    from prompt_tuning.data import dataset
    dataset.prepare_vocabularies(task, module, initial_checkpoint_path=initial_checkpoint_path)
    found = dataset.get_mixture_or_task(task, module)
    vocabulary = getattr(found, "tasks", [found])[0].output_features["inputs"].vocabulary
  ids = tuple(int(i) for i in vocabulary.encode(text))
  if not ids:
    raise ValueError(f"WAYWARD_TEXT {text!r} tokenises to no tokens")
  return ids


def length(token_ids: Sequence[int]) -> int:
  """The prompt length the regulariser needs: one position per token (gin: PROMPT_LENGTH)."""
  return len(token_ids)


@dataclasses.dataclass(frozen=True)
class WaywardRegularizer:
  """`weight * squared_l2_distance(prompt, embedding[token_ids])`, the model's `regularizer`.

  Called with the full parameter tree; returns `(weighted term, {"wayward_distance": d})`.
  """

  token_ids: tuple[int, ...]
  weight: float = DEFAULT_WEIGHT

  def __post_init__(self):
    object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))
    if not self.token_ids:
      raise ValueError("WaywardRegularizer needs the text's token ids (wayward.tokenize)")
    if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not (
        self.weight >= 0):
      raise ValueError(f"WAYWARD_WEIGHT must be a number >= 0, got {self.weight!r}")

  def target(self, params: Mapping[str, Any]) -> jnp.ndarray:
    """The text's embeddings `[P, D]` (float32) from the frozen embedding table."""
    table_VxD = params["token_embedder"]["embedding"]
    vocab_size = table_VxD.shape[0]
    bad = [i for i in self.token_ids if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"The wayward text has token ids {bad} outside the embedding table of "
                       f"{vocab_size} rows: tokenise it with the model's vocabulary")
    rows = jnp.take(table_VxD, jnp.asarray(self.token_ids, jnp.int32), axis=0)
    return jax.lax.stop_gradient(rows.astype(jnp.float32))

  def __call__(self, params: Mapping[str, Any]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    prompt_PxD = initializers.get_prompt(params)
    if prompt_PxD.ndim != 2:
      raise ValueError(f"Wayward prompts regularise one prompt [P, D]; this model holds "
                       f"{tuple(prompt_PxD.shape)} (a prompt bank)")
    if prompt_PxD.shape[0] != len(self.token_ids):
      raise ValueError(f"The wayward text is {len(self.token_ids)} tokens but the prompt has "
                       f"{prompt_PxD.shape[0]} positions: set PROMPT_LENGTH="
                       f"{len(self.token_ids)} (prompts/wayward.gin does, unless a later flag "
                       "sets it)")
    distance = losses.squared_l2_distance(prompt_PxD.astype(jnp.float32), self.target(params))
    return jnp.float32(self.weight) * distance, {"wayward_distance": distance}
