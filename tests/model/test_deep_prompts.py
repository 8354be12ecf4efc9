"""Per-layer ("deep") prompts: where they go, what they change, what a step costs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.prompts import initializers
from prompt_tuning.training import optimizers
from prompt_tuning.model import prompt as prompts
from prompt_tuning.model import scan_conversion
from prompt_tuning.training import step as train_lib
from prompt_tuning.training.objective import EncoderDecoderModel
from tests.conftest import tiny_config
from tests.training.test_step import _batch, _flops

RNG = jax.random.PRNGKey(0)


def _init(cfg, prompt_config, batch):
  module = T5(cfg, prompt=prompt_config)
  params = nn.meta.unbox(module.init(RNG, batch["encoder_input_tokens"],
                                     batch["decoder_input_tokens"])["params"])
  return module, params


def _logits(module, params, batch):
  return module.apply({"params": params}, batch["encoder_input_tokens"],
                      batch["decoder_input_tokens"])


@pytest.mark.parametrize("combine", prompts.COMBINATIONS)
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_inject_touches_exactly_the_prompt_positions(combine, mode):
  """Against the positions `combine` put the prompt at: those rows change as `mode` says."""
  batch = _batch(batch=3, inputs=7)
  valid = batch["encoder_input_tokens"] > 0
  plen, d = 3, 4
  marker = jnp.ones((1, plen, d)) * -100.0  # a prompt nobody could mistake for input
  x = jnp.asarray(np.random.RandomState(0).randn(3, 7, d), jnp.float32)
  combined, _ = prompts.combine(x, jnp.broadcast_to(marker, (3, plen, d)), valid, combine)
  at_prompt = np.asarray(combined[..., 0] == -100.0)
  assert at_prompt.sum() == 3 * plen
  layer_prompt = jnp.arange(plen * d, dtype=jnp.float32).reshape(plen, d)
  hidden = jnp.asarray(np.random.RandomState(1).randn(*combined.shape), jnp.float32)
  out = np.asarray(prompts.inject_layer_prompt(hidden, layer_prompt, valid, combine, mode))
  np.testing.assert_array_equal(out[~at_prompt], np.asarray(hidden)[~at_prompt])
  want = np.tile(np.asarray(layer_prompt), (3, 1))
  if mode == "add":
    want = want + np.asarray(hidden)[at_prompt]
  np.testing.assert_allclose(out[at_prompt], want, atol=1e-6)


def test_zero_added_layer_prompts_are_the_plain_prompt_model_and_replace_is_not():
  """`add` with zero layer prompts is the paper's model; replacing the states changes it."""
  cfg = tiny_config(num_encoder_layers=3)
  batch = _batch(vocab=cfg.vocab_size)
  plain, params = _init(cfg, PromptConfig(length=4), batch)
  deep, deep_params = _init(cfg, PromptConfig(length=4, per_layer="add"), batch)
  assert deep_params["encoder"]["prompt"]["layer_prompts"].shape == (2, 4, cfg.d_model)
  merged = optimizers.merge_params(
      {"encoder": {"prompt": {"layer_prompts": jnp.zeros((2, 4, cfg.d_model))}}}, params)
  np.testing.assert_allclose(_logits(deep, merged, batch), _logits(plain, params, batch),
                             atol=1e-5)
  replace = T5(cfg, prompt=PromptConfig(length=4, per_layer="replace"))
  assert not np.allclose(_logits(replace, merged, batch), _logits(plain, params, batch),
                         atol=1e-3)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_scanned_layers_give_the_unrolled_logits(mode):
  cfg = tiny_config(num_encoder_layers=3)
  batch = _batch(vocab=cfg.vocab_size)
  pc = PromptConfig(length=4, per_layer=mode)
  module, params = _init(cfg, pc, batch)
  scanned_cfg = cfg.replace(scan_layers=True)
  got = _logits(T5(scanned_cfg, prompt=pc), scan_conversion.for_config(params, scanned_cfg),
                batch)
  np.testing.assert_allclose(got, _logits(module, params, batch), atol=1e-4)


