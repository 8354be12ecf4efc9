"""Checkpoint loading and writing: HF parity, the T5X legacy fixture, orbax, refusals."""
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.formats import hf as hf_format
from prompt_tuning.formats import pretrained
from prompt_tuning.model.config import T5Config
from prompt_tuning.model.t5 import T5
from tests.conftest import fixture_path, tiny_config

V = 100  # vocabulary of the random HF models
HF_SHAPE = dict(vocab_size=V, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                num_decoder_layers=3, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0)
# The fixture's architecture (../shared/fixtures/README.md).
T5X_TINY = T5Config(vocab_size=32128, d_model=4, d_kv=2, d_ff=8, num_heads=2, num_encoder_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=4,
                    relative_attention_max_distance=8)


def _flat(params):
  return flax.traverse_util.flatten_dict(params)


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def _batch():
  """Encoder inputs with trailing pads, targets padded with 0, decoder inputs starting with 0."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, V, (3, 12))
  inputs[0, 9:] = 0
  inputs[1, 5:] = 0
  targets = rng.integers(2, V, (3, 7))
  targets[1, 4:] = 0
  targets[2, 2:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _ours(model, params, inputs, decoder_inputs, targets):
  """Logits and mean cross-entropy over non-pad targets."""
  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(inputs),
                                           jnp.asarray(decoder_inputs)))
  logp = np.asarray(jax.nn.log_softmax(logits))
  nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return logits, nll[targets != 0].mean()


# ----------------------------------------------------------------------------------------------
# HF


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def _hf_model(hf, kind):
  """A random HF T5 in eval mode. transformers 5 always ties lm_head to shared at construction,
  so a truly untied T5 1.1 gets its own lm_head here (what a converted T5 1.1 checkpoint holds)."""
  torch, transformers = hf
  if kind == "t5_1_0":
    cfg = transformers.T5Config(feed_forward_proj="relu", tie_word_embeddings=True, **HF_SHAPE)
  else:
    cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                **HF_SHAPE)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if kind == "t5_1_1":
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, HF_SHAPE["d_model"]))
    model.all_tied_weights_keys.pop("lm_head.weight", None)
  return model


def _write_hf(hf, model, folder, fmt):
  torch, _ = hf
  if fmt == "safetensors":
    model.save_pretrained(folder)
  elif fmt == "sharded":
    model.save_pretrained(folder, max_shard_size="20KB")
    assert os.path.exists(os.path.join(folder, hf_format.HF_SAFETENSORS_INDEX))
  else:  # what transformers 4 wrote: every state-dict entry (aliases too), config says tie: false
    os.makedirs(folder)
    torch.save(model.state_dict(), os.path.join(folder, hf_format.HF_TORCH))
    cfg = model.config.to_dict()
    cfg["tie_word_embeddings"] = bool(cfg.pop("scale_decoder_outputs"))
    with open(os.path.join(folder, hf_format.HF_CONFIG), "w") as f:
      json.dump(cfg, f)


@pytest.mark.parametrize("kind,fmt", [
    ("t5_1_0", "safetensors"), ("t5_1_0", "torch_bin"), ("t5_1_1", "safetensors"),
    ("t5_1_1", "sharded"), ("t5_1_1", "torch_bin"),
    # transformers 5's own T5 1.1: lm_head *is* shared, but logits are not scaled.
    ("t5_1_1_tied_unscaled", "safetensors"),
])
def test_hf_parity(hf, tmp_path, kind, fmt):
  """Our model on converted HF weights gives HF's logits and loss at every non-pad target."""
  torch, _ = hf
  hf_model = _hf_model(hf, kind)
  folder = str(tmp_path / "hf")
  _write_hf(hf, hf_model, folder, fmt)
  inputs, decoder_inputs, targets = _batch()
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                   decoder_input_ids=torch.tensor(decoder_inputs),
                   labels=torch.tensor(np.where(targets == 0, -100, targets)))

  model, params = pretrained.load_pretrained(folder)
  assert model.config.mlp_activations == (("relu",) if kind == "t5_1_0" else ("gelu", "linear"))
  assert model.config.tie_word_embeddings == (kind == "t5_1_0")
  logits, loss = _ours(model, params, inputs, decoder_inputs, targets)
  valid = targets != 0
  diff = np.abs(logits - out.logits.numpy())[valid].max()
  print(f"\nHF parity {kind}/{fmt}: max |logit diff| = {diff:.3g}, "
        f"loss ours {loss:.6f} vs HF {out.loss.item():.6f}")
  assert diff <= 1e-4
  assert abs(loss - out.loss.item()) <= 1e-4


def test_hf_bfloat16_weights_and_dtype(hf, tmp_path):
  """bfloat16 safetensors (which numpy cannot read) load, and `dtype` casts every array."""
  torch, _ = hf
  hf_model = _hf_model(hf, "t5_1_1").to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "hf")
  _, params32 = pretrained.load_pretrained(tmp_path / "hf")
  _, params16 = pretrained.load_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
  assert {np.asarray(v).dtype for v in _flat(params16).values()} == {jnp.dtype(jnp.bfloat16)}
  assert {np.asarray(v).dtype for v in _flat(params32).values()} == {np.dtype(np.float32)}
  expected = hf_model.shared.weight.detach().float().numpy()
  np.testing.assert_array_equal(params32["token_embedder"]["embedding"], expected)


