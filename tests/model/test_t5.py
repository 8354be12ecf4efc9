"""Model behaviour: shapes, masking, the key/value cache, partitioned execution, dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.model import layers
from prompt_tuning.model import partitioning
from tests.conftest import tiny_config

ENC = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 1, 0, 0],
                [3, 4, 5, 6, 7, 1]], np.int32)
DEC = np.array([[0, 3, 4, 5, 1], [0, 6, 7, 1, 0], [0, 8, 1, 0, 0], [0, 2, 3, 4, 5]], np.int32)


def _init(model, enc=ENC, dec=DEC, seed=0):
  variables = model.init(jax.random.PRNGKey(seed), enc, dec)
  return nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("activations,tied", [(("gelu", "linear"), False), (("relu",), True)])
def test_forward_shapes_and_dtype(activations, tied):
  cfg = tiny_config(mlp_activations=activations, tie_word_embeddings=tied)
  model = T5(cfg)
  params = _init(model)
  logits = model.apply({"params": params}, ENC, DEC)
  assert logits.shape == (4, 5, cfg.vocab_size) and logits.dtype == jnp.float32
  assert ("logits_dense" in params["decoder"]) == (not tied)
  assert ("wi" in params["encoder"]["layers_0"]["mlp"]) == tied


def test_pad_tokens_cannot_change_encoder_outputs():
  """Whatever the pad embedding holds, valid encoder outputs are unchanged and pads are zero."""
  model = T5(tiny_config(), prompt=PromptConfig(length=3))
  params = _init(model)
  perturbed = jax.tree_util.tree_map(lambda x: x, params)
  perturbed["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[0].add(100.)
  out = np.asarray(model.apply({"params": params}, ENC, method=T5.encode))
  out2 = np.asarray(model.apply({"params": perturbed}, ENC, method=T5.encode))
  valid = np.asarray(model.apply({"params": params}, ENC, method=T5.encoder_valid))
  assert valid.shape == (4, 3 + ENC.shape[1]) and valid[:, :3].all()
  np.testing.assert_allclose(out[valid], out2[valid], atol=1e-5)
  assert np.all(out2[~valid] == 0.0)


def test_cached_decoding_matches_teacher_forcing():
  cfg = tiny_config(num_decoder_layers=3)
  model = T5(cfg, prompt=PromptConfig(length=2))
  params = _init(model)
  full = model.apply({"params": params}, ENC, DEC)
  cache = model.init(jax.random.PRNGKey(0), ENC, DEC, decode=True)["cache"]
  encoded = model.apply({"params": params}, ENC, method=T5.encode)
  steps = []
  for t in range(DEC.shape[1]):
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded, ENC,
                                  DEC[:, t:t + 1], decode=True, method=T5.decode,
                                  mutable=["cache"])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_decoder_is_causal():
  """Changing a later decoder input cannot change earlier logits."""
  model = T5(tiny_config())
  params = _init(model)
  a = model.apply({"params": params}, ENC, DEC)
  dec2 = DEC.copy()
  dec2[:, 3] = 17
  b = model.apply({"params": params}, ENC, dec2)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert not np.allclose(a[:, 3:], b[:, 3:])


def test_relative_position_buckets_reference_values():
  # Worked by hand from T5's definition: bidirectional, 8 buckets (4 per direction, 2 exact),
  # max distance 16; e.g. distance 6: 2 + floor(log(6/2) / log(16/2) * 2) = 3 -> bucket 4+3.
  b = layers.relative_position_buckets(1, 12, bidirectional=True, num_buckets=8,
                                          max_distance=16)
  assert b.tolist() == [[0, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7]]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(bidirectional):
  torch = pytest.importorskip("torch")
  from transformers.models.t5.modeling_t5 import T5Attention
  for buckets, distance in [(32, 128), (8, 16), (4, 8)]:
    ours = layers.relative_position_buckets(300, 300, bidirectional=bidirectional,
                                               num_buckets=buckets, max_distance=distance)
    ctx = torch.arange(300)[:, None]
    mem = torch.arange(300)[None, :]
    ref = T5Attention._relative_position_bucket(mem - ctx, bidirectional=bidirectional,
                                                num_buckets=buckets, max_distance=distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_segment_ids_are_rejected():
  model = T5(tiny_config(), prompt=PromptConfig(length=2))
  params = _init(model)
  with pytest.raises(ValueError, match="Packed examples"):
    model.apply({"params": params}, ENC, DEC, encoder_segment_ids=np.ones_like(ENC))


def test_sharded_forward_equals_single_device():
  """Data 4 x model 2 over 8 simulated CPU devices gives the single-device logits."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  cfg = tiny_config(num_heads=4, d_ff=32, vocab_size=64)
  model = T5(cfg, prompt=PromptConfig(length=4))
  boxed = model.init(jax.random.PRNGKey(1), ENC, DEC)["params"]
  params = nn.meta.unbox(boxed)
  expected = jax.jit(lambda p: model.apply({"params": p}, ENC, DEC))(params)

  part = partitioning.Partitioner.create(mesh_shape=(4, 2), parameter_partitioning_dims=2)
  shardings = part.shardings_from_boxed(boxed)
  sharded_params = partitioning.place(params, shardings)
  # Sanity: an MLP kernel really is split over 'model', the prompt replicated.
  wi = sharded_params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  assert sharded_params["encoder"]["prompt"]["prompt"].sharding.is_fully_replicated
  with part.activate():
    batch = part.shard_batch({"enc": ENC, "dec": DEC})
    got = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))(
        sharded_params, batch["enc"], batch["dec"])
  assert got.sharding.spec[0] == "data"
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_batch_not_divisible_by_data_devices_is_a_clear_error():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  part = partitioning.Partitioner.create(mesh_shape=(4, 2))
  with pytest.raises(ValueError, match="not divisible"):
    part.shard_batch({"x": np.zeros((6, 3), np.int32)})


