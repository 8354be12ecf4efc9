"""Vocabularies and output features for T5, mT5 and ByT5 tasks.

Tasks are registered at import time, but nothing here reads a vocabulary file then: the
SentencePiece path is looked up on first use (tokenising, decoding, `vocab_size`), so an
environment variable or a gin binding set after `import tasks.glue` still applies.

Path lookup order: the gin/keyword argument of `t5_vocabulary_path` / `mt5_vocabulary_path`,
then `$PROMPT_TUNING_T5_VOCAB` / `$PROMPT_TUNING_MT5_VOCAB`, then T5's public GCS file. An
override must be the same kind of file as the default: T5 adds 100 sentinels to the 32,000-piece
`cc_all.32000` model; the mT5 model already holds its sentinels.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import gin
import seqio

T5_VOCAB_ENV = "PROMPT_TUNING_T5_VOCAB"
MT5_VOCAB_ENV = "PROMPT_TUNING_MT5_VOCAB"
DEFAULT_T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_MT5_VOCAB_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
T5_EXTRA_IDS = 100
MT5_EXTRA_IDS = 0


@gin.configurable
def t5_vocabulary_path(path: Optional[str] = None) -> str:
  """Where the T5 SentencePiece model lives (argument > $PROMPT_TUNING_T5_VOCAB > GCS)."""
  return path or os.environ.get(T5_VOCAB_ENV) or DEFAULT_T5_VOCAB_PATH


@gin.configurable
def mt5_vocabulary_path(path: Optional[str] = None) -> str:
  """Where the mT5 SentencePiece model lives (argument > $PROMPT_TUNING_MT5_VOCAB > GCS)."""
  return path or os.environ.get(MT5_VOCAB_ENV) or DEFAULT_MT5_VOCAB_PATH


class DeferredSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose model path is resolved by `path_fn` on first use."""

  def __init__(self, path_fn: Callable[[], str], extra_ids: int = 0):
    super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)
    self._path_fn = path_fn

  def _model_context(self):
    if not self._model:
      self._sentencepiece_model_file = self._path_fn()
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    return self._sentencepiece_model_file or self._path_fn()


# One shared object per vocabulary: every task reuses it, so the model file is read once.
_T5 = DeferredSentencePieceVocabulary(t5_vocabulary_path, extra_ids=T5_EXTRA_IDS)
_MT5 = DeferredSentencePieceVocabulary(mt5_vocabulary_path, extra_ids=MT5_EXTRA_IDS)
_BYT5 = seqio.ByteVocabulary()


def t5_vocabulary() -> seqio.Vocabulary:
  """T5 (and T5 1.1 / LM-adapted) SentencePiece vocabulary: 32,000 pieces + 100 sentinels."""
  return _T5


def mt5_vocabulary() -> seqio.Vocabulary:
  """mT5 SentencePiece vocabulary (250,000 pieces + 100 sentinels)."""
  return _MT5


def byt5_vocabulary() -> seqio.Vocabulary:
  """ByT5 byte vocabulary (3 special ids + 256 bytes)."""
  return _BYT5


VOCABULARIES: Mapping[str, Callable[[], seqio.Vocabulary]] = {
    "t5": t5_vocabulary,
    "mt5": mt5_vocabulary,
    "byt5": byt5_vocabulary,
}

# Task-name suffix per vocabulary; T5 is the default and has none.
VOCAB_SUFFIXES: Mapping[str, str] = {"t5": "", "mt5": "_mt5", "byt5": "_byt5"}


def output_features(vocabulary: str = "t5") -> Mapping[str, seqio.Feature]:
  """T5's text-to-text features: `inputs` and `targets`, both with EOS."""
  if vocabulary not in VOCABULARIES:
    raise ValueError(f"unknown vocabulary {vocabulary!r}; expected one of {sorted(VOCABULARIES)}")
  vocab = VOCABULARIES[vocabulary]()
  return {
      "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
  }
