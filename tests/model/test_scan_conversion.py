"""Scale options keep numerics: scanned layers (with layout conversion) and remat policies."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.inference import decoding
from prompt_tuning.training import optimizers
from prompt_tuning.model import scan_conversion
from prompt_tuning.training.objective import EncoderDecoderModel
from tests.conftest import tiny_config

ENC = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 1, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4, 5, 1], [0, 6, 7, 1, 0], [0, 8, 1, 0, 0]], np.int32)
BATCH = {"encoder_input_tokens": ENC, "decoder_input_tokens": DEC,
         "decoder_target_tokens": np.concatenate([DEC[:, 1:], np.zeros((3, 1), np.int32)], 1)}


def _config(**kw):
  # Three decoder layers: a stack of more than two catches mixed-up layer order.
  return tiny_config(num_decoder_layers=3, **kw)


@functools.lru_cache(maxsize=None)
def _per_layer_params():
  model = T5(_config(), prompt=PromptConfig(length=3))
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), ENC, DEC)["params"])


def _leaves(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_scanned_init_has_the_converted_layout_with_a_layers_axis():
  model = T5(_config(scan_layers=True), prompt=PromptConfig(length=3))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), ENC, DEC)["params"]
  converted = scan_conversion.to_scanned(_per_layer_params(), _config())
  shapes = {k: v.shape for k, v in _leaves(nn.meta.unbox(boxed)).items()}
  assert shapes == {k: v.shape for k, v in _leaves(converted).items()}
  assert shapes["decoder/layers/mlp/wi_0/kernel"] == (3, 16, 32)
  axes = _leaves(nn.get_partition_spec(boxed))
  assert tuple(axes["encoder/layers/attention/query/kernel"]) == ("layers", "embed", "joined_kv")
  assert tuple(axes["encoder/prompt/prompt"]) == ("prompt", "prompt_embed")


def test_conversion_round_trips_exactly():
  params = _per_layer_params()
  cfg = _config()
  back = scan_conversion.to_per_layer(scan_conversion.to_scanned(params, cfg), cfg)
  a, b = _leaves(params), _leaves(back)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  assert scan_conversion.for_config(params, cfg) is params
  with pytest.raises(ValueError, match="layers_0..layers_3"):
    scan_conversion.to_scanned(params, cfg.replace(num_decoder_layers=4))


def test_scanned_model_gives_the_unscanned_logits():
  params = _per_layer_params()
  cfg = _config()
  scanned_cfg = cfg.replace(scan_layers=True)
  expected = T5(cfg, prompt=PromptConfig(length=3)).apply({"params": params}, ENC, DEC)
  got = T5(scanned_cfg, prompt=PromptConfig(length=3)).apply(
      {"params": scan_conversion.for_config(params, scanned_cfg)}, ENC, DEC)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_scanned_model_decodes_like_the_unscanned_one():
  """Greedy and beam search through the scanned cache and cross-attention keys/values."""
  params = _per_layer_params()
  cfg = _config()
  plain = T5(cfg, prompt=PromptConfig(length=3))
  scanned = T5(cfg.replace(scan_layers=True), prompt=PromptConfig(length=3))
  scanned_params = scan_conversion.to_scanned(params, cfg)
  for fn in (functools.partial(decoding.greedy, max_decode_length=6),
             functools.partial(decoding.beam_search, max_decode_length=6, num_beams=2)):
    tokens, scores = fn(plain, params, ENC)
    tokens_s, scores_s = fn(scanned, scanned_params, ENC)
    np.testing.assert_array_equal(np.asarray(tokens_s), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(scores_s), np.asarray(scores), atol=1e-5)


def _loss_and_prompt_grad(cfg, params):
  model = EncoderDecoderModel(T5(cfg, prompt=PromptConfig(length=3)))
  trainable, frozen = optimizers.split_params(params)

  @jax.jit
  def f(trainable):
    return model.loss_fn(optimizers.merge_params(trainable, frozen), BATCH)[0]
  loss, grad = jax.value_and_grad(f)(trainable)
  return float(loss), np.asarray(grad["encoder"]["prompt"]["prompt"])


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_loss_and_prompt_gradient(scan):
  """Rematerialisation changes what is stored for the backward pass, never the numbers."""
  cfg = _config(scan_layers=scan)
  params = scan_conversion.for_config(_per_layer_params(), cfg)
  loss, grad = _loss_and_prompt_grad(cfg, params)
  assert np.abs(grad).max() > 0
  for policy in ("full", "dots"):
    loss_p, grad_p = _loss_and_prompt_grad(cfg.replace(remat_policy=policy), params)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    np.testing.assert_allclose(grad_p, grad, atol=1e-6)


def test_scanned_training_matches_unscanned_gradient():
  cfg = _config()
  loss, grad = _loss_and_prompt_grad(cfg, _per_layer_params())
  scanned_cfg = cfg.replace(scan_layers=True)
  loss_s, grad_s = _loss_and_prompt_grad(
      scanned_cfg, scan_conversion.to_scanned(_per_layer_params(), cfg))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  np.testing.assert_allclose(grad_s, grad, atol=1e-5)
