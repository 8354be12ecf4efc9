"""Building a run: the frozen model and its parameters, the prompt, the mesh, and input checks.

`build` loads INITIAL_CHECKPOINT_PATH (or random weights when allowed), adds the prompt from its
initialiser (`PromptInit`), splits the parameters into trainable and frozen, and places both on
the mesh (`PartitionConfig`). Training, evaluation and inference runs all start from it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.data import dataset as dataset_lib
from prompt_tuning.model import config as config_lib
from prompt_tuning.model import partitioning
from prompt_tuning.model import scan_conversion
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.prompt import PromptConfig
from prompt_tuning.model.t5 import T5
from prompt_tuning.prompts import initializers
from prompt_tuning.training import optimizers
from prompt_tuning.training.objective import EncoderDecoderModel

log = logging.getLogger("prompt_tuning")


@dataclasses.dataclass(frozen=True)
class PromptInit:
  """How a fresh prompt is initialised (see `prompt_tuning.prompts.initializers`)."""

  kind: str = "random_uniform"  # random_uniform | sampled_vocab | class_labels | from_string | from_file
  labels: Sequence[str] | None = None  # class_labels: CLASS_LABELS (default: the task's labels)
  text: str | None = None              # from_string
  path: str | None = None              # from_file: PROMPT_FILE (.npy, extension-less, PEFT dir)
  low: float = -0.5                    # random_uniform: the paper's U[-0.5, 0.5]
  high: float = 0.5
  population: int = 5000               # sampled_vocab / class_labels: first N vocabulary rows


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  num_partitions: int | None = None
  model_parallel_submesh: Sequence[int] | None = None
  mesh_shape: Sequence[int] | None = None
  parameter_partitioning_dims: int = 1
  num_devices: int | None = None  # use only the first N devices (default: all)

  def create(self) -> partitioning.Partitioner:
    return partitioning.Partitioner.create(
        self.num_partitions, model_parallel_submesh=self.model_parallel_submesh,
        mesh_shape=self.mesh_shape, parameter_partitioning_dims=self.parameter_partitioning_dims,
        num_devices=self.num_devices)


@dataclasses.dataclass
class Setup:
  """Everything a train/eval/infer run builds before its loop."""

  module: T5
  model: EncoderDecoderModel
  partitioner: partitioning.Partitioner
  trainable: Any
  frozen: Any
  trainable_shardings: Any
  frozen_shardings: Any
  initial_checkpoint_path: str | None
  nonfinite_frozen: tuple[str, ...] = ()  # frozen parameters with NaN/Inf (allowed on request)


# ------------------------------------------------------------------------------------------------
# Building the model and its parameters

def check_required(**values) -> None:
  """gin passes `%gin.REQUIRED` macros that nobody set as a bare sentinel object."""
  for name, value in values.items():
    if type(value) is object:  # pylint: disable=unidiomatic-typecheck
      raise ValueError(f"{name} is required: pass --gin.{name}=... (strings need inner quotes, "
                       f"e.g. --gin.{name}=\"'value'\")")


def check_positive(allow_none=(), **values) -> None:
  """Step counts, periods and sizes of 0 or less would run and silently do nothing: refuse them.

  Names in `allow_none` may be None (no limit, keep all)."""
  for name, value in values.items():
    if value is None and name in allow_none:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      none = " or None (no limit)" if name in allow_none else ""
      raise ValueError(f"{name} must be a positive integer{none}, got {value!r}: pass e.g. "
                       f"--gin.{name}=10")


def _targets_vocabulary(task_name: str | None, module=None):
  if not task_name:
    return None
  task = dataset_lib.get_mixture_or_task(task_name, module)
  tasks = getattr(task, "tasks", [task])
  return tasks[0].output_features["targets"].vocabulary


@jax.jit
def _nonfinite_counts(leaves) -> jax.Array:
  return jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])


def _check_frozen_finite(frozen, *, source: str | None, dtype: str,
                         allow: bool) -> tuple[str, ...]:
  """Names the frozen parameters holding NaN or Inf; refuses them unless `allow`.

  One jitted pass over the frozen tree at load: otherwise a damaged checkpoint shows up hours
  later as a NaN loss, with learning-rate advice that cannot help.
  """
  import flax
  flat = {k: v for k, v in flax.traverse_util.flatten_dict(frozen, sep="/").items()
          if jnp.issubdtype(v.dtype, jnp.inexact)}
  if not flat:
    return ()
  counts = partitioning.to_host(_nonfinite_counts(list(flat.values())))
  bad = [(k, int(n), int(np.prod(v.shape))) for (k, v), n in zip(flat.items(), counts) if n]
  if not bad:
    return ()
  listed = ", ".join(f"{k} ({n} of {size} values)" for k, n, size in bad[:10])
  listed += f" and {len(bad) - 10} more" if len(bad) > 10 else ""
  what = f"The frozen checkpoint {source}" if source else "The randomly initialised model"
  overflow = ("" if jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16, jnp.float64) else
              f" (or its values overflow FROZEN_PARAM_DTYPE={dtype!r})")
  if allow:
    log.warning("%s has NaN or Inf values in %s; going on as allow_nonfinite_frozen=True asks",
                what, listed)
    return tuple(k for k, _, _ in bad)
  raise ValueError(
      f"{what} has NaN or Inf values in {listed}: the checkpoint is damaged{overflow} (a "
      "download or copy cut short, a disk error, or the run that wrote it diverged). Use a good "
      "copy of it. Only if you know these values are never used, pass "
      "--gin.runs.train.allow_nonfinite_frozen=True (or runs.evaluate / runs.infer).")


def build(*, model_config: T5Config | None, prompt_config: PromptConfig | None,
          initial_checkpoint_path: str | None, partition: PartitionConfig,
          trainable_patterns: Sequence[str], task_feature_lengths: Mapping[str, int],
          prompt_init: PromptInit, random_seed: int, frozen_param_dtype: str = "float32",
          task_name: str | None = None, task_module=None, allow_random_init: bool = False,
          model_kwargs: Mapping[str, Any] | None = None,
          model_runtime: Mapping[str, Any] | None = None,
          allow_nonfinite_frozen: bool = False) -> Setup:
  """Loads the frozen model, adds and initialises the prompt, splits and places the parameters.

  The architecture comes from the checkpoint when it carries one, else from `model_config`. The
  runtime fields (`config.RUNTIME_FIELDS`: dtype, dropout, remat, matmul dtype, scanned layers)
  come from `model_runtime` (gin's MODEL_RUNTIME) where it names them, else from
  `model_config`, else from the checkpoint. Frozen parameters with NaN or Inf are refused
  (a damaged checkpoint) unless `allow_nonfinite_frozen`.
  """
  from prompt_tuning.formats import pretrained
  config_lib.check_runtime(model_runtime)  # before loading what may be a large checkpoint
  dataset_lib.prepare_vocabularies(task_name, task_module,
                                   initial_checkpoint_path=initial_checkpoint_path)
  if initial_checkpoint_path:
    # Checkpoints hold per-layer weights whatever the runtime layout; stack them below.
    load_config = None if model_config is None else model_config.replace(scan_layers=False)
    loaded, params = pretrained.load_pretrained(initial_checkpoint_path, config=load_config)
    config = loaded.config
    if model_config is not None:
      # Keep the user's runtime choices on the checkpoint's architecture.
      config = config.replace(**{f: getattr(model_config, f)
                                 for f in config_lib.RUNTIME_FIELDS})
    config = config_lib.with_runtime(config, model_runtime)
    # Checkpoints are per-layer (T5X layout); scanned models stack the layers after loading.
    params = scan_conversion.for_config(params, config)
  elif allow_random_init:
    if model_config is None:
      raise ValueError("Random initialisation needs MODEL_CONFIG (include a gin/models/ file)")
    config, params = config_lib.with_runtime(model_config, model_runtime), None
  else:
    raise ValueError("No INITIAL_CHECKPOINT_PATH: set it to the frozen model to prompt-tune, e.g. "
                     "--gin.INITIAL_CHECKPOINT_PATH=\"'gs://t5-data/pretrained_models/t5x/"
                     "t5_1_1_lm100k_base/checkpoint_1100000'\" or an HF folder.")

  module = T5(config, prompt=prompt_config)
  rng = jax.random.PRNGKey(random_seed)
  enc = jnp.ones((1, task_feature_lengths["inputs"]), jnp.int32)
  dec = jnp.ones((1, task_feature_lengths["targets"]), jnp.int32)
  boxed = jax.eval_shape(lambda: module.init(rng, enc, dec))["params"]
  partitioner = partition.create()
  shardings = partitioner.shardings_from_boxed(boxed)

  if params is None:
    params = nn.meta.unbox(jax.jit(module.init)(rng, enc, dec)["params"])
  if prompt_config is not None:
    embedding = np.asarray(params["token_embedder"]["embedding"], np.float32)
    labels = prompt_init.labels
    if prompt_init.kind == "class_labels" and not labels:
      labels = dataset_lib.class_labels(task_name, task_module)
      if not labels:
        raise ValueError(f"Class-label initialisation needs labels: set CLASS_LABELS (task "
                         f"{task_name!r} has no default class labels)")
    vocab = (_targets_vocabulary(task_name, task_module)
             if prompt_init.kind in ("class_labels", "from_string") else None)
    shape = (prompt_config.bank_size,) if prompt_config.bank_size else ()
    rows = []
    for i in range(prompt_config.bank_size or 1):
      rows.append(initializers.initialize(
          prompt_init.kind, jax.random.fold_in(rng, 1000 + i), length=prompt_config.length,
          d_model=config.d_model, embedding=embedding, vocab=vocab, labels=labels,
          text=prompt_init.text, path=prompt_init.path, low=prompt_init.low,
          high=prompt_init.high, population=prompt_init.population))
    prompt = np.stack(rows) if shape else rows[0]
    params = initializers.set_prompt(params, prompt)
    params = initializers.add_missing_prompt_params(
        params, prompt_config, d_model=config.d_model, num_layers=config.num_encoder_layers,
        rng=jax.random.fold_in(rng, 2000))
  _check_tree(params, boxed)

  trainable, frozen = optimizers.split_params(params, trainable_patterns)
  trainable_sh, frozen_sh = optimizers.split_params(shardings, trainable_patterns)
  frozen = optimizers.cast_floats(frozen, frozen_param_dtype)
  trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
  trainable = partitioning.place(trainable, trainable_sh)
  frozen = partitioning.place(frozen, frozen_sh)
  nonfinite = _check_frozen_finite(frozen, source=initial_checkpoint_path,
                                   dtype=frozen_param_dtype, allow=allow_nonfinite_frozen)
  model = EncoderDecoderModel(module, **dict(model_kwargs or {}))
  return Setup(module, model, partitioner, trainable, frozen, trainable_sh, frozen_sh,
               initial_checkpoint_path, nonfinite)


def _check_tree(params, boxed) -> None:
  import flax
  want = {k: v.value.shape if hasattr(v, "value") else v.shape
          for k, v in flax.traverse_util.flatten_dict(
              boxed, is_leaf=lambda k, x: isinstance(x, nn.Partitioned), sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {tuple(want[k])}"
               for k in sorted(set(want) & set(have)) if tuple(want[k]) != have[k]]
  if problems:
    raise ValueError("The parameters do not match the model:\n  " + "\n  ".join(problems))
