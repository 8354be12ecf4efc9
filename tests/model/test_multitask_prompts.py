"""Multi-task prompts: a shared prompt combined with each example's task prompt (first token)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.training import optimizers
from prompt_tuning.model import prompt as prompts
from prompt_tuning.training import step as train_lib
from prompt_tuning.training.objective import EncoderDecoderModel
from tests.conftest import tiny_config
from tests.training.test_step import _batch

RNG = jax.random.PRNGKey(0)
BASE = 63  # task 0's sentinel id in the tiny vocabulary of 64
NUM_TASKS = 3
MODES = prompts.TASK_COMBINATIONS


def _config(mode, **kw):
  return PromptConfig(length=3, num_tasks=NUM_TASKS, task_combine=mode, task_token_base=BASE,
                      **kw)


def _task_batch(tasks=(0, 1, 2, 1)):
  batch = _batch(batch=len(tasks), inputs=10)
  batch["encoder_input_tokens"] = np.concatenate(
      [BASE - np.asarray(tasks, np.int32)[:, None], batch["encoder_input_tokens"]], axis=1)
  return batch


def _init(mode, batch, **kw):
  module = T5(tiny_config(), prompt=_config(mode, **kw))
  params = nn.meta.unbox(module.init(RNG, batch["encoder_input_tokens"],
                                     batch["decoder_input_tokens"])["params"])
  # Move every task away from the shared prompt (add / project start exactly at it).
  leaves = params["encoder"]["prompt"]
  for i, name in enumerate(sorted(k for k in leaves if k.startswith("task_"))):
    noise = 0.3 * jax.random.normal(jax.random.PRNGKey(10 + i), leaves[name].shape)
    leaves[name] = leaves[name] + noise
  return module, params


def _logits(module, params, batch):
  return np.asarray(module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"]))


@pytest.mark.parametrize("mode", MODES)
def test_each_row_is_the_single_prompt_model_with_its_tasks_effective_prompt(mode):
  """The sentinel is read and dropped: row b equals a plain model given task t's prompt."""
  batch = _task_batch()
  module, params = _init(mode, batch)
  got = _logits(module, params, batch)
  cfg = _config(mode)
  every = prompts.task_prompts(params["encoder"]["prompt"]["prompt"],
                               params["encoder"]["prompt"], mode)
  assert every.shape == (NUM_TASKS, cfg.total_length, tiny_config().d_model)
  plain = T5(tiny_config(), prompt=PromptConfig(length=cfg.total_length))
  for b, t in enumerate((0, 1, 2, 1)):
    single = jax.tree_util.tree_map(lambda x: x, params)
    single["encoder"]["prompt"] = {"prompt": every[t]}
    row = {k: v[b:b + 1] for k, v in batch.items()}
    row["encoder_input_tokens"] = row["encoder_input_tokens"][:, 1:]
    np.testing.assert_allclose(got[b:b + 1], _logits(plain, single, row), atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_rows_output_depends_only_on_its_own_tasks_prompt(mode):
  batch = _task_batch()
  module, params = _init(mode, batch)
  before = _logits(module, params, batch)
  changed = jax.tree_util.tree_map(lambda x: x, params)
  for name, leaf in params["encoder"]["prompt"].items():
    if name.startswith("task_"):
      changed["encoder"]["prompt"][name] = leaf.at[1].add(1.0)  # task 1 only
  after = _logits(module, changed, batch)
  rows_of_task_1 = np.array([False, True, False, True])
  np.testing.assert_array_equal(after[~rows_of_task_1], before[~rows_of_task_1])
  for b in np.flatnonzero(rows_of_task_1):
    assert not np.allclose(after[b], before[b], atol=1e-3)


@pytest.mark.parametrize("mode", ["add", "project"])
def test_add_and_project_tasks_start_at_the_shared_prompt(mode):
  batch = _task_batch()
  module = T5(tiny_config(), prompt=_config(mode))
  params = nn.meta.unbox(module.init(RNG, batch["encoder_input_tokens"],
                                     batch["decoder_input_tokens"])["params"])
  shared = params["encoder"]["prompt"]["prompt"]
  every = prompts.task_prompts(shared, params["encoder"]["prompt"], mode)
  np.testing.assert_allclose(every, np.broadcast_to(shared, every.shape), atol=1e-6)


@pytest.mark.parametrize("patterns,trained", [
    (optimizers.ALL_PROMPT_PATTERNS, {"prompt", "task_prompts"}),
    (optimizers.PROMPT_PATTERNS, {"prompt"}),  # task prompts frozen
    (optimizers.TASK_PROMPT_PATTERNS, {"task_prompts"}),  # shared prompt frozen
])
def test_frozen_variants_change_only_what_they_should(patterns, trained):
  batch = _task_batch()
  module, params = _init("concat", batch)
  trainable, frozen = optimizers.split_params(params, patterns)
  assert set(trainable["encoder"]["prompt"]) == trained
  frozen_before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), frozen)
  before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), trainable)
  tx = optimizers.prompt_tuning_optimizer()
  state = train_lib.create_train_state(trainable, tx)
  state, metrics = train_lib.jit_train_step(EncoderDecoderModel(module), tx)(
      state, frozen, batch, RNG)
  assert bool(metrics["finite"])
  for name in trained:
    assert not np.allclose(state.params["encoder"]["prompt"][name],
                           before["encoder"]["prompt"][name])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen_before),
                          jax.tree_util.tree_leaves(frozen)):
    assert np.asarray(b).tobytes() == a.tobytes(), jax.tree_util.keystr(path)


