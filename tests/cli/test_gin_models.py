"""gin/models/*.gin: each parses on its own and describes the published architecture."""
import os
import pathlib

import gin
import pytest

from prompt_tuning.cli import gin_utils
from prompt_tuning.formats import pretrained
from prompt_tuning.model.config import PRESETS, T5Config
from tests.conftest import fixture_path

MODELS = pathlib.Path(__file__).resolve().parents[2] / "gin" / "models"
SIZES = ("small", "base", "large", "xl", "xxl")
EXPECTED_FILES = sorted(
    [f"t5_1_1_{s}.gin" for s in SIZES] + [f"t5_1_1_lm100k_{s}.gin" for s in SIZES]
    + [f"t5_1_0_{s}.gin" for s in ("small", "base", "large")] + [f"mt5_{s}.gin" for s in SIZES]
    + [f"byt5_{s}.gin" for s in SIZES])
T5X_CHECKPOINTS = "gs://t5-data/pretrained_models/t5x/"


@pytest.fixture
def fresh_gin():
  """An empty gin configuration that is emptied again afterwards."""
  gin.clear_config()
  yield
  gin.clear_config()


def _parse(path):
  """Parses one model file in the current gin scope; returns the values of the macros it sets."""
  with gin.unlock_config():
    for search_path in gin_utils.gin_search_paths(path):
      gin.add_config_file_search_path(search_path)
    gin.parse_config_file(str(path))
  macros = {}
  for name in ("MODEL_CONFIG", "VOCABULARY", "INITIAL_CHECKPOINT_PATH"):
    try:
      value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
      continue  # not set by this file
    if isinstance(value, gin.config.ConfigurableReference):
      value = value.scoped_configurable_fn()
    macros[name] = value
  return macros


def test_every_released_model_has_a_file():
  assert set(EXPECTED_FILES) <= {p.name for p in MODELS.glob("*.gin")}


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.glob("*.gin")))
def test_model_file(fresh_gin, name):
  """Released models equal their preset; any other model file is at least a buildable T5."""
  import seqio
  path = MODELS / name
  assert path.read_text().startswith("# "), "each file opens with a comment saying what it is"
  macros = _parse(path)
  preset = name[:-len(".gin")].replace("_lm100k", "")  # LM adaptation keeps T5 1.1's shapes
  if name not in EXPECTED_FILES:
    cfg = macros.get("MODEL_CONFIG")
    if cfg is not None:  # None: the checkpoint carries its own config
      assert isinstance(cfg, T5Config)
      assert cfg.vocab_size % 128 == 0
      assert pretrained.expected_shapes(cfg)  # builds abstractly
    return

  assert macros["MODEL_CONFIG"] == PRESETS[preset]
  vocab = macros["VOCABULARY"]
  if name.startswith("byt5"):
    assert isinstance(vocab, seqio.ByteVocabulary)
    assert vocab.vocab_size <= PRESETS[preset].vocab_size
  else:  # (vocab_size would download the model file)
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    family = "mc4.250000.100extra" if name.startswith("mt5") else "cc_all.32000.100extra"
    assert vocab.sentencepiece_model_file == f"gs://t5-data/vocabs/{family}/sentencepiece.model"
    assert vocab.extra_ids == 0  # the 100 sentinels are inside the model file

  ckpt = macros["INITIAL_CHECKPOINT_PATH"]
  assert ckpt.startswith(T5X_CHECKPOINTS)
  assert os.path.basename(ckpt).startswith("checkpoint_")
  if "lm100k" in name:
    size = name[len("t5_1_1_lm100k_"):-len(".gin")]
    assert ckpt == f"{T5X_CHECKPOINTS}t5_1_1_lm100k_{size}/checkpoint_1100000"


def test_config_from_gin_keeps_the_callers_gin_state(fresh_gin):
  """config_from_gin parses in isolation: bindings made before it survive, none leak out."""
  gin.parse_config("DROPOUT_RATE = 0.3\nMY_MACRO = 'kept'")
  cfg = gin_utils.config_from_gin(MODELS / "t5_1_1_lm100k_base.gin")
  assert cfg == PRESETS["t5_1_1_base"] and cfg.dropout_rate == 0.0
  assert gin.query_parameter("MY_MACRO/macro.value") == "kept"
  assert gin.query_parameter("DROPOUT_RATE/macro.value") == 0.3
  with pytest.raises(ValueError):
    gin.query_parameter("INITIAL_CHECKPOINT_PATH/macro.value")


def test_later_macros_override_model_defaults(fresh_gin, tmp_path):
  run = tmp_path / "run.gin"
  run.write_text(f"include '{MODELS / 't5_1_1_small.gin'}'\nDROPOUT_RATE = 0.1\n"
                 "ACTIVATION_DTYPE = 'bfloat16'\n")
  cfg = gin_utils.config_from_gin(run)
  assert cfg == PRESETS["t5_1_1_small"].replace(dropout_rate=0.1, dtype="bfloat16")


def test_load_pretrained_with_a_gin_config(fresh_gin, tmp_path):
  """`config=<gin file>` describes a checkpoint that records no architecture (T5X)."""
  gin_file = tmp_path / "t5x_tiny.gin"
  gin_file.write_text("""# The shared fixture's architecture.
from __gin__ import dynamic_registration
from prompt_tuning.model import config

MODEL_CONFIG = @config.T5Config()
config.T5Config:
  vocab_size = 32128
  d_model = 4
  d_kv = 2
  d_ff = 8
  num_heads = 2
  num_encoder_layers = 2
  num_decoder_layers = 2
  relative_attention_num_buckets = 4
  relative_attention_max_distance = 8
""")
  model, params = pretrained.load_pretrained(fixture_path("t5x_tiny", "checkpoint_3"),
                                             config=gin_utils.config_from_gin(gin_file))
  assert model.config.d_model == 4
  assert params["decoder"]["logits_dense"]["kernel"].shape == (4, 32128)


def test_config_from_gin_without_model_config(fresh_gin, tmp_path):
  gin_file = tmp_path / "empty.gin"
  gin_file.write_text("OTHER = 1\n")
  with pytest.raises(ValueError, match="MODEL_CONFIG"):
    gin_utils.config_from_gin(gin_file)
