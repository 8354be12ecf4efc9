"""Evaluation and inference runs over a trained prompt: MODEL_DIR's checkpoints (the latest, a
step, or all of them) or a prompt file, behind `python -m prompt_tuning.eval` and `.infer`."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.formats import storage
from prompt_tuning.inference import decoding as decoding_lib
from prompt_tuning.inference import evaluation as evaluation_lib
from prompt_tuning.model import config as config_lib
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.runs.run_log import write_json, write_jsonl
from prompt_tuning.runs.settings import register_saved_file_task
from prompt_tuning.runs.setup import (PartitionConfig, PromptInit, Setup, build, check_positive,
                                      check_required)
from prompt_tuning.training import checkpoints as checkpoints_lib
from prompt_tuning.training import optimizers

log = logging.getLogger("prompt_tuning")


def _restore_trainable(setup: Setup, model_dir: str, step: int):
  """The trainable parameters saved at `step` in MODEL_DIR, and that checkpoint's metadata."""
  ckpt = checkpoints_lib.Checkpointer(model_dir, keep=None)
  try:
    meta = ckpt.read_metadata(step)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), setup.trainable)
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  log.info("Restored the trainable parameters from %s step %d", ckpt.directory, step)
  return params, {"step": step, **meta}


def _steps_to_evaluate(model_dir: str | None, checkpoint_step, prompt_init: PromptInit,
                       prompt_config: PromptConfig | None) -> list[int] | None:
  """Which of MODEL_DIR's checkpoints to evaluate (None: the prompt from PROMPT_FILE / init).

  `checkpoint_step` is None (the latest), a step, or 'all' (every saved step, oldest first).
  Checked before any model is loaded: a MODEL_DIR without checkpoints is an error unless a
  prompt file is given (a typo in MODEL_DIR would otherwise evaluate a random prompt).
  """
  if model_dir:
    storage.check_run_folder(model_dir, "MODEL_DIR", write=False)
  if checkpoint_step is not None and checkpoint_step != "all" and (
      isinstance(checkpoint_step, bool) or not isinstance(checkpoint_step, int)):
    raise ValueError(f"CHECKPOINT_STEP must be a step number, None (the latest) or 'all', got "
                     f"{checkpoint_step!r}")
  steps = checkpoints_lib.saved_steps(model_dir)
  if steps:
    if checkpoint_step == "all":
      return steps
    if checkpoint_step is None:
      return [steps[-1]]
    if checkpoint_step not in steps:
      raise ValueError(f"No checkpoint {checkpoint_step} in {model_dir}/checkpoints; saved steps: "
                       f"{steps}")
    return [checkpoint_step]
  from_file = prompt_config is not None and prompt_init.kind == "from_file"
  if model_dir and not from_file:
    what = ("does not exist" if not storage.path(model_dir).exists()
            else "has no checkpoints (MODEL_DIR/checkpoints/<step>)")
    raise ValueError(
        f"MODEL_DIR {model_dir} {what}, so there is no trained prompt to evaluate. Check the "
        "path, or evaluate a prompt file: --gin_file=prompts/from_file.gin "
        "--gin.PROMPT_FILE=\"'prompt.npy'\" (with --gin.MODEL_DIR=None).")
  if checkpoint_step is not None:
    raise ValueError(f"CHECKPOINT_STEP={checkpoint_step!r} needs a MODEL_DIR with checkpoints")
  if prompt_config is not None and not from_file:
    log.warning("Evaluating a freshly initialised prompt (%s): no MODEL_DIR and no PROMPT_FILE",
                prompt_init.kind)
  return None


def _build_for_eval(dataset: dataset_lib.DatasetConfig, *, model_config, prompt_config,
                    initial_checkpoint_path, prompt_init, trainable_patterns, partition,
                    random_seed, model_runtime=None, allow_nonfinite_frozen=False) -> Setup:
  return build(model_config=model_config, prompt_config=prompt_config,
               initial_checkpoint_path=initial_checkpoint_path, partition=partition,
               trainable_patterns=trainable_patterns,
               task_feature_lengths=dataset.task_feature_lengths, prompt_init=prompt_init,
               random_seed=random_seed, task_name=dataset.mixture_or_task_name,
               task_module=dataset.module, model_runtime=model_runtime,
               allow_nonfinite_frozen=allow_nonfinite_frozen)


