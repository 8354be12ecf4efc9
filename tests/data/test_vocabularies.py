"""Vocabularies: overridable paths, lazy loading, T5's ids with the real model."""
import gin
import pytest

from prompt_tuning.data import registry
from prompt_tuning.data import vocabularies


def test_path_lookup_order(monkeypatch):
  monkeypatch.delenv(vocabularies.T5_VOCAB_ENV, raising=False)
  assert vocabularies.t5_vocabulary_path() == vocabularies.DEFAULT_T5_VOCAB_PATH
  monkeypatch.setenv(vocabularies.T5_VOCAB_ENV, "/env/t5.model")
  assert vocabularies.t5_vocabulary_path() == "/env/t5.model"
  assert vocabularies.t5_vocabulary_path("/arg/t5.model") == "/arg/t5.model"
  with gin.unlock_config():
    gin.bind_parameter("t5_vocabulary_path.path", "/gin/t5.model")
  try:
    assert vocabularies.t5_vocabulary_path() == "/gin/t5.model"
  finally:
    gin.clear_config()
  monkeypatch.setenv(vocabularies.MT5_VOCAB_ENV, "/env/mt5.model")
  assert vocabularies.mt5_vocabulary_path() == "/env/mt5.model"


def test_registering_tasks_does_not_read_the_vocabulary(monkeypatch):
  """The path is resolved only when text is tokenised, so gin/env overrides set later apply."""
  calls = []
  spy = vocabularies.DeferredSentencePieceVocabulary(lambda: calls.append(1) or "/missing",
                                                     extra_ids=100)
  monkeypatch.setattr(vocabularies, "_T5", spy)
  import seqio
  spec = registry.TaskSpec(
      stem="lazy_vocab_probe_v1",
      source=seqio.TfdsDataSource(tfds_name="glue/sst2:2.0.0", splits=("train",)),
      text_preprocessors=[], task_index=0, class_labels=("a", "b"))
  names = []
  try:
    names = registry.register_variants(spec, vocabs=("t5",))
    assert len(names) == 6
    assert seqio.get_mixture_or_task(names[0]).output_features["inputs"].vocabulary is spy
    assert calls == []
    assert spy.sentencepiece_model_file == "/missing"  # asking for the path is fine
  finally:
    for name in names:
      seqio.TaskRegistry.remove(name)


def test_t5_vocabulary_with_the_real_model(t5_vocab_file):
  vocab = vocabularies.t5_vocabulary()
  assert vocab.vocab_size == 32100
  assert vocab.encode("sst2 sentence:") == [3, 7, 7, 17, 357, 7142, 10]
  assert vocab.decode([32099]) == "<extra_id_0>"
  assert vocab.sentencepiece_model_file == t5_vocab_file


def test_byt5_and_features():
  assert vocabularies.byt5_vocabulary().vocab_size == 259
  features = vocabularies.output_features("byt5")
  assert set(features) == {"inputs", "targets"}
  assert all(f.add_eos and f.required for f in features.values())
  with pytest.raises(ValueError, match="unknown vocabulary"):
    vocabularies.output_features("gpt2")
