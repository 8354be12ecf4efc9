"""Many prompts on one frozen model: prompt banks, mixed-task batches and prompt ensembles.

One frozen T5 serves many tasks: their prompts are stacked into a bank `[N, P, D]` (the model's
`PromptConfig(bank_size=N)`), and each row of a batch names its prompt with `prompt_index`. The
paper's two uses:
- mixed-task inference (Figure 2): examples of different tasks share a batch, each with its
  task's prompt;
- prompt ensembling (section 6, Table 3): each example appears N times, once per prompt, and the N
  decoded outputs vote. Ties go to the output whose votes have the larger summed score, then to
  the lowest prompt index, so the vote is deterministic.
A row's output depends only on its own input and prompt, so both give exactly what running each
prompt alone gives (tests/test_multi_prompt.py).

Library: `build_bank`, `with_bank`, `decode_rows`, `decode_mixed`, `decode_ensemble`,
`majority_vote`. Runs (behind `python -m prompt_tuning.multi_infer`, wired by
gin/runs/prompt_ensemble_eval.gin and gin/runs/prompt_bank_infer.gin): `evaluate_ensemble`
(a task's metrics for every prompt alone, their mean and best, and the ensemble's) and
`infer_mixed` (several tasks in mixed batches -> one JSONL of predictions + per-task metrics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.inference import decoding
from prompt_tuning.inference import evaluation as evaluation_lib
from prompt_tuning.prompts import initializers
from prompt_tuning.training import optimizers
from prompt_tuning.model import partitioning
from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import storage
from prompt_tuning.runs import trainer
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5
from prompt_tuning.model.prompt import PromptConfig

log = logging.getLogger("prompt_tuning")
Params = Any

_as_text = evaluation_lib.as_text
_check_required = trainer.check_required
_write_jsonl = trainer.write_jsonl
_write_json = trainer.write_json


# ----------------------------------------------------------------------------------------------
# The bank


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


def _bank_size(model: T5) -> int:
  if model.prompt is None or model.prompt.bank_size is None:
    raise ValueError("This needs a model with a prompt bank: "
                     "T5(config, prompt=PromptConfig(length=P, bank_size=N)), see bank_model()")
  return model.prompt.bank_size


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
  num_prompts = _bank_size(model)
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
  num_prompts = _bank_size(model)
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


def load_bank_setup(*, prompt_files: Sequence[str], initial_checkpoint_path: str,
                    model_config: T5Config | None, combine: str,
                    partition: trainer.PartitionConfig,
                    task_feature_lengths: Mapping[str, int],
                    random_seed: int = 42, model_runtime: Mapping[str, Any] | None = None
                    ) -> tuple[trainer.Setup, Params]:
  """Loads the frozen checkpoint (placed on the mesh by `trainer.build`) with the bank in it."""
  bank = build_bank(prompt_files)
  num, length, _ = bank.shape
  setup = trainer.build(
      model_config=model_config, prompt_config=PromptConfig(length=length, combine=combine,
                                                            bank_size=num),
      initial_checkpoint_path=initial_checkpoint_path, partition=partition,
      trainable_patterns=optimizers.PROMPT_PATTERNS, task_feature_lengths=task_feature_lengths,
      prompt_init=trainer.PromptInit(), random_seed=random_seed, model_runtime=model_runtime)
  d_model = setup.module.config.d_model
  for path, prompt in zip(prompt_files, bank):
    prompt_io.check_shape(prompt, (length, d_model), source=path)
  trainable = partitioning.place(initializers.set_prompt(setup.trainable, bank),
                                 setup.trainable_shardings)
  return setup, optimizers.merge_params(trainable, setup.frozen)


def _metrics(data: evaluation_lib.TaskData, tokens_NxT, scores_N) -> dict[str, float]:
  """The task's scalar metrics of these outputs (seqio.Evaluator's plumbing)."""
  values = evaluation_lib.compute_task_metrics(data, predict=lambda: (tokens_NxT, scores_N))
  return evaluation_lib.split_metric_values(values)[0]


def evaluate_ensemble(*, dataset: dataset_lib.DatasetConfig, prompt_files: Sequence[str],
                      initial_checkpoint_path: str, model_config: T5Config | None = None,
                      combine: str = "prefix",
                      partition: trainer.PartitionConfig = trainer.PartitionConfig(),
                      decoding_config: decoding.DecodingConfig | None = None,
                      max_examples: int | None = None, output_dir: str | None = None,
                      random_seed: int = 42,
                      model_runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates N prompts of one task and their majority-vote ensemble (paper Table 3).

  For every task of `dataset` (a task or a mixture): each prompt's metrics alone, their mean
  and best, and the ensemble's. One pass decodes every example with every prompt; the prompts'
  own metrics come from the same outputs. With `output_dir`: `ensemble_results.json` and one
  `<task>-ensemble.jsonl` of inputs, votes and every prompt's prediction.
  """
  _check_required(
      PROMPT_FILES=prompt_files, MIXTURE_OR_TASK_NAME=dataset.mixture_or_task_name,
      INITIAL_CHECKPOINT_PATH=initial_checkpoint_path)
  trainer.check_positive(("EVAL_MAX_EXAMPLES",), EVAL_MAX_EXAMPLES=max_examples)
  out_dir = storage.check_run_folder(output_dir, "OUTPUT_DIR") if output_dir else None
  setup, params = load_bank_setup(
      prompt_files=prompt_files, initial_checkpoint_path=initial_checkpoint_path,
      model_config=model_config, combine=combine, partition=partition,
      task_feature_lengths=dataset.task_feature_lengths, random_seed=random_seed,
      model_runtime=model_runtime)
  num = len(prompt_files)
  results: dict[str, Any] = {}
  for task_name in dataset_lib.task_names_for_eval(dataset.mixture_or_task_name, dataset.module):
    data = evaluation_lib.load_task_data(task_name, dataset, max_examples=max_examples)
    vocab = data.vocabulary
    cfg = evaluation_lib.task_decoding_config(decoding_config, task_name, vocab, dataset)
    text_of = lambda t, vocab=vocab: vocab.decode(np.asarray(t).tolist())
    out = decode_ensemble(setup.module, params, data.features["encoder_input_tokens"], cfg,
                          batch_size=dataset.batch_size, key=text_of,
                          rng=jax.random.PRNGKey(random_seed), partitioner=setup.partitioner)
    per_prompt = [[text_of(out.tokens_BxNxT[b, n]) for b in range(len(data))]
                  for n in range(num)]
    voted = [per_prompt[c][b] for b, c in enumerate(out.choice_B)]
    prompt_metrics = [_metrics(data, out.tokens_BxNxT[:, n], out.scores_BxN[:, n])
                      for n in range(num)]
    chosen = np.arange(len(data))
    ensemble = _metrics(data, out.tokens_BxT, out.scores_BxN[chosen, out.choice_B])
    names = sorted(prompt_metrics[0])
    metrics = {
        "ensemble": ensemble,
        "mean": {k: float(np.mean([m[k] for m in prompt_metrics])) for k in names},
        "best": {k: float(np.max([m[k] for m in prompt_metrics])) for k in names},
        "prompts": [{"prompt_file": str(f), **m} for f, m in zip(prompt_files, prompt_metrics)],
        "unanimous": float(np.mean(out.votes_B == num)),
        "examples": float(len(data)),
        "truncated_examples": float(data.truncated_examples),
    }
    results[task_name] = metrics
    log.info("ensemble of %d prompts on %s: ensemble %s, mean %s, best %s", num, task_name,
             metrics["ensemble"], metrics["mean"], metrics["best"])
    if out_dir is not None and jax.process_index() == 0:
      _write_jsonl(out_dir / f"{task_name}-ensemble.jsonl", [
          {"inputs": _as_text(ex.get("inputs_pretokenized", b"")),
           "prediction": voted[b], "votes": int(out.votes_B[b]),
           "prompt_predictions": [per_prompt[n][b] for n in range(num)],
           "target": _as_text(ex.get("targets_pretokenized", b""))}
          for b, ex in enumerate(data.examples)])
  summary = {"prompt_files": [str(f) for f in prompt_files], "results": results}
  if out_dir is not None and jax.process_index() == 0:
    _write_json(out_dir / "ensemble_results.json", summary)
  return summary


