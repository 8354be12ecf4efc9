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
  from prompt_tuning.config import T5Config
  base = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_encoder_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16)
  base.update(overrides)
  return T5Config(**base)
