"""Tokenising tests read T5's SentencePiece model from ../shared/fixtures (skipped without it)."""
import pytest

from tests.conftest import fixture_path


@pytest.fixture
def t5_vocab_file(monkeypatch):
  """Points the T5 and mT5 vocabularies at the local T5 model (mT5's is not a fixture).

  The vocabularies are shared and load once, so every test in the session uses this file.
  """
  path = str(fixture_path("t5_sentencepiece.model"))
  monkeypatch.setenv("PROMPT_TUNING_T5_VOCAB", path)
  monkeypatch.setenv("PROMPT_TUNING_MT5_VOCAB", path)
  return path