def _step_setup(cfg, mode, batch):
  module, params = _init(cfg, PromptConfig(length=4, per_layer=mode), batch)
  trainable, frozen = optimizers.split_params(params, optimizers.ALL_PROMPT_PATTERNS)
  return EncoderDecoderModel(module), trainable, frozen


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_only_the_prompts_change_and_every_layer_prompt_learns(mode):
  cfg = tiny_config(num_encoder_layers=3)
  batch = _batch(vocab=cfg.vocab_size)
  model, trainable, frozen = _step_setup(cfg, mode, batch)
  assert set(trainable["encoder"]["prompt"]) == {"prompt", "layer_prompts"}
  assert set(frozen["encoder"]) >= {"layers_0", "layers_1", "layers_2"}
  frozen_before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), frozen)
  before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), trainable)
  tx = optimizers.prompt_tuning_optimizer()
  state = train_lib.create_train_state(trainable, tx)
  state, metrics = train_lib.jit_train_step(model, tx)(state, frozen, batch, RNG)
  assert bool(metrics["finite"])
  after = state.params["encoder"]["prompt"]
  assert not np.allclose(after["prompt"], before["encoder"]["prompt"]["prompt"])
  for layer in range(2):  # each later layer's own prompt moved
    assert not np.allclose(after["layer_prompts"][layer],
                           before["encoder"]["prompt"]["layer_prompts"][layer])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen_before),
                          jax.tree_util.tree_leaves(frozen)):
    assert np.asarray(b).tobytes() == a.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_pad_tokens_cannot_influence_loss_or_layer_prompt_gradient(mode):
  cfg = tiny_config(num_encoder_layers=3)
  batch = _batch(vocab=cfg.vocab_size)
  model, trainable, frozen = _step_setup(cfg, mode, batch)

  @jax.jit
  def loss_and_grad(b):
    return jax.value_and_grad(
        lambda tr: model.loss_fn(optimizers.merge_params(tr, frozen), b)[0])(trainable)
  loss, grad = loss_and_grad(batch)
  wider = dict(batch)
  wider["encoder_input_tokens"] = np.pad(batch["encoder_input_tokens"], ((0, 0), (0, 5)))
  loss2, grad2 = loss_and_grad(wider)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  np.testing.assert_allclose(grad2["encoder"]["prompt"]["layer_prompts"],
                             grad["encoder"]["prompt"]["layer_prompts"], atol=1e-6)


def test_checkpoint_params_get_their_layer_prompts_from_the_module_initialiser():
  """A frozen checkpoint has no layer prompts: `add_missing_prompt_params` adds them."""
  cfg = tiny_config(num_encoder_layers=3)
  batch = _batch(vocab=cfg.vocab_size)
  _, params = _init(cfg, None, batch)
  pc = PromptConfig(length=4, per_layer="replace")
  params = initializers.set_prompt(params, np.zeros((4, cfg.d_model), np.float32))
  full = initializers.add_missing_prompt_params(params, pc, d_model=cfg.d_model,
                                                num_layers=3, rng=RNG)
  layer_prompts = np.asarray(full["encoder"]["prompt"]["layer_prompts"])
  assert layer_prompts.shape == (2, 4, cfg.d_model)
  assert layer_prompts.min() >= -0.5 and layer_prompts.max() < 0.5 and layer_prompts.std() > 0.1
  np.testing.assert_array_equal(full["encoder"]["prompt"]["prompt"], 0.0)  # kept
  again = initializers.add_missing_prompt_params(full, pc, d_model=cfg.d_model, num_layers=3,
                                                 rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(again["encoder"]["prompt"]["layer_prompts"], layer_prompts)


def test_per_layer_config_is_validated():
  with pytest.raises(ValueError, match="per_layer"):
    PromptConfig(per_layer="prefix")
  with pytest.raises(ValueError, match="bank"):
    PromptConfig(per_layer="add", bank_size=2)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_deep_prompt_step_costs_at_most_072_of_full_finetuning(mode):
  """Gradients for the per-layer prompts only: still no weight gradients of the frozen model."""
  cfg = tiny_config(vocab_size=256, d_model=64, d_kv=16, num_heads=4, d_ff=128)
  batch = _batch(batch=8, inputs=32, targets=8, vocab=256)
  model, trainable, frozen = _step_setup(cfg, mode, batch)
  tx = optimizers.prompt_tuning_optimizer()
  state = train_lib.create_train_state(trainable, tx)
  prompt_fn = lambda s, f, b, r: train_lib.train_step(s, f, b, r, model=model, tx=tx)
  prompt_flops = _flops(prompt_fn, state, frozen, batch, RNG)
  tx_full = optimizers.model_tuning_optimizer()
  full_state = train_lib.create_train_state(optimizers.merge_params(trainable, frozen), tx_full)
  full_fn = lambda s, f, b, r: train_lib.train_step(s, f, b, r, model=model, tx=tx_full)
  full_flops = _flops(full_fn, full_state, {}, batch, RNG)
  ratio = prompt_flops / full_flops
  print(f"per_layer={mode} prompt={prompt_flops:.3e} full={full_flops:.3e} ratio={ratio:.3f}")
  assert ratio <= 0.72
