"""Many prompts on one frozen model in one batch: mixed-task batches and prompt ensembles.

One frozen T5 serves many tasks: their prompts are stacked into a bank `[N, P, D]`
(`prompt_tuning.prompts.bank`), and each row of a batch names its prompt with `prompt_index`.
The paper's two uses:
- mixed-task inference (Figure 2): examples of different tasks share a batch, each with its
  task's prompt (`decode_mixed`);
- prompt ensembling (section 6, Table 3): each example appears N times, once per prompt, and the N
  decoded outputs vote (`decode_ensemble`, `majority_vote`). Ties go to the output whose votes
  have the larger summed score, then to the lowest prompt index, so the vote is deterministic.
A row's output depends only on its own input and prompt, so both give exactly what running each
prompt alone gives (tests/inference/test_ensembles.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.inference import decoding
from prompt_tuning.model import partitioning
from prompt_tuning.model.t5 import T5
from prompt_tuning.prompts.bank import bank_size

Params = Any




# ----------------------------------------------------------------------------------------------
# Decoding rows that each name their prompt


def pad_inputs(sequences: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
  """Token-id sequences (each ending in EOS) as a zero-padded int32 `[N, length]` array."""
  length = length or max(len(s) for s in sequences)
  out = np.zeros((len(sequences), length), np.int32)
  for i, s in enumerate(sequences):
    if len(s) > length:
      raise ValueError(f"Input {i} has {len(s)} tokens, more than the input length {length}")
    out[i, :len(s)] = s
  return out


def stack_candidates(tables: Sequence[np.ndarray]) -> np.ndarray:
  """Per-task candidate tables `[C_k, T_k]` as one `[K, C, T]` array for per-row ranking.

  Short tables are padded with copies of their first candidate, never with empty ones: an empty
  (all-padding) candidate would score log-probability 0 and win. A copy ties with its original,
  and argmax takes the first, so the winner is a real candidate.
  """
  tables = [np.asarray(t, np.int32) for t in tables]
  num_c = max(t.shape[0] for t in tables)
  width = max(t.shape[1] for t in tables)
  out = np.zeros((len(tables), num_c, width), np.int32)
  for k, t in enumerate(tables):
    rows = np.where(np.arange(num_c) < t.shape[0], np.arange(num_c), 0)
    out[k, :, :t.shape[1]] = t[rows]
  return out


def decode_rows(model: T5, params: Params, encoder_input_tokens_NxL, prompt_index_N,
                cfg: decoding.DecodingConfig, *, batch_size: int, rng=None,
                candidate_targets_NxCxT=None,
                partitioner: partitioning.Partitioner | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes N rows, row n with bank prompt `prompt_index_N[n]`: `(tokens_NxT, scores_N)`.

  Rows go through `decoding.decode` in batches of `batch_size` (the last padded), so one
  compilation serves every batch. With a `partitioner`, batches are sharded over its mesh
  (every host passes all N rows).
  """
  num_prompts = bank_size(model)
  index = np.asarray(prompt_index_N, np.int32)
  tokens = np.asarray(encoder_input_tokens_NxL, np.int32)
  if index.shape != tokens.shape[:1]:
    raise ValueError(f"prompt_index has shape {index.shape}; expected one index per input row "
                     f"({tokens.shape[0]})")
  if index.size and not (index.min() >= 0 and index.max() < num_prompts):
    # jnp.take would clamp a bad index to the last prompt without a word.
    raise ValueError(f"prompt indices must be in [0, {num_prompts}) for a bank of "
                     f"{num_prompts} prompts; got {sorted(set(index.tolist()))}")
  features = {"encoder_input_tokens": tokens, "prompt_index": index}
  if candidate_targets_NxCxT is not None:
    features["candidate_targets"] = np.asarray(candidate_targets_NxCxT, np.int32)
  out_tokens, out_scores = [], []
  scope = partitioner.activate() if partitioner else contextlib.nullcontext()
  with scope:
    for i, (batch, rows) in enumerate(dataset_lib.batches_of(features, batch_size)):
      if partitioner:
        batch = partitioner.shard_batch(partitioning.host_rows(batch))
      step_rng = None if rng is None else jax.random.fold_in(rng, i)
      tokens_BxT, scores_B = decoding.decode(model, params, batch, cfg, rng=step_rng)
      out_tokens.append(partitioning.to_host(tokens_BxT)[:rows])
      out_scores.append(partitioning.to_host(scores_B)[:rows])
  return np.concatenate(out_tokens), np.concatenate(out_scores)