def test_task_prompts_of_tasks_absent_from_the_batch_get_no_gradient():
  batch = _task_batch(tasks=(0, 2, 2, 0))
  module, params = _init("add", batch)
  trainable, frozen = optimizers.split_params(params, optimizers.ALL_PROMPT_PATTERNS)
  model = EncoderDecoderModel(module)
  grad = jax.grad(lambda tr: model.loss_fn(optimizers.merge_params(tr, frozen), batch)[0])(
      trainable)["encoder"]["prompt"]["task_prompts"]
  np.testing.assert_array_equal(grad[1], 0.0)
  assert np.abs(grad[0]).max() > 0 and np.abs(grad[2]).max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_pad_tokens_cannot_influence_the_output(mode):
  batch = _task_batch()
  module, params = _init(mode, batch)
  wider = dict(batch)
  wider["encoder_input_tokens"] = np.pad(batch["encoder_input_tokens"], ((0, 0), (0, 5)))
  np.testing.assert_allclose(_logits(module, params, wider), _logits(module, params, batch),
                             atol=1e-5)


def test_multitask_config_is_validated():
  with pytest.raises(ValueError, match="task_token_base"):
    PromptConfig(num_tasks=2)
  with pytest.raises(ValueError, match="task_combine"):
    PromptConfig(num_tasks=2, task_token_base=9, task_combine="mean")
  with pytest.raises(ValueError, match="bank"):
    PromptConfig(num_tasks=2, task_token_base=9, bank_size=2)
  with pytest.raises(ValueError, match="task_length"):
    PromptConfig(num_tasks=2, task_token_base=9, task_combine="add", task_length=4)
  assert PromptConfig(length=3, num_tasks=2, task_token_base=9, task_length=5).total_length == 8


def test_export_writes_each_tasks_effective_prompt(tmp_path):
  """From a run's numpy export: task t's file is `task_prompts(shared, task params)[t]`."""
  from prompt_tuning.scripts import export_task_prompts
  rs = np.random.RandomState(0)
  shared, kernel, bias = rs.randn(3, 4), rs.randn(2, 4, 4), rs.randn(2, 4)
  folder = tmp_path / "run" / "numpy_checkpoints" / "checkpoint_5"
  folder.mkdir(parents=True)
  for name, value in (("prompt", shared), ("task_kernel", kernel), ("task_bias", bias)):
    np.save(folder / f"encoder.prompt.{name}.npy", value.astype(np.float32))
  out = export_task_prompts.export(tmp_path / "run", tmp_path / "out", task_combine="project",
                                   task_names=["a", "b"])
  assert out["step"] == 5 and out["shape"] == [3, 4]
  for t, name in enumerate("ab"):
    np.testing.assert_allclose(np.load(tmp_path / "out" / f"{name}.npy"),
                               shared @ kernel[t] + bias[t], atol=1e-5)
  with pytest.raises(ValueError, match="task_kernel|task_prompts"):
    export_task_prompts.export(tmp_path / "run", tmp_path / "out2", task_combine="add")