def evaluate(*, eval_dataset: dataset_lib.DatasetConfig, model_dir: str | None = None,
             model_config: T5Config | None = None,
             prompt_config: PromptConfig | None = PromptConfig(),
             initial_checkpoint_path: str | None = None, prompt_init: PromptInit = PromptInit(),
             trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
             partition: PartitionConfig = PartitionConfig(),
             checkpoint_step: int | str | None = None,
             decoding_config: decoding_lib.DecodingConfig | None = None,
             max_examples: int | None = None, random_seed: int = 42,
             output_path: str | None = None,
             model_runtime: Mapping[str, Any] | None = None,
             allow_nonfinite_frozen: bool = False) -> dict[str, Any]:
  """Evaluates a prompt: MODEL_DIR's checkpoint (latest, a step, or 'all'), else PROMPT_FILE.

  Writes `eval_results_<decoding>.json` (MODEL_DIR, or OUTPUT_PATH) with the scalar metrics and
  the text samples, and every metric value to TensorBoard under `eval_<decoding>/<task>/`
  beside it. With CHECKPOINT_STEP='all', every saved step is evaluated, oldest first, one row
  per step in `eval_all_checkpoints_<decoding>.jsonl` (written after each step). A file task
  the run in MODEL_DIR trained on is registered again from its run settings.
  """
  config_lib.check_runtime(model_runtime)
  # First: a mistyped MODEL_DIR is the error to report, not the settings it would have supplied.
  steps = _steps_to_evaluate(model_dir, checkpoint_step, prompt_init, prompt_config)
  check_required(MIXTURE_OR_TASK_NAME=eval_dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("EVAL_MAX_EXAMPLES",), EVAL_MAX_EXAMPLES=max_examples)
  if output_path:
    storage.check_run_folder(output_path, "OUTPUT_PATH", write=False)  # before any loading
  register_saved_file_task(model_dir, eval_dataset.mixture_or_task_name, eval_dataset.module)
  setup = _build_for_eval(
      eval_dataset, model_config=model_config, prompt_config=prompt_config,
      initial_checkpoint_path=initial_checkpoint_path, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, partition=partition, random_seed=random_seed,
      model_runtime=model_runtime, allow_nonfinite_frozen=allow_nonfinite_frozen)
  evaluation = evaluation_lib.Evaluation(setup, eval_dataset, decoding_config=decoding_config,
                                         max_examples=max_examples, random_seed=random_seed)
  mode = evaluation.decoding_method
  out_folder = (storage.path(output_path).parent if output_path
                else storage.path(model_dir) if model_dir else None)
  log_dir = str(out_folder / f"eval_{mode}") if out_folder is not None else None
  write = jax.process_index() == 0 and out_folder is not None

  def one(trainable, step):
    results = evaluation.run(trainable, step=step)
    evaluation_lib.log_metric_values(log_dir, step, evaluation_lib.metric_values(results))
    return {"checkpoint_step": step, "decoding": mode,
            "results": evaluation_lib.scalars(results),
            "samples": evaluation_lib.samples(results)}

  if steps is None:
    out = one(setup.trainable, None)
  else:
    rows = []
    for step in steps:
      trainable, _ = _restore_trainable(setup, model_dir, step)
      rows.append(one(trainable, step))
      if write and checkpoint_step == "all":
        path = out_folder / f"eval_all_checkpoints_{mode}.jsonl"
        write_jsonl(path, rows)
        log.info("Evaluated step %d (%d of %d); rows in %s", step, len(rows), len(steps), path)
    out = rows[-1] if checkpoint_step != "all" else {
        "decoding": mode, "checkpoints": rows,
        "path": str(out_folder / f"eval_all_checkpoints_{mode}.jsonl") if write else None}
  if write and checkpoint_step != "all":
    path = storage.path(output_path) if output_path else out_folder / f"eval_results_{mode}.json"
    write_json(path, out)
    log.info("Wrote %s", path)
  return out


