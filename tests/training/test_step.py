"""The prompt-only train step: what changes, what it costs, what it cannot see, that it learns."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as train_lib
from prompt_tuning.training.objective import EncoderDecoderModel
from tests.conftest import tiny_config

RNG = jax.random.PRNGKey(0)


def _batch(batch=4, inputs=12, targets=6, vocab=64, seed=0):
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, vocab, (batch, inputs)).astype(np.int32)
  tgt = rs.randint(2, vocab, (batch, targets)).astype(np.int32)
  for i in range(batch):  # ragged lengths with EOS then padding
    n_in, n_t = inputs - i, targets - (i % 3)
    enc[i, n_in - 1], enc[i, n_in:] = 1, 0
    tgt[i, n_t - 1], tgt[i, n_t:] = 1, 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def _setup(cfg=None, prompt_length=5, patterns=optimizers.PROMPT_PATTERNS, tx=None):
  cfg = cfg or tiny_config()
  module = T5(cfg, prompt=PromptConfig(length=prompt_length))
  batch = _batch(vocab=cfg.vocab_size)
  params = nn.meta.unbox(module.init(RNG, batch["encoder_input_tokens"],
                                     batch["decoder_input_tokens"])["params"])
  trainable, frozen = optimizers.split_params(params, patterns)
  tx = tx or optimizers.prompt_tuning_optimizer()
  model = EncoderDecoderModel(module)
  return model, tx, trainable, frozen, batch


def test_only_the_prompt_changes_and_frozen_params_are_byte_identical():
  model, tx, trainable, frozen, batch = _setup()
  frozen_before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), frozen)
  prompt_before = np.asarray(trainable["encoder"]["prompt"]["prompt"]).copy()
  state = train_lib.create_train_state(trainable, tx)
  step = train_lib.jit_train_step(model, tx)
  for _ in range(3):
    state, metrics = step(state, frozen, batch, RNG)
  assert bool(metrics["finite"])
  assert int(state.step) == 3
  # The optimizer only ever saw the prompt: its state holds no frozen-weight leaves.
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  assert n_state <= 2 * prompt_before.size + 4
  assert not np.allclose(np.asarray(state.params["encoder"]["prompt"]["prompt"]), prompt_before)
  flat_before = jax.tree_util.tree_leaves_with_path(frozen_before)
  flat_after = dict(jax.tree_util.tree_leaves_with_path(frozen))
  for path, before in flat_before:
    after = np.asarray(flat_after[path])
    assert after.tobytes() == before.tobytes(), jax.tree_util.keystr(path)


def test_frozen_params_have_no_optimizer_state_in_model_tuning_mode_either():
  """Model tuning trains everything: then every parameter has state (the baseline)."""
  model, _, trainable, frozen, batch = _setup(patterns=optimizers.ALL_PATTERNS)
  assert frozen == {}
  tx = optimizers.model_tuning_optimizer()
  state = train_lib.create_train_state(trainable, tx)
  state, metrics = train_lib.jit_train_step(model, tx)(state, frozen, batch, RNG)
  assert bool(metrics["finite"])


def _flops(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_prompt_step_costs_at_most_072_of_full_finetuning(num_microbatches):
  """No weight gradients for the frozen model: compiled FLOPs well under a full step's."""
  cfg = tiny_config(vocab_size=256, d_model=64, d_kv=16, num_heads=4, d_ff=128)
  model, tx, trainable, frozen, batch = _setup(cfg, prompt_length=8)
  batch = _batch(batch=8, inputs=32, targets=8, vocab=256)
  state = train_lib.create_train_state(trainable, tx)
  prompt_fn = lambda s, f, b, r: train_lib.train_step(
      s, f, b, r, model=model, tx=tx, num_microbatches=num_microbatches)
  prompt_flops = _flops(prompt_fn, state, frozen, batch, RNG)

  all_params = optimizers.merge_params(trainable, frozen)
  tx_full = optimizers.model_tuning_optimizer()
  full_state = train_lib.create_train_state(all_params, tx_full)
  full_fn = lambda s, f, b, r: train_lib.train_step(
      s, f, b, r, model=model, tx=tx_full, num_microbatches=num_microbatches)
  full_flops = _flops(full_fn, full_state, {}, batch, RNG)
  ratio = prompt_flops / full_flops
  print(f"microbatches={num_microbatches} prompt={prompt_flops:.3e} full={full_flops:.3e} "
        f"ratio={ratio:.3f}")
  assert ratio <= 0.72


