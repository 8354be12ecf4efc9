"""Prompt interpretation: a prompt made of vocabulary embeddings names those tokens first."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from prompt_tuning import T5
from prompt_tuning.formats import pretrained
from prompt_tuning.scripts import nearest_tokens
from tests.conftest import fixture_path, tiny_config

# '▁positive', '▁negative', '▁not' in the T5 vocabulary, T5's last sentinel, an embedding
# padding row; scaled rows check that only the direction counts.
IDS = [1465, 2841, 59, 32099, 32127]
SCALES = [1.0, 2.5, 0.3, 1.0, 1.0]
NAMES = ["▁positive", "▁negative", "▁not", "<extra_id_0>", "<unused_32127>"]


def test_embedding_rows_come_first_with_their_pieces(tmp_path, capsys):
  table_path = fixture_path("tiny_embeddings_32128x4.npy")
  vocab = fixture_path("t5_sentencepiece.model")
  table = np.load(table_path)
  np.save(tmp_path / "prompt.npy", table[IDS] * np.array(SCALES, np.float32)[:, None])
  png = tmp_path / "plots" / "heat.png"
  result = nearest_tokens.main(["--prompt", str(tmp_path / "prompt.npy"), "--embedding_npy",
                                str(table_path), "--vocab", str(vocab), "--k", "3",
                                "--png", str(png)])
  assert [row[0] for row in result["ids"]] == IDS
  assert [row[0] for row in result["tokens"]] == NAMES
  sims = np.array(result["similarities"])
  np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
  assert np.all(np.diff(sims, axis=1) <= 0)  # best first
  printed = capsys.readouterr().out
  assert "▁positive (1.000)" in printed and "<extra_id_0>" in printed
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_with_byte_vocabulary_and_errors(tmp_path, capsys):
  cfg = tiny_config(vocab_size=384)
  model = T5(cfg)
  x = np.ones((1, 4), np.int32)
  # Random weights from traced shapes: no compilation needed to make a checkpoint.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x)["params"]
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), nn.meta.unbox(shapes))
  pretrained.save_pretrained(tmp_path / "ckpt", model, params)
  table = params["token_embedder"]["embedding"]
  ids = [ord(c) + 3 for c in "hi!"] + [1]  # ByteVocabulary: bytes start at id 3; 1 is EOS
  np.save(tmp_path / "prompt.npy", table[ids])
  result = nearest_tokens.main(["--prompt", str(tmp_path / "prompt.npy"), "--checkpoint",
                                str(tmp_path / "ckpt"), "--byte_vocab", "--k", "2"])
  assert [row[0] for row in result["tokens"]] == ["h", "i", "!", "</s>"]

  np.save(tmp_path / "wide.npy", np.ones((2, cfg.d_model + 1), np.float32))
  with pytest.raises(SystemExit):
    nearest_tokens.main(["--prompt", str(tmp_path / "wide.npy"), "--checkpoint",
                         str(tmp_path / "ckpt")])
  assert "same d_model" in capsys.readouterr().err