def _interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
  """(task, example) pairs round-robin over the tasks, so every batch mixes them."""
  return [(t, i) for i in range(max(counts)) for t, n in enumerate(counts) if i < n]


def infer_mixed(*, dataset: dataset_lib.DatasetConfig, prompt_files: Sequence[str],
                output_dir: str, initial_checkpoint_path: str,
                tasks: Sequence[str] | None = None, model_config: T5Config | None = None,
                combine: str = "prefix",
                partition: trainer.PartitionConfig = trainer.PartitionConfig(),
                decoding_config: decoding.DecodingConfig | None = None,
                max_examples: int | None = None, random_seed: int = 42,
                model_runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Serves several tasks from one frozen model: task k's examples use `prompt_files[k]`.

  `tasks` (default: the tasks of `dataset.mixture_or_task_name`, in order) pairs with
  `prompt_files`. `dataset` gives the split, lengths, batch size and task module. Examples are
  interleaved round-robin so each batch mixes tasks. Writes `output_dir/mixed_predictions.jsonl`
  (in that order: task, prompt index, inputs, prediction, target) and
  `output_dir/mixed_results.json` (each task's metrics).
  """
  _check_required(
      PROMPT_FILES=prompt_files, INITIAL_CHECKPOINT_PATH=initial_checkpoint_path,
      INFER_OUTPUT_DIR=output_dir)
  trainer.check_positive(("INFER_MAX_EXAMPLES",), INFER_MAX_EXAMPLES=max_examples)
  out_dir = storage.check_run_folder(output_dir, "INFER_OUTPUT_DIR")  # before any loading
  if not tasks:
    if not dataset.mixture_or_task_name:
      raise ValueError("Name the tasks: TASKS = ['task_a', 'task_b'] (one per prompt file), or "
                       "a MIXTURE_OR_TASK_NAME whose tasks pair with PROMPT_FILES in order")
    tasks = dataset_lib.task_names_for_eval(dataset.mixture_or_task_name, dataset.module)
  tasks = list(tasks)
  if len(tasks) != len(prompt_files):
    raise ValueError(f"{len(tasks)} tasks {tasks} but {len(prompt_files)} PROMPT_FILES; give "
                     "one prompt file per task, in the same order")
  setup, params = load_bank_setup(
      prompt_files=prompt_files, initial_checkpoint_path=initial_checkpoint_path,
      model_config=model_config, combine=combine, partition=partition,
      task_feature_lengths=dataset.task_feature_lengths, random_seed=random_seed,
      model_runtime=model_runtime)
  evs = [evaluation_lib.load_task_data(t, dataset, max_examples=max_examples) for t in tasks]
  vocabs = [ev.vocabulary for ev in evs]
  cfgs = [evaluation_lib.task_decoding_config(decoding_config, t, v, dataset)
          for t, v in zip(tasks, vocabs)]
  # One decoding config serves the mixed batches; rank candidates go per row (tasks differ).
  cfg = dataclasses.replace(cfgs[0], candidate_targets=None)
  order = _interleave([len(ev) for ev in evs])
  task_of = np.array([t for t, _ in order], np.int32)
  rows = np.stack([evs[t].features["encoder_input_tokens"][i] for t, i in order])
  candidates = None
  if cfg.method == "rank_classification":
    table = stack_candidates([decoding.pad_candidates(c.candidate_targets) for c in cfgs])
    candidates = table[task_of]
  tokens, scores = decode_rows(setup.module, params, rows, task_of, cfg,
                               batch_size=dataset.batch_size, rng=jax.random.PRNGKey(random_seed),
                               candidate_targets_NxCxT=candidates, partitioner=setup.partitioner)
  # Each task's outputs in its own example order, for its metrics.
  task_tokens = [np.zeros((len(ev), tokens.shape[1]), np.int32) for ev in evs]
  task_scores = [np.zeros((len(ev),), np.float32) for ev in evs]
  out_rows = []
  for (t, i), tokens_T, score in zip(order, tokens, scores):
    task_tokens[t][i], task_scores[t][i] = tokens_T, score
    ex = evs[t].examples[i]
    out_rows.append({"task": tasks[t], "prompt_index": t, "prompt_file": str(prompt_files[t]),
                     "inputs": _as_text(ex.get("inputs_pretokenized", b"")),
                     "prediction": vocabs[t].decode(tokens_T.tolist()), "score": float(score),
                     "target": _as_text(ex.get("targets_pretokenized", b""))})
  results = {}
  for t, ev in enumerate(evs):
    results[tasks[t]] = {**_metrics(ev, task_tokens[t], task_scores[t]),
                         "examples": float(len(ev)),
                         "truncated_examples": float(ev.truncated_examples)}
    log.info("mixed batch, %s with prompt %s: %s", tasks[t], prompt_files[t], results[tasks[t]])
  path = out_dir / "mixed_predictions.jsonl"
  summary = {"predictions": str(path), "tasks": tasks,
             "prompt_files": [str(f) for f in prompt_files], "results": results}
  if jax.process_index() == 0:
    _write_jsonl(path, out_rows)
    _write_json(out_dir / "mixed_results.json", summary)
    log.info("Wrote %d predictions to %s", len(out_rows), path)
  return summary


__all__ = ["build_bank", "bank_model", "with_bank", "pad_inputs", "stack_candidates",
           "decode_rows", "decode_mixed", "decode_ensemble", "majority_vote", "output_key",
           "EnsembleOutput", "load_bank_setup", "evaluate_ensemble",
           "infer_mixed"]