def test_hf_mismatch_lists_everything(hf, tmp_path):
  """A missing tensor and an unknown tensor are reported together, by name."""
  from safetensors.numpy import load_file, save_file
  hf_model = _hf_model(hf, "t5_1_1")
  folder = tmp_path / "hf"
  hf_model.save_pretrained(folder)
  tensors = load_file(folder / hf_format.HF_SAFETENSORS)
  del tensors["decoder.block.2.layer.1.EncDecAttention.k.weight"]
  tensors["encoder.block.0.layer.0.SelfAttention.bogus.weight"] = np.zeros(3, np.float32)
  save_file(tensors, folder / hf_format.HF_SAFETENSORS, metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(folder)
  assert "decoder/layers_2/encoder_decoder_attention/key/kernel" in str(e.value)
  assert "encoder.block.0.layer.0.SelfAttention.bogus.weight" in str(e.value)


def test_hf_refuses_shard_outside_folder(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / hf_format.HF_CONFIG).write_text(json.dumps(tiny_config().to_hf_dict()))
  (folder / hf_format.HF_SAFETENSORS_INDEX).write_text(json.dumps(
      {"weight_map": {"shared.weight": "../elsewhere.safetensors"}}))
  with pytest.raises(ValueError, match="elsewhere"):
    pretrained.load_pretrained(folder)


@pytest.mark.parametrize("tied", [False, True], ids=["t5_1_1", "t5_1_0"])
def test_export_hf_loads_in_transformers(hf, tmp_path, tied):
  """export_hf writes a folder transformers loads with our logits; re-importing it is exact."""
  torch, transformers = hf
  cfg = tiny_config(vocab_size=V, tie_word_embeddings=tied,
                    mlp_activations=("relu",) if tied else ("gelu", "linear"))
  model = T5(cfg)
  inputs, decoder_inputs, targets = _batch()
  params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.asarray(inputs),
                                            jnp.asarray(decoder_inputs)))["params"]
  pretrained.export_hf(tmp_path / "hf", cfg, params)
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left behind

  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    hf_logits = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                         decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()
  logits, _ = _ours(model, params, inputs, decoder_inputs, targets)
  diff = np.abs(logits - hf_logits)[targets != 0].max()
  print(f"\nexport_hf {'tied' if tied else 'untied'}: max |logit diff| = {diff:.3g}")
  assert diff <= 1e-4

  model2, params2 = pretrained.load_pretrained(tmp_path / "hf")
  assert model2.config == cfg
  _assert_trees_equal(params2, params)


# ----------------------------------------------------------------------------------------------
# T5X legacy


def _copy_fixture(tmp_path):
  src = fixture_path("t5x_tiny", "checkpoint_3")
  dst = tmp_path / "checkpoint_3"
  shutil.copytree(src, dst)
  return dst


def _edit_msgpack(ckpt_dir, edit):
  from flax import serialization
  path = ckpt_dir / "checkpoint"
  state = serialization.msgpack_restore(path.read_bytes())
  edit(state["optimizer"]["target"])
  path.write_bytes(serialization.msgpack_serialize(state))


def test_t5x_fixture_loads_completely():
  """Every parameter of the fixture loads, equal to what tensorstore reads from its zarr folder."""
  import tensorstore as ts
  from flax import serialization
  ckpt = fixture_path("t5x_tiny", "checkpoint_3")
  model, params = pretrained.load_pretrained(ckpt, config=T5X_TINY)
  _assert_trees_equal(params, pretrained.load_pretrained(ckpt / "checkpoint", config=T5X_TINY)[1])
  _assert_trees_equal(params, pretrained.load_pretrained(ckpt.parent, config=T5X_TINY)[1])

  target = serialization.msgpack_restore((ckpt / "checkpoint").read_bytes())["optimizer"]["target"]
  stored = flax.traverse_util.flatten_dict(target, is_leaf=lambda _, v: "driver" in v)
  flat = _flat(params)
  assert sorted(flat) == sorted(pretrained.expected_shapes(T5X_TINY))
  assert sorted(flat) == sorted(stored)
  n_zarr = 0
  for key, value in stored.items():
    if isinstance(value, dict):
      folder = ckpt / ("target." + ".".join(key))
      direct = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}},
                       open=True).result().read().result()
      n_zarr += 1
    else:
      direct = value
    np.testing.assert_array_equal(flat[key], direct, err_msg="/".join(key))
  assert n_zarr > 0

  rng = np.random.default_rng(0)
  inputs = jnp.asarray(np.where(np.arange(10) < 7, rng.integers(2, 32100, (2, 10)), 0))
  logits = model.apply({"params": params}, inputs, jnp.zeros((2, 4), jnp.int32))
  assert logits.shape == (2, 4, 32128)
  assert np.isfinite(np.asarray(logits)).all()


