"""Prompt files: every format we read, what we refuse, and exact round trips through PEFT."""
import gzip
import json
import pathlib
import pickle

import numpy as np
import pytest
from flax import serialization

from prompt_tuning.formats import prompt_io
from prompt_tuning.formats.prompt_io import PromptFileError
from tests.conftest import fixture_path


class Planted:
  """Unpickling this creates `marker`: proof that a loader ran code from a file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def random_prompt(length=5, d_model=16, seed=0):
  return np.random.default_rng(seed).standard_normal((length, d_model)).astype(np.float32)


# ----- .npy and the original's exports -----

@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte"])
def test_released_prompts_load(task):
  path = fixture_path("pretrained_prompts", f"{task}.npy")
  prompt = prompt_io.load_prompt(path, expected_shape=(100, 768))
  assert prompt.dtype == np.float32 and prompt.shape == (100, 768)
  np.testing.assert_array_equal(prompt, np.load(path, allow_pickle=False))


def test_wrong_expected_shape_names_both_shapes_and_the_fix():
  path = fixture_path("pretrained_prompts", "sst2.npy")
  with pytest.raises(PromptFileError) as e:
    prompt_io.load_prompt(path, expected_shape=(20, 768))
  assert "sst2.npy" in str(e.value) and "(100, 768)" in str(e.value)
  assert "(20, 768)" in str(e.value) and "PROMPT_LENGTH = 100" in str(e.value)
  with pytest.raises(PromptFileError, match=r"d_model 768 \(T5 1.1 base\) but the model has 512"):
    prompt_io.load_prompt(path, expected_shape=(100, 512))


def test_float64_prompt_is_converted():
  path = fixture_path("prompt_5x256.npy")
  prompt = prompt_io.load_prompt(path)
  assert prompt.dtype == np.float32 and prompt.shape == (5, 256)
  np.testing.assert_array_equal(prompt, np.load(path).astype(np.float32))


def test_extension_less_numpy_export_loads(tmp_path):
  prompt = random_prompt()
  path = tmp_path / "encoder.prompt.prompt"  # what the original wrote every checkpoint
  with open(path, "wb") as f:
    np.save(f, prompt)
  np.testing.assert_array_equal(prompt_io.load_prompt(path), prompt)


def test_save_prompt_npy_writes_exactly_the_given_name(tmp_path):
  prompt = random_prompt().astype(np.float64)
  path = prompt_io.save_prompt_npy(tmp_path / "out" / "prompt", prompt)
  assert sorted(p.name for p in path.parent.iterdir()) == ["prompt"]  # no temp file left
  loaded = prompt_io.load_prompt(path)
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, prompt.astype(np.float32))


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3, 4), np.float32), r"shape \(2, 3, 4\) \(rank 3\), expected a rank-2"),
    (np.zeros((5,), np.float32), "rank 1"),
    (np.zeros((5, 4), np.int32), "dtype int32, expected a floating-point"),
    (np.full((2, 2), np.nan, np.float32), "NaN"),
])
def test_bad_arrays_are_refused_naming_the_file(tmp_path, array, message):
  path = tmp_path / "bad.npy"
  np.save(path, array)
  with pytest.raises(PromptFileError, match=message) as e:
    prompt_io.load_prompt(path)
  assert "bad.npy" in str(e.value)


# ----- never unpickle -----

def test_object_array_npy_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "planted.npy"
  np.save(path, np.array([Planted(marker)], dtype=object), allow_pickle=True)
  with pytest.raises(PromptFileError, match="planted.npy: refused"):
    prompt_io.load_prompt(path)
  assert not marker.exists()


def test_pickle_file_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "ran"
  for name in ("prompt", "prompt.pkl", "prompt.npy"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(PromptFileError, match="pickle files are never loaded"):
      prompt_io.load_prompt(path)
  assert not marker.exists()


def test_torch_bin_is_read_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "ran"
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  prompt = random_prompt()
  (adapter / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5, "token_dim": 16}))
  torch.save({"prompt_embeddings": torch.from_numpy(prompt)}, adapter / "adapter_model.bin")
  np.testing.assert_array_equal(prompt_io.load_prompt(adapter), prompt)
  np.testing.assert_array_equal(prompt_io.load_prompt(adapter / "adapter_model.bin"), prompt)
  torch.save({"prompt_embeddings": Planted(marker)}, adapter / "adapter_model.bin")
  with pytest.raises(PromptFileError, match=r"weights_only=True\) accepts"):
    prompt_io.load_prompt(adapter)
  assert not marker.exists()


# ----- safetensors and PEFT -----

def test_safetensors_file_bfloat16_and_bad_dtype(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  prompt = torch.randn(4, 8, dtype=torch.bfloat16)
  save_file({"prompt_embeddings": prompt}, tmp_path / "p.safetensors")
  np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "p.safetensors"),
                                prompt.float().numpy())
  save_file({"prompt_embeddings": torch.ones(4, 8, dtype=torch.int64)}, tmp_path / "i.safetensors")
  with pytest.raises(PromptFileError, match="dtype int64, expected a floating-point"):
    prompt_io.load_prompt(tmp_path / "i.safetensors")


def test_peft_export_loads_in_peft_and_round_trips_exactly(tmp_path):
  """Ours -> PEFT (config parsed, weights in the model) -> PEFT's own save -> ours: bit-exact."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  prompt = random_prompt(length=5, d_model=16)
  out = prompt_io.export_peft_adapter(tmp_path / "adapter", prompt, base_model_name_or_path="tiny",
                                      num_layers=2, num_attention_heads=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left
  config = peft.PromptTuningConfig.from_pretrained(str(out))
  assert (config.peft_type, config.task_type) == (peft.PeftType.PROMPT_TUNING, "SEQ_2_SEQ_LM")
  assert (config.num_virtual_tokens, config.token_dim, config.num_transformer_submodules) == (
      5, 16, 1)
  np.testing.assert_array_equal(prompt_io.load_prompt(out, expected_shape=(5, 16)), prompt)

  t5_config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                    num_decoder_layers=2, num_heads=2,
                                    feed_forward_proj="gated-gelu")
  torch.manual_seed(0)
  model = peft.PeftModel.from_pretrained(transformers.T5ForConditionalGeneration(t5_config),
                                         str(out))
  weights = model.prompt_encoder["default"].embedding.weight.detach().numpy()
  np.testing.assert_array_equal(weights, prompt)
  # No embedding-layer check: it would look up "tiny" on the Hub.
  model.save_pretrained(tmp_path / "resaved", save_embedding_layers=False)
  np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "resaved"), prompt)