def test_bfloat16_activations_close_to_float32():
  cfg = tiny_config()
  params = _init(T5(cfg))
  f32 = T5(cfg).apply({"params": params}, ENC, DEC)
  bf16 = T5(cfg.replace(dtype="bfloat16")).apply({"params": params}, ENC, DEC)
  assert bf16.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(bf16) - np.asarray(f32))) < 0.1


@pytest.mark.parametrize("combine", ["prefix", "prefix_after_bos", "suffix_before_eos", "suffix"])
def test_every_combination_ignores_pads_and_attends_the_prompt(combine):
  """Per mode: the prompt rows are valid encoder positions that change the output; neither the
  pad embedding nor extra pad columns change the logits; encoder outputs at pads are zero."""
  model = T5(tiny_config(), prompt=PromptConfig(length=3, combine=combine))
  params = _init(model)
  logits = np.asarray(model.apply({"params": params}, ENC, DEC))
  valid = np.asarray(model.apply({"params": params}, ENC, method=T5.encoder_valid))
  n = (ENC != 0).sum(1)
  np.testing.assert_array_equal(valid.sum(1), n + 3)
  if combine == "suffix":  # input with its EOS, then the prompt, then the pads
    np.testing.assert_array_equal(valid, np.arange(ENC.shape[1] + 3)[None] < (n + 3)[:, None])

  # The pad embedding (id 0 is also the decoder's start token, so compare the encoder).
  perturbed = jax.tree_util.tree_map(lambda x: x, params)
  perturbed["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[0].add(100.)
  encoded = np.asarray(model.apply({"params": params}, ENC, method=T5.encode))
  np.testing.assert_allclose(
      np.asarray(model.apply({"params": perturbed}, ENC, method=T5.encode))[valid],
      encoded[valid], atol=1e-5)
  padded = np.pad(ENC, ((0, 0), (0, 4)))
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, padded, DEC)), logits,
                             atol=1e-4)
  encoded = np.asarray(model.apply({"params": perturbed}, padded, method=T5.encode))
  padded_valid = np.asarray(model.apply({"params": params}, padded, method=T5.encoder_valid))
  assert np.all(encoded[~padded_valid] == 0.0)

  moved = jax.tree_util.tree_map(lambda x: x, params)
  moved["encoder"]["prompt"]["prompt"] = params["encoder"]["prompt"]["prompt"] + 1.0
  changed = np.asarray(model.apply({"params": moved}, ENC, DEC))
  assert np.abs(changed - logits).max() > 1e-3  # every example sees the prompt
  assert (np.abs(changed - logits).max(axis=(1, 2)) > 1e-3).all()