def test_t5x_needs_config():
  with pytest.raises(ValueError, match="config="):
    pretrained.load_pretrained(fixture_path("t5x_tiny", "checkpoint_3"))


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "target.x/../../../etc"])
def test_t5x_refuses_paths_outside_checkpoint(tmp_path, evil):
  """A msgpack naming an array outside the checkpoint folder is refused before anything is read."""
  ckpt = _copy_fixture(tmp_path)

  def edit(target):
    target["encoder"]["layers_0"]["attention"]["key"]["kernel"]["kvstore"]["path"] = evil

  _edit_msgpack(ckpt, edit)
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(ckpt, config=T5X_TINY)
  assert "encoder/layers_0/attention/key/kernel" in str(e.value)
  assert evil in str(e.value)


def test_t5x_refuses_symlink_out_of_checkpoint(tmp_path):
  ckpt = _copy_fixture(tmp_path)
  folder = ckpt / "target.encoder.layers_0.attention.key.kernel"
  outside = tmp_path / "outside"
  shutil.move(folder, outside)
  os.symlink(outside, folder)
  with pytest.raises(ValueError, match="outside"):
    pretrained.load_pretrained(ckpt, config=T5X_TINY)


def test_t5x_missing_parameters_are_listed(tmp_path):
  ckpt = _copy_fixture(tmp_path)

  def edit(target):
    del target["decoder"]["layers_1"]["mlp"]["wo"]
    del target["encoder"]["relpos_bias"]

  _edit_msgpack(ckpt, edit)
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(ckpt, config=T5X_TINY)
  assert "missing (2)" in str(e.value)
  assert "decoder/layers_1/mlp/wo/kernel" in str(e.value)
  assert "encoder/relpos_bias/rel_embedding" in str(e.value)


def test_t5x_other_model_size_is_a_shape_error():
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(fixture_path("t5x_tiny", "checkpoint_3"),
                               config=T5X_TINY.replace(d_ff=16))
  assert "wrong shape (12)" in str(e.value)
  assert "encoder/layers_0/mlp/wi_0/kernel: checkpoint (4, 8), model (4, 16)" in str(e.value)
  assert "another model size" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Orbax


def _init(cfg):
  tokens = jnp.ones((1, 3), jnp.int32)
  return flax.linen.meta.unbox(T5(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"]


def test_save_pretrained_round_trip_is_exact(tmp_path):
  cfg = tiny_config(dropout_rate=0.1)
  model = T5(cfg)
  params = _init(cfg)
  pretrained.save_pretrained(tmp_path / "ours", model, params)
  assert sorted(os.listdir(tmp_path)) == ["ours"]
  model2, params2 = pretrained.load_pretrained(tmp_path / "ours")
  assert model2.config == cfg
  _assert_trees_equal(params2, params)

  with pytest.raises(FileExistsError):
    pretrained.save_pretrained(tmp_path / "ours", model, params)
  params_b = jax.tree.map(lambda x: x + 1, params)
  pretrained.save_pretrained(tmp_path / "ours", model, params_b, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ours"]
  _assert_trees_equal(pretrained.load_pretrained(tmp_path / "ours")[1], params_b)


def test_generic_orbax_train_state(tmp_path):
  """A T5X-style orbax run folder (params under `target`) loads given a config, and only then."""
  import orbax.checkpoint as ocp
  cfg = tiny_config()
  params = _init(cfg)
  state = {"target": params, "state": {"step": np.int32(7),
                                       "param_states": jax.tree.map(np.zeros_like, params)}}
  manager = ocp.CheckpointManager(tmp_path / "run",
                                  options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
  for step in (3, 7):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(ValueError, match="config="):
    pretrained.load_pretrained(tmp_path / "run" / "checkpoint_7")
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoint_7",
               tmp_path / "run" / "checkpoint_7" / "state"):
    _, loaded = pretrained.load_pretrained(path, config=cfg)
    _assert_trees_equal(loaded, params)
  with pytest.raises(ValueError, match="wrong shape"):
    pretrained.load_pretrained(tmp_path / "run", config=cfg.replace(d_model=32))

  # A bare PyTree with `state/params` (a flax TrainState-like tree).
  ocp.PyTreeCheckpointer().save(tmp_path / "bare", {"state": {"params": params, "step": 1}})
  _assert_trees_equal(pretrained.load_pretrained(tmp_path / "bare", config=cfg)[1], params)


def test_config_argument_forms(tmp_path):
  cfg = tiny_config()
  params = _init(cfg)
  pretrained.save_pretrained(tmp_path / "ours", T5(cfg), params)
  for config in (cfg, cfg.to_hf_dict()):
    model, _ = pretrained.load_pretrained(tmp_path / "ours", config=config)
    assert model.config.d_model == cfg.d_model
  with pytest.raises(TypeError):
    pretrained.load_pretrained(tmp_path / "ours", config=42)
  with pytest.raises(FileNotFoundError):
    pretrained.load_pretrained(tmp_path / "nothing_here")