def test_peft_seq2seq_default_takes_the_encoder_rows(tmp_path):
  """PEFT's own seq2seq default stores [2P, D] (encoder, then decoder); the prompt is [:P]."""
  pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  t5_config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                    num_decoder_layers=1, num_heads=2)
  model = peft.get_peft_model(transformers.T5ForConditionalGeneration(t5_config),
                              peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                      num_virtual_tokens=3))
  model.save_pretrained(tmp_path / "adapter")
  weights = model.prompt_encoder["default"].embedding.weight.detach().numpy()
  assert weights.shape == (6, 16)
  np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "adapter"), weights[:3])
  # The weights file on its own finds its sibling config.
  np.testing.assert_array_equal(
      prompt_io.load_prompt(tmp_path / "adapter" / "adapter_model.safetensors"), weights[:3])


def test_peft_decoder_block_is_left_out_loudly_and_ours_decodes_as_peft(tmp_path, caplog):
  """A real PEFT seq2seq adapter with num_transformer_submodules=2 ([2P, D]: encoder, then
  decoder block). PEFT itself never uses the decoder block (changing it changes nothing), so
  its rows [:P] reproduce PEFT: our greedy decode with the imported prompt equals PEFT's
  `generate`. Leaving the block out is logged, never silent; a row count that matches neither
  layout is refused."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import prompt_tuning
  from prompt_tuning import PromptConfig, T5
  from prompt_tuning.inference import decoding
  from prompt_tuning.prompts import initializers
  from tests.conftest import tiny_hf_t5
  hf_model = tiny_hf_t5()
  base_dir = tmp_path / "hf_t5"
  hf_model.save_pretrained(base_dir)
  model = peft.get_peft_model(hf_model, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                num_virtual_tokens=3)).eval()
  assert model.peft_config["default"].num_transformer_submodules == 2
  embedding = model.prompt_encoder["default"].embedding.weight
  with torch.no_grad():
    embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)))
  ids = torch.tensor([[5, 9, 33, 20, 7, 1, 0], [17, 2, 1, 0, 0, 0, 0], [40, 41, 42, 43, 1, 0, 0]])
  generate = dict(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=8,
                  do_sample=False, num_beams=1)
  labels = torch.tensor([[3, 4, 1], [6, 1, 0], [8, 9, 1]])
  with torch.no_grad():
    peft_tokens = model.generate(**generate).numpy()[:, 1:]
    logits = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    embedding[3:] += 5.0  # the decoder block: PEFT's outputs do not depend on it
    np.testing.assert_array_equal(model.generate(**generate).numpy()[:, 1:], peft_tokens)
    np.testing.assert_array_equal(
        model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits, logits)
  model.save_pretrained(tmp_path / "adapter")
  weights = embedding.detach().numpy()

  with caplog.at_level("WARNING"):
    prompt = prompt_io.load_prompt(tmp_path / "adapter", expected_shape=(3, 16))
  np.testing.assert_array_equal(prompt, weights[:3])
  assert "num_transformer_submodules=2" in caplog.text and "leaving out rows 3-5" in caplog.text
  assert "num_transformer_submodules=1" in caplog.text  # how to get an adapter without it

  frozen_model, frozen = prompt_tuning.load_pretrained(str(base_dir))
  ours = T5(frozen_model.config, prompt=PromptConfig(length=3))
  tokens, _ = decoding.greedy(ours, initializers.set_prompt(frozen, prompt), ids.numpy(),
                              max_decode_length=8)
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[:, :peft_tokens.shape[1]], peft_tokens)
  with torch.no_grad():  # the prompt matters, so the equality above says something
    plain = model.get_base_model().generate(**generate).numpy()[:, 1:]
  assert plain.shape != peft_tokens.shape or (plain != peft_tokens).any()

  # A single-block adapter is read without a warning; a count matching no layout is refused.
  caplog.clear()
  prompt_io.export_peft_adapter(tmp_path / "one", prompt, base_model_name_or_path="x",
                                num_layers=2, num_attention_heads=2)
  with caplog.at_level("WARNING"):
    np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "one"), prompt)
  assert not caplog.text
  config_path = tmp_path / "adapter" / "adapter_config.json"
  config = json.loads(config_path.read_text())
  config["num_transformer_submodules"] = 1  # but the tensor holds 6 rows
  config_path.write_text(json.dumps(config))
  with pytest.raises(PromptFileError, match="has 6 rows, expected num_virtual_tokens=3 times "
                                            "num_transformer_submodules=1"):
    prompt_io.load_prompt(tmp_path / "adapter")


def test_peft_folder_errors(tmp_path):
  prompt_io.export_peft_adapter(tmp_path / "a", random_prompt(), base_model_name_or_path="x",
                                num_layers=1, num_attention_heads=1)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    prompt_io.export_peft_adapter(tmp_path / "a", random_prompt(seed=1),
                                  base_model_name_or_path="x", num_layers=1,
                                  num_attention_heads=1)
  replacement = random_prompt(length=7, seed=1)
  prompt_io.export_peft_adapter(tmp_path / "a", replacement, base_model_name_or_path="x",
                                num_layers=1, num_attention_heads=1, overwrite=True)
  np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "a"), replacement)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

  config_path = tmp_path / "a" / "adapter_config.json"
  config = json.loads(config_path.read_text())
  config["peft_type"] = "LORA"
  config_path.write_text(json.dumps(config))
  with pytest.raises(PromptFileError, match="peft_type is 'LORA'"):
    prompt_io.load_prompt(tmp_path / "a")
  (tmp_path / "empty").mkdir()
  with pytest.raises(PromptFileError, match="without adapter_config.json"):
    prompt_io.load_prompt(tmp_path / "empty")
  with pytest.raises(PromptFileError, match="does not exist"):
    prompt_io.load_prompt(tmp_path / "missing.npy")


# ----- T5X -----

def test_t5x_fixture_tensorstore_array_is_read():
  """A zarr array of the shared T5X checkpoint (kvstore 'gfile') matches its raw chunk."""
  checkpoint = fixture_path("t5x_tiny", "checkpoint_3")
  kernel = prompt_io.extract_prompt_from_t5x(checkpoint, "target/encoder/layers_0/mlp/wo/kernel")
  folder = checkpoint / "target.encoder.layers_0.mlp.wo.kernel"
  raw = np.frombuffer(gzip.decompress((folder / "0.0").read_bytes()), "<f4").reshape(8, 4)
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, raw)
  with pytest.raises(PromptFileError, match="no array at 'encoder/prompt/prompt'"):
    prompt_io.extract_prompt_from_t5x(checkpoint)


def _write_t5x(folder, prompt_leaf):
  folder.mkdir(parents=True, exist_ok=True)
  state = {"version": 3, "optimizer": {
      "target": {"encoder": {"prompt": {"prompt": prompt_leaf}}},
      "state": {"step": np.array(7)}}}
  (folder / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  return folder


def test_t5x_inline_prompt_and_path_forms(tmp_path):
  prompt = random_prompt()
  checkpoint = _write_t5x(tmp_path / "checkpoint_7", prompt)
  for path in (("encoder", "prompt", "prompt"), "target/encoder/prompt/prompt",
               "optimizer/target/encoder/prompt/prompt"):
    np.testing.assert_array_equal(prompt_io.extract_prompt_from_t5x(checkpoint, path), prompt)
  np.testing.assert_array_equal(
      prompt_io.extract_prompt_from_t5x(checkpoint / "checkpoint", expected_shape=(5, 16)), prompt)
  with pytest.raises(PromptFileError, match="is a subtree"):
    prompt_io.extract_prompt_from_t5x(checkpoint, "target/encoder/prompt")


def test_t5x_tensorstore_prompt_inside_and_outside_the_folder(tmp_path):
  ts = pytest.importorskip("tensorstore")
  prompt = random_prompt()
  checkpoint = tmp_path / "ckpt" / "checkpoint_7"
  folder = checkpoint / "target.encoder.prompt.prompt"
  ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}},
          create=True, dtype=ts.float32, shape=prompt.shape).result().write(prompt).result()
  spec = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": folder.name}}
  _write_t5x(checkpoint, spec)
  np.testing.assert_array_equal(prompt_io.extract_prompt_from_t5x(checkpoint), prompt)

  for escape in ("../checkpoint_7/" + folder.name, str(folder), "gs://bucket/x"):
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": escape}}
    _write_t5x(checkpoint, spec)
    with pytest.raises(PromptFileError, match="must be a relative path inside the checkpoint"):
      prompt_io.extract_prompt_from_t5x(checkpoint)
  # A symlink inside the folder that points out of it is refused too.
  (checkpoint / "link").symlink_to(tmp_path)
  _write_t5x(checkpoint, {"driver": "zarr", "kvstore": {"driver": "file", "path": "link/ckpt"}})
  with pytest.raises(PromptFileError, match="leaves the checkpoint folder"):
    prompt_io.extract_prompt_from_t5x(checkpoint)
