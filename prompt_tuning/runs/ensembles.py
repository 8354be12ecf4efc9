"""Prompt-bank runs behind `python -m prompt_tuning.multi_infer` (wired by
gin/runs/prompt_ensemble_eval.gin and gin/runs/prompt_bank_infer.gin): `evaluate_ensemble` (a
task's metrics for every prompt alone, their mean and best, and the ensemble's) and
`infer_mixed` (several tasks in mixed batches -> one JSONL of predictions + per-task metrics).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import storage
from prompt_tuning.inference import decoding
from prompt_tuning.inference import evaluation as evaluation_lib
from prompt_tuning.inference.ensembles import decode_ensemble, decode_rows, stack_candidates
from prompt_tuning.model import partitioning
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.prompts import initializers
from prompt_tuning.prompts.bank import build_bank
from prompt_tuning.runs.run_log import write_json, write_jsonl
from prompt_tuning.runs.setup import (PartitionConfig, PromptInit, Setup, build, check_positive,
                                      check_required)
from prompt_tuning.training import optimizers

log = logging.getLogger("prompt_tuning")
Params = Any


def load_bank_setup(*, prompt_files: Sequence[str], initial_checkpoint_path: str,
                    model_config: T5Config | None, combine: str,
                    partition: PartitionConfig,
                    task_feature_lengths: Mapping[str, int],
                    random_seed: int = 42, model_runtime: Mapping[str, Any] | None = None
                    ) -> tuple[Setup, Params]:
  """Loads the frozen checkpoint (placed on the mesh by `build`) with the bank in it."""
  bank = build_bank(prompt_files)
  num, length, _ = bank.shape
  setup = build(
      model_config=model_config, prompt_config=PromptConfig(length=length, combine=combine,
                                                            bank_size=num),
      initial_checkpoint_path=initial_checkpoint_path, partition=partition,
      trainable_patterns=optimizers.PROMPT_PATTERNS, task_feature_lengths=task_feature_lengths,
      prompt_init=PromptInit(), random_seed=random_seed, model_runtime=model_runtime)
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
                      partition: PartitionConfig = PartitionConfig(),
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
  check_required(
      PROMPT_FILES=prompt_files, MIXTURE_OR_TASK_NAME=dataset.mixture_or_task_name,
      INITIAL_CHECKPOINT_PATH=initial_checkpoint_path)
  check_positive(("EVAL_MAX_EXAMPLES",), EVAL_MAX_EXAMPLES=max_examples)
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
      write_jsonl(out_dir / f"{task_name}-ensemble.jsonl", [
          {"inputs": evaluation_lib.as_text(ex.get("inputs_pretokenized", b"")),
           "prediction": voted[b], "votes": int(out.votes_B[b]),
           "prompt_predictions": [per_prompt[n][b] for n in range(num)],
           "target": evaluation_lib.as_text(ex.get("targets_pretokenized", b""))}
          for b, ex in enumerate(data.examples)])
  summary = {"prompt_files": [str(f) for f in prompt_files], "results": results}
  if out_dir is not None and jax.process_index() == 0:
    write_json(out_dir / "ensemble_results.json", summary)
  return summary


def _interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
  """(task, example) pairs round-robin over the tasks, so every batch mixes them."""
  return [(t, i) for i in range(max(counts)) for t, n in enumerate(counts) if i < n]


def infer_mixed(*, dataset: dataset_lib.DatasetConfig, prompt_files: Sequence[str],
                output_dir: str, initial_checkpoint_path: str,
                tasks: Sequence[str] | None = None, model_config: T5Config | None = None,
                combine: str = "prefix",
                partition: PartitionConfig = PartitionConfig(),
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
  check_required(
      PROMPT_FILES=prompt_files, INITIAL_CHECKPOINT_PATH=initial_checkpoint_path,
      INFER_OUTPUT_DIR=output_dir)
  check_positive(("INFER_MAX_EXAMPLES",), INFER_MAX_EXAMPLES=max_examples)
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
                     "inputs": evaluation_lib.as_text(ex.get("inputs_pretokenized", b"")),
                     "prediction": vocabs[t].decode(tokens_T.tolist()), "score": float(score),
                     "target": evaluation_lib.as_text(ex.get("targets_pretokenized", b""))})
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
    write_jsonl(path, out_rows)
    write_json(out_dir / "mixed_results.json", summary)
    log.info("Wrote %d predictions to %s", len(out_rows), path)
  return summary


__all__ = ["build_bank", "bank_model", "with_bank", "pad_inputs", "stack_candidates",
           "decode_rows", "decode_mixed", "decode_ensemble", "majority_vote", "output_key",
           "EnsembleOutput", "load_bank_setup", "evaluate_ensemble",
           "infer_mixed"]