def decode_mixed(model: T5, params: Params, requests: Sequence[tuple[int, Sequence[int]]],
                 cfg: decoding.DecodingConfig, *, batch_size: int,
                 input_length: int | None = None, rng=None, **kw) -> tuple[np.ndarray, np.ndarray]:
  """Decodes `(prompt index, input token ids)` requests, tasks mixed within each batch.

  Returns `(tokens_NxT, scores_N)` in request order. `kw` goes to `decode_rows`.
  """
  index = np.array([r[0] for r in requests], np.int32)
  tokens = pad_inputs([r[1] for r in requests], input_length)
  return decode_rows(model, params, tokens, index, cfg, batch_size=batch_size, rng=rng, **kw)


# ----------------------------------------------------------------------------------------------
# Ensembles


def output_key(tokens_T, eos_id: int = 1) -> tuple[int, ...]:
  """What a vote compares when no vocabulary is at hand: the tokens before EOS, padding dropped."""
  out = []
  for t in np.asarray(tokens_T).tolist():
    if t == eos_id:
      break
    if t:
      out.append(t)
  return tuple(out)


def majority_vote(keys_BxN: Sequence[Sequence[Hashable]], scores_BxN) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """Per example, the output most prompts produced: `(choice_B, votes_B)`.

  `keys_BxN[b][n]` is prompt n's output on example b (a string, a token tuple, ...). Among
  outputs with equally many votes the larger summed score wins, then the one a lower prompt
  index produced. `choice_B[b]` is the lowest prompt index that produced the winner, `votes_B[b]`
  how many prompts did.
  """
  # NaN would make every comparison false and the winner depend on dict order.
  scores = np.nan_to_num(np.asarray(scores_BxN, np.float64), nan=-np.inf)
  choice, votes = [], []
  for b, keys in enumerate(keys_BxN):
    groups: dict[Hashable, list] = {}
    for n, k in enumerate(keys):
      group = groups.setdefault(k, [n, 0, 0.0])  # first prompt, votes, summed score
      group[1] += 1
      group[2] += scores[b, n]
    first, count, _ = max(groups.values(), key=lambda g: (g[1], g[2], -g[0]))
    choice.append(first)
    votes.append(count)
  return np.asarray(choice, np.int32), np.asarray(votes, np.int32)


@dataclasses.dataclass
class EnsembleOutput:
  """Every prompt's output on every example, and the vote."""

  tokens_BxNxT: np.ndarray
  scores_BxN: np.ndarray
  choice_B: np.ndarray  # a prompt whose output won (the lowest index among them)
  votes_B: np.ndarray   # how many of the N prompts produced the winning output

  @property
  def tokens_BxT(self) -> np.ndarray:
    """The winning output of each example."""
    return self.tokens_BxNxT[np.arange(len(self.choice_B)), self.choice_B]


def decode_ensemble(model: T5, params: Params, encoder_input_tokens_BxL,
                    cfg: decoding.DecodingConfig, *, batch_size: int,
                    key: Callable[[np.ndarray], Hashable] | None = None, rng=None,
                    **kw) -> EnsembleOutput:
  """Decodes each example once per prompt of the bank, in shared batches, and votes.

  Rows are example-major (example b under prompts 0..N-1, then b + 1), so with `batch_size` a
  multiple of N an example's copies share a batch. `key(tokens_T)` is what the vote compares
  (default `output_key`; evaluation passes the decoded string). `kw` goes to `decode_rows`.
  """
  num_prompts = bank_size(model)
  tokens = np.asarray(encoder_input_tokens_BxL, np.int32)
  batch = tokens.shape[0]
  rows = np.repeat(tokens, num_prompts, axis=0)
  index = np.tile(np.arange(num_prompts, dtype=np.int32), batch)
  out, scores = decode_rows(model, params, rows, index, cfg, batch_size=batch_size, rng=rng, **kw)
  tokens_BxNxT = out.reshape(batch, num_prompts, -1)
  scores_BxN = scores.reshape(batch, num_prompts)
  key = key or functools.partial(output_key, eos_id=cfg.eos_id)
  keys = [[key(tokens_BxNxT[b, n]) for n in range(num_prompts)] for b in range(batch)]
  choice, votes = majority_vote(keys, scores_BxN)
  return EnsembleOutput(tokens_BxNxT, scores_BxN, choice, votes)


# ----------------------------------------------------------------------------------------------
# Runs: a frozen checkpoint + prompt files, SeqIO tasks, metrics and JSONL

