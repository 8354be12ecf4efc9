"""A prompt keeps its meaning across frameworks: PEFT decodes with our exported prompt exactly as
we do, and prompts move between T5X, numpy and PEFT files unchanged.

Format details (what we refuse, bfloat16, PEFT's [2P, D] layout) live in test_prompt_io.py.
"""
import numpy as np
import pytest
from flax import serialization

import prompt_tuning
from prompt_tuning import PromptConfig, T5
from prompt_tuning.inference import decoding
from prompt_tuning.prompts import initializers
from prompt_tuning.formats import prompt_io
from tests.conftest import tiny_hf_t5

PROMPT_LENGTH, MAX_LEN = 3, 10
ENC = np.array([[5, 9, 33, 20, 7, 1, 0], [17, 2, 1, 0, 0, 0, 0], [40, 41, 42, 43, 44, 45, 1],
                [8, 1, 0, 0, 0, 0, 0], [60, 12, 30, 1, 0, 0, 0], [3, 3, 50, 61, 1, 0, 0]],
               np.int32)


def test_peft_greedy_equals_ours_with_the_exported_prompt(tmp_path):
  """A tiny HF T5 1.1 loaded by `load_pretrained` + a prompt: `PeftModel.from_pretrained` on our
  exported adapter generates (greedy) the same tokens as our decoder, and PEFT's own save of
  that adapter imports back to the same prompt."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  hf_model = tiny_hf_t5()
  hf_config = hf_model.config
  base_dir = tmp_path / "hf_t5"
  hf_model.save_pretrained(base_dir)
  frozen_model, frozen = prompt_tuning.load_pretrained(str(base_dir))

  prompt = np.random.RandomState(0).normal(0.0, 1.0, (PROMPT_LENGTH, 16)).astype(np.float32)
  adapter = prompt_io.export_peft_adapter(
      tmp_path / "adapter", prompt, base_model_name_or_path=str(base_dir),
      num_layers=hf_config.num_layers, num_attention_heads=hf_config.num_heads)
  peft_model = peft.PeftModel.from_pretrained(hf_model, str(adapter)).eval()
  ids = torch.tensor(ENC, dtype=torch.long)
  generate = dict(attention_mask=(ids != 0).long(), max_new_tokens=MAX_LEN, do_sample=False,
                  num_beams=1)
  with torch.no_grad():
    peft_out = peft_model.generate(input_ids=ids, **generate).numpy()[:, 1:]  # drop the start
    plain_out = hf_model.generate(ids, **generate).numpy()[:, 1:]  # no prompt

  model = T5(frozen_model.config, prompt=PromptConfig(length=PROMPT_LENGTH))
  tokens, _ = decoding.greedy(model, initializers.set_prompt(frozen, prompt), ENC,
                              max_decode_length=MAX_LEN)
  tokens = np.asarray(tokens)
  width = peft_out.shape[1]
  assert (tokens == 1).any(axis=1).any()  # some rows stop early: padding is compared too
  assert plain_out.shape != peft_out.shape or (plain_out != peft_out).any()  # the prompt matters
  np.testing.assert_array_equal(tokens[:, :width], peft_out)
  assert np.all(tokens[:, width:] == 0)

  peft_model.save_pretrained(tmp_path / "resaved", save_embedding_layers=False)
  np.testing.assert_array_equal(prompt_io.load_prompt(tmp_path / "resaved"), prompt)


def test_prompt_moves_from_t5x_through_numpy_to_peft_unchanged(tmp_path):
  """The original implementation's T5X checkpoint -> its extension-less numpy export -> a PEFT
  adapter -> back: the same float32 prompt at every step."""
  prompt = np.random.RandomState(1).uniform(-0.5, 0.5, (5, 8)).astype(np.float32)
  checkpoint = tmp_path / "checkpoint_1100000"
  checkpoint.mkdir()
  state = {"optimizer": {"target": {"encoder": {"prompt": {"prompt": prompt}}},
                         "state": {"step": np.array(1100000)}}}
  (checkpoint / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  from_t5x = prompt_io.extract_prompt_from_t5x(checkpoint, "target/encoder/prompt/prompt")
  numpy_export = prompt_io.save_prompt_npy(tmp_path / "encoder.prompt.prompt", from_t5x)
  adapter = prompt_io.export_peft_adapter(
      tmp_path / "adapter", prompt_io.load_prompt(numpy_export), base_model_name_or_path="t5",
      num_layers=2, num_attention_heads=2)
  back = prompt_io.load_prompt(adapter, expected_shape=(5, 8))
  assert back.dtype == np.float32
  np.testing.assert_array_equal(back, prompt)