def infer(*, dataset: dataset_lib.DatasetConfig, output_dir: str, model_dir: str | None = None,
          model_config: T5Config | None = None,
          prompt_config: PromptConfig | None = PromptConfig(),
          initial_checkpoint_path: str | None = None, prompt_init: PromptInit = PromptInit(),
          trainable_patterns: Sequence[str] = optimizers.PROMPT_PATTERNS,
          partition: PartitionConfig = PartitionConfig(), checkpoint_step: int | None = None,
          decoding_config: decoding_lib.DecodingConfig | None = None,
          max_examples: int | None = None, random_seed: int = 42,
          mode: str = "predict", num_return_sequences: int | None = None,
          model_runtime: Mapping[str, Any] | None = None,
          allow_nonfinite_frozen: bool = False) -> list:
  """Writes one JSONL per task of `dataset`, as T5X's infer.py modes do.

  - `predict`: {inputs, prediction, score, target} per example (`<task>-<step>.jsonl`; score:
    the prediction's log-likelihood, length-normalised for beam search); with
    `num_return_sequences` N (beam search) also `n_best`: the N best {prediction, score}.
  - `predict_with_aux`: the same plus `aux_value: {scores}` (each decode's log-likelihood).
  - `score`: {inputs, target, score}, the target's log-likelihood under the model.
  Other modes than predict name their files `<task>-<step>.<mode>.jsonl`.
  """
  if checkpoint_step == "all":
    raise ValueError("CHECKPOINT_STEP='all' is for prompt_tuning.eval; infer takes one step")
  config_lib.check_runtime(model_runtime)
  # First: a mistyped MODEL_DIR is the error to report, not the settings it would have supplied.
  steps = _steps_to_evaluate(model_dir, checkpoint_step, prompt_init, prompt_config)
  check_required(INFER_OUTPUT_DIR=output_dir, MIXTURE_OR_TASK_NAME=dataset.mixture_or_task_name,
                 INITIAL_CHECKPOINT_PATH=initial_checkpoint_path, PROMPT_FILE=prompt_init.path)
  check_positive(("INFER_MAX_EXAMPLES",), INFER_MAX_EXAMPLES=max_examples)
  if mode not in evaluation_lib.INFER_MODES:
    raise ValueError(f"INFER_MODE={mode!r}; choose one of {evaluation_lib.INFER_MODES}")
  if num_return_sequences is not None and mode != "predict":
    raise ValueError("NUM_RETURN_SEQUENCES (n-best outputs) goes with INFER_MODE='predict'")
  out_dir = storage.check_run_folder(output_dir, "INFER_OUTPUT_DIR")  # before any loading
  register_saved_file_task(model_dir, dataset.mixture_or_task_name, dataset.module)
  setup = _build_for_eval(
      dataset, model_config=model_config, prompt_config=prompt_config,
      initial_checkpoint_path=initial_checkpoint_path, prompt_init=prompt_init,
      trainable_patterns=trainable_patterns, partition=partition, random_seed=random_seed,
      model_runtime=model_runtime, allow_nonfinite_frozen=allow_nonfinite_frozen)
  trainable, step = setup.trainable, "init"
  if steps is not None:
    trainable, _ = _restore_trainable(setup, model_dir, steps[-1])
    step = steps[-1]
  decoding = None if mode == "score" else decoding_config
  evaluation = evaluation_lib.Evaluation(setup, dataset, decoding_config=decoding,
                                         max_examples=max_examples, random_seed=random_seed)
  paths = []
  for data in evaluation.tasks:
    vocab = data.vocabulary
    base = [{"inputs": evaluation_lib.as_text(ex.get("inputs_pretokenized", b"")),
             "target": evaluation_lib.as_text(ex.get("targets_pretokenized", b""))}
            for ex in data.examples]
    if mode == "score":
      scores = evaluation.score(trainable, data)
      rows = [{**b, "score": float(s)} for b, s in zip(base, scores)]
    elif num_return_sequences is not None:
      tokens, scores = evaluation.n_best(trainable, data, num_return_sequences)
      rows = []
      for b, t_n, s_n in zip(base, tokens, scores):
        n_best = [{"prediction": vocab.decode(t.tolist()), "score": float(s)}
                  for t, s in zip(t_n, s_n)]
        rows.append({"inputs": b["inputs"], "prediction": n_best[0]["prediction"],
                     "target": b["target"], "n_best": n_best})
    else:
      tokens, scores = evaluation.predict(trainable, data)
      rows = [{"inputs": b["inputs"], "prediction": vocab.decode(t.tolist()),
               "score": float(s), "target": b["target"]}
              for b, t, s in zip(base, tokens, scores)]
      if mode == "predict_with_aux":
        for r, s in zip(rows, scores):
          r["aux_value"] = {"scores": float(s)}
    suffix = "" if mode == "predict" else f".{mode}"
    path = out_dir / f"{data.name}-{step}{suffix}.jsonl"
    if jax.process_index() == 0:
      write_jsonl(path, rows)
      log.info("Wrote %d rows (%s) to %s", len(rows), mode, path)
    paths.append(path)
  return paths
