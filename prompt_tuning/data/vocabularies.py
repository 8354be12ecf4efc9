"""Vocabularies and output features for T5, mT5 and ByT5 tasks.

Tasks are registered at import time, but nothing here reads a vocabulary file then: the
SentencePiece path is looked up on first use (tokenising, decoding, `vocab_size`), so an
environment variable or a gin binding set after `import tasks.glue` still applies.

Path lookup order: the gin/keyword argument of `t5_vocabulary_path` / `mt5_vocabulary_path`,
then `$PROMPT_TUNING_T5_VOCAB` / `$PROMPT_TUNING_MT5_VOCAB`, then the `spiece.model` of the run's
INITIAL_CHECKPOINT_PATH folder (HF T5/mT5 folders have one; see `use_checkpoint_vocabulary`), then
T5's public GCS file. An override must be the same kind of file as the default: T5 adds 100
sentinels to the 32,000-piece `cc_all.32000` model; the mT5 model already holds its sentinels.
A file that cannot be read is a `VocabularyUnavailableError` (a ValueError) naming these settings.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Mapping, Optional

import gin
import seqio
import tensorflow as tf

log = logging.getLogger(__name__)

T5_VOCAB_ENV = "PROMPT_TUNING_T5_VOCAB"
MT5_VOCAB_ENV = "PROMPT_TUNING_MT5_VOCAB"
DEFAULT_T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_MT5_VOCAB_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
T5_EXTRA_IDS = 100
MT5_EXTRA_IDS = 0
# The tokenizer model HF saves beside T5/mT5 weights.
CHECKPOINT_VOCAB_FILE = "spiece.model"
# Pieces in each vocabulary's SentencePiece file (without the sentinels seqio adds).
T5_PIECES = 32000
MT5_PIECES = 250100

_ENV = {"t5": T5_VOCAB_ENV, "mt5": MT5_VOCAB_ENV}
_DEFAULT = {"t5": DEFAULT_T5_VOCAB_PATH, "mt5": DEFAULT_MT5_VOCAB_PATH}
_PIECES = {"t5": T5_PIECES, "mt5": MT5_PIECES}
_DISPLAY = {"t5": "T5", "mt5": "mT5"}

# Vocabulary name -> the checkpoint folder's spiece.model it resolves to (set per run).
_from_checkpoint: Dict[str, str] = {}
# Why the checkpoint folder's file is not used, for the unreadable-vocabulary error.
_checkpoint_note = ""


class VocabularyUnavailableError(ValueError):
  """A task's SentencePiece file cannot be read (offline GCS, a missing local file)."""


def _resolve(name: str, path: Optional[str]) -> str:
  return (path or os.environ.get(_ENV[name]) or _from_checkpoint.get(name)
          or _DEFAULT[name])


@gin.configurable
def t5_vocabulary_path(path: Optional[str] = None) -> str:
  """Where the T5 SentencePiece model lives.

  Argument > $PROMPT_TUNING_T5_VOCAB > INITIAL_CHECKPOINT_PATH's spiece.model > GCS.
  """
  return _resolve("t5", path)


@gin.configurable
def mt5_vocabulary_path(path: Optional[str] = None) -> str:
  """Where the mT5 SentencePiece model lives.

  Argument > $PROMPT_TUNING_MT5_VOCAB > INITIAL_CHECKPOINT_PATH's spiece.model > GCS.
  """
  return _resolve("mt5", path)


def _source(name: str, path: str) -> str:
  """Which setting a resolved path came from, in the words a user sets it with."""
  if path == os.environ.get(_ENV[name]):
    return f"${_ENV[name]}"
  if path == _from_checkpoint.get(name):
    return "INITIAL_CHECKPOINT_PATH's spiece.model"
  if path == _DEFAULT[name]:
    return "the default"
  return f"gin {name}_vocabulary_path.path"


def _unavailable(name: str, path: str, error: Exception) -> str:
  """One line: what could not be read, why, and the settings that fix it."""
  detail = " ".join(str(error).split("\n")[0].split())[:200]
  what = f"Cannot read the {_DISPLAY[name]} vocabulary {path} ({type(error).__name__}: {detail})"
  source = _source(name, path)
  model = ("T5's cc_all.32000 SentencePiece model" if name == "t5" else
           "mT5's mc4.250000.100extra SentencePiece model")
  pieces = T5_PIECES if name == "t5" else MT5_PIECES
  if source == "the default":
    fix = (f"Offline or without GCS access? Point ${_ENV[name]} at a local copy of that file "
           f"({model}, {pieces} pieces), or put the model's {CHECKPOINT_VOCAB_FILE} (HF T5 "
           "folders have one) in the INITIAL_CHECKPOINT_PATH folder.")
  elif source.startswith("$"):
    fix = f"Point {source} at a readable copy of {model} ({pieces} pieces), or unset it."
  elif source.startswith("gin"):
    fix = f"Point {source} at a readable copy of {model} ({pieces} pieces), or drop it."
  else:
    fix = f"Make that file readable, or point ${_ENV[name]} at a copy of {model}."
  note = f" ({_checkpoint_note})" if _checkpoint_note and source == "the default" else ""
  return f"{what}{note}. {fix}"


class DeferredSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose model path is resolved by `path_fn` on first use."""

  def __init__(self, path_fn: Callable[[], str], extra_ids: int = 0, name: str = ""):
    super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)
    self._path_fn = path_fn
    self._name = name

  def _model_context(self):
    if self._model:
      return self._model
    path = self._sentencepiece_model_file = self._path_fn()
    try:
      context = super()._model_context()
    except tf.errors.OpError as e:  # seqio reads the file with tf.io.gfile (gs:// or local)
      self._sentencepiece_model_file = ""  # a fixed setting is looked up again
      if not self._name:
        raise
      raise VocabularyUnavailableError(_unavailable(self._name, path, e)) from e
    if self._name:
      log.info("%s vocabulary: %s (%s; %d ids)", _DISPLAY[self._name], path,
               _source(self._name, path), self.vocab_size)
    return context

  @property
  def sentencepiece_model_file(self) -> str:
    return self._sentencepiece_model_file or self._path_fn()

  def unload(self) -> None:
    """Forgets the loaded model: the next use resolves the path again."""
    self._model = None
    self._sentencepiece_model_file = ""

  def refresh(self) -> None:
    """Unloads the model if the settings now name another file than the one it was read from."""
    if self._model and self._path_fn() != self._sentencepiece_model_file:
      log.info("The %s vocabulary was read from %s; this run's settings name %s: reloading",
               _DISPLAY.get(self._name, self._name), self._sentencepiece_model_file,
               self._path_fn())
      self.unload()


# One shared object per vocabulary: every task reuses it, so the model file is read once.
_T5 = DeferredSentencePieceVocabulary(t5_vocabulary_path, extra_ids=T5_EXTRA_IDS, name="t5")
_MT5 = DeferredSentencePieceVocabulary(mt5_vocabulary_path, extra_ids=MT5_EXTRA_IDS, name="mt5")
_BYT5 = seqio.ByteVocabulary()


def _count_pieces(path: str) -> int:
  from sentencepiece import sentencepiece_model_pb2  # seqio's dependency
  with open(path, "rb") as f:
    return len(sentencepiece_model_pb2.ModelProto.FromString(f.read()).pieces)


def use_checkpoint_vocabulary(checkpoint_path: Optional[str]) -> Optional[str]:
  """Lets the tasks' T5 or mT5 vocabulary resolve to the checkpoint folder's own spiece.model.

  A run calls this once, before it builds data. HF T5/mT5 folders carry the tokenizer model that
  matches their weights, so a user who has the folder needs no network (gs://) and no setting. The
  file replaces the vocabulary whose size it has: 32,000 pieces (+100 sentinels) is T5, 250,100 is
  mT5; any other size replaces nothing (ByT5 needs no file). An explicit setting (gin, env var)
  still wins. A vocabulary already loaded from another file than its settings now give (an earlier
  run in this process) is unloaded, so each run reads what its own settings name.
  Returns the name of the vocabulary the file serves ("t5", "mt5"), or None.
  """
  global _checkpoint_note
  _from_checkpoint.clear()
  _checkpoint_note = ""
  chosen = None
  path = str(checkpoint_path) if checkpoint_path else ""
  spiece = os.path.join(path, CHECKPOINT_VOCAB_FILE)
  if path and "://" not in path and os.path.isfile(spiece):
    try:
      pieces = _count_pieces(spiece)
    except Exception as e:  # pylint: disable=broad-except  (protobuf raises DecodeError)
      pieces, why = None, f"not a readable SentencePiece model ({type(e).__name__})"
    chosen = next((n for n, want in _PIECES.items() if pieces == want), None)
    if chosen:
      _from_checkpoint[chosen] = spiece
      wins = _source(chosen, {"t5": t5_vocabulary_path, "mt5": mt5_vocabulary_path}[chosen]())
      log.info("%s has %d pieces: the tasks' %s vocabulary%s", spiece, pieces, _DISPLAY[chosen],
               " uses it" if wins.startswith("INITIAL") else f" keeps {wins}, which wins")
    else:
      if pieces is not None:
        why = (f"{pieces} pieces, neither T5's {T5_PIECES} nor mT5's {MT5_PIECES}")
      _checkpoint_note = f"{spiece} is not used: {why}"
      log.warning("%s; the tasks' vocabularies come from their usual settings", _checkpoint_note)
  _T5.refresh()
  _MT5.refresh()
  return chosen


def reset() -> None:
  """Forgets the checkpoint's vocabulary and unloads T5/mT5 (tests; several runs in a process)."""
  use_checkpoint_vocabulary(None)
  _T5.unload()
  _MT5.unload()


def t5_vocabulary() -> seqio.Vocabulary:
  """T5 (and T5 1.1 / LM-adapted) SentencePiece vocabulary: 32,000 pieces + 100 sentinels."""
  return _T5


def mt5_vocabulary() -> seqio.Vocabulary:
  """mT5 SentencePiece vocabulary (250,000 pieces + 100 sentinels, all in the file)."""
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