def test_pad_tokens_cannot_influence_loss_or_prompt_gradient():
  """Changing the ids at padded encoder positions and padded targets changes nothing."""
  model, _, trainable, frozen, batch = _setup()

  @jax.jit
  def loss_and_grad(b):
    def f(tr):
      return model.loss_fn(optimizers.merge_params(tr, frozen), b)[0]
    return jax.value_and_grad(f)(trainable)

  loss, grad = loss_and_grad(batch)
  noisy = dict(batch)
  enc = batch["encoder_input_tokens"].copy()
  # Scribble over the padding; the validity mask comes from the ids, so emulate "garbage behind
  # the mask" by keeping pads (0) but changing the padded *targets* and decoder inputs past EOS.
  tgt = batch["decoder_target_tokens"].copy()
  pad_t = tgt == 0
  tgt[pad_t] = 7
  noisy["decoder_target_tokens"] = tgt  # loss weights stay 0 there
  dec = batch["decoder_input_tokens"].copy()
  dec[:, 1:][pad_t[:, :-1]] = 9  # decoder inputs after EOS (causal: cannot affect earlier steps)
  noisy["decoder_input_tokens"] = dec
  noisy["encoder_input_tokens"] = enc
  loss2, grad2 = loss_and_grad(noisy)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(grad2["encoder"]["prompt"]["prompt"],
                             grad["encoder"]["prompt"]["prompt"], atol=1e-7)

  # Padding *length* in the encoder: extra pad columns change nothing either.
  wider = dict(batch)
  wider["encoder_input_tokens"] = np.pad(batch["encoder_input_tokens"], ((0, 0), (0, 5)))
  loss3, grad3 = loss_and_grad(wider)
  np.testing.assert_allclose(loss3, loss, rtol=1e-5)
  np.testing.assert_allclose(grad3["encoder"]["prompt"]["prompt"],
                             grad["encoder"]["prompt"]["prompt"], atol=1e-6)


def test_microbatching_matches_full_batch_gradient():
  model, tx, trainable, frozen, batch = _setup()
  state = train_lib.create_train_state(trainable, tx)
  s1, m1 = jax.jit(lambda s: train_lib.train_step(s, frozen, batch, RNG, model=model, tx=tx))(
      state)
  s2, m2 = jax.jit(lambda s: train_lib.train_step(s, frozen, batch, RNG, model=model, tx=tx,
                                                  num_microbatches=2))(state)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(s2.params["encoder"]["prompt"]["prompt"],
                             s1.params["encoder"]["prompt"]["prompt"], atol=1e-5)


def test_nonfinite_batch_is_skipped_when_asked():
  model, tx, trainable, frozen, batch = _setup()
  state = train_lib.create_train_state(trainable, tx)
  bad = jax.tree_util.tree_map(lambda x: x, frozen)
  bad["token_embedder"]["embedding"] = frozen["token_embedder"]["embedding"] * jnp.nan
  before = np.asarray(state.params["encoder"]["prompt"]["prompt"]).copy()
  new, metrics = train_lib.jit_train_step(model, tx, skip_nonfinite=True)(state, bad, batch, RNG)
  assert not bool(metrics["finite"])
  np.testing.assert_array_equal(new.params["encoder"]["prompt"]["prompt"], before)


def test_bfloat16_frozen_storage_trains():
  model, tx, trainable, frozen, batch = _setup()
  frozen16 = optimizers.cast_floats(frozen, jnp.bfloat16)
  state = train_lib.create_train_state(trainable, tx)
  state, metrics = train_lib.jit_train_step(model, tx)(state, frozen16, batch, RNG)
  assert bool(metrics["finite"])
  assert state.params["encoder"]["prompt"]["prompt"].dtype == jnp.float32


def test_prompt_overfits_a_fixed_batch():
  """A tiny random frozen model: the prompt alone halves the loss within 200 steps."""
  cfg = tiny_config(d_model=64, d_kv=16, num_heads=4, d_ff=128)
  model, tx, trainable, frozen, batch = _setup(cfg, prompt_length=16)
  state = train_lib.create_train_state(trainable, tx)
  step = train_lib.jit_train_step(model, tx)
  first = None
  for i in range(200):
    state, metrics = step(state, frozen, batch, RNG)
    if first is None:
      first = float(metrics["loss"])
    if float(metrics["loss"]) < first / 2:
      break
  print(f"loss {first:.3f} -> {float(metrics['loss']):.3f} after {i + 1} steps")
  assert float(metrics["loss"]) < first / 2
