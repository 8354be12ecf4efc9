"""Vocabularies: overridable paths, lazy loading, T5's ids with the real model, the checkpoint
folder's own spiece.model, and one clear error for a file that cannot be read."""
import logging

import gin
import pytest

from prompt_tuning.data import registry
from prompt_tuning.data import vocabularies
from tests.conftest import fixture_path, hf_folder


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


# --- The frozen checkpoint's own tokenizer model (HF folders carry spiece.model) ---------------

def spiece_with_pieces(path, pieces: int):
  """The fixture's SentencePiece model cut or padded to `pieces` pieces (only the count matters
  to the resolution)."""
  from sentencepiece import sentencepiece_model_pb2
  model = sentencepiece_model_pb2.ModelProto.FromString(
      fixture_path("t5_sentencepiece.model").read_bytes())
  if pieces < len(model.pieces):
    del model.pieces[pieces:]
  for i in range(pieces - len(model.pieces)):
    model.pieces.add(piece=f"pad_piece_{i}", score=0.0)
  path.write_bytes(model.SerializeToString())
  return path


def test_hf_folders_spiece_model_is_the_t5_vocabulary(tmp_path, fresh_vocabularies, caplog):
  """No env var, no network: the tasks' T5 vocabulary is the checkpoint folder's spiece.model."""
  fixture = fixture_path("t5_sentencepiece.model")
  folder = hf_folder(tmp_path, fixture)
  spiece = str(folder / "spiece.model")
  assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
  with caplog.at_level(logging.INFO):
    assert vocabularies.use_checkpoint_vocabulary(str(folder)) == "t5"
    vocab = vocabularies.t5_vocabulary()
    assert vocab.vocab_size == 32100
  assert vocabularies.t5_vocabulary_path() == spiece
  assert vocab.sentencepiece_model_file == spiece
  assert vocab.encode("sst2 sentence:") == [3, 7, 7, 17, 357, 7142, 10]
  assert vocabularies.mt5_vocabulary_path() == vocabularies.DEFAULT_MT5_VOCAB_PATH
  assert f"T5 vocabulary: {spiece} (INITIAL_CHECKPOINT_PATH's spiece.model; 32100 ids)" in (
      caplog.text)
  # A task's feature is that same object: GLUE's tokens come from the folder's file.
  import tasks.glue  # noqa: F401
  import seqio
  task = seqio.get_mixture_or_task("taskless_glue_sst2_v200")
  assert task.output_features["inputs"].vocabulary.sentencepiece_model_file == spiece


def test_lookup_order_with_the_checkpoints_spiece_model(tmp_path, fresh_vocabularies,
                                                        monkeypatch):
  """gin/argument > env var > the checkpoint folder's spiece.model > gs://."""
  folder = hf_folder(tmp_path, fixture_path("t5_sentencepiece.model"))
  spiece = str(folder / "spiece.model")
  assert vocabularies.t5_vocabulary_path() == vocabularies.DEFAULT_T5_VOCAB_PATH
  vocabularies.use_checkpoint_vocabulary(str(folder))
  assert vocabularies.t5_vocabulary_path() == spiece
  monkeypatch.setenv(vocabularies.T5_VOCAB_ENV, "/env/t5.model")
  assert vocabularies.t5_vocabulary_path() == "/env/t5.model"
  assert vocabularies.t5_vocabulary_path("/arg/t5.model") == "/arg/t5.model"
  monkeypatch.delenv(vocabularies.T5_VOCAB_ENV)
  # The next run's checkpoint has no spiece.model: back to the default.
  vocabularies.use_checkpoint_vocabulary(str(tmp_path / "t5x_checkpoint"))
  assert vocabularies.t5_vocabulary_path() == vocabularies.DEFAULT_T5_VOCAB_PATH


def test_a_vocabulary_loaded_by_an_earlier_run_follows_this_runs_settings(tmp_path,
                                                                          fresh_vocabularies,
                                                                          monkeypatch):
  fixture = str(fixture_path("t5_sentencepiece.model"))
  monkeypatch.setenv(vocabularies.T5_VOCAB_ENV, fixture)
  vocabularies.use_checkpoint_vocabulary(None)
  assert vocabularies.t5_vocabulary().vocab_size == 32100
  assert vocabularies.t5_vocabulary().sentencepiece_model_file == fixture
  monkeypatch.delenv(vocabularies.T5_VOCAB_ENV)
  folder = hf_folder(tmp_path, fixture)
  vocabularies.use_checkpoint_vocabulary(str(folder))
  assert vocabularies.t5_vocabulary().vocab_size == 32100
  assert vocabularies.t5_vocabulary().sentencepiece_model_file == str(folder / "spiece.model")


@pytest.mark.parametrize("pieces, serves", [(32000, "t5"), (250100, "mt5"), (64, None)])
def test_the_spiece_model_replaces_only_the_vocabulary_of_its_size(tmp_path, fresh_vocabularies,
                                                                   caplog, pieces, serves):
  """T5's file has 32,000 pieces (seqio adds 100 sentinels: 32,100 ids); mT5's has 250,100
  (sentinels included); another size replaces nothing."""
  folder = tmp_path / "hf"
  folder.mkdir()
  spiece = str(spiece_with_pieces(folder / "spiece.model", pieces))
  assert vocabularies.use_checkpoint_vocabulary(str(folder)) == serves
  assert (vocabularies.t5_vocabulary_path() == spiece) == (serves == "t5")
  assert (vocabularies.mt5_vocabulary_path() == spiece) == (serves == "mt5")
  if serves is None:
    assert f"{spiece} is not used: 64 pieces, neither T5's 32000 nor mT5's 250100" in caplog.text


def test_unreachable_default_vocabulary_is_one_error_naming_the_fixes(fresh_vocabularies,
                                                                      offline_gcs, monkeypatch):
  with pytest.raises(vocabularies.VocabularyUnavailableError) as e:
    vocabularies.t5_vocabulary().encode("hello")
  message = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in message
  assert message.startswith(
      f"Cannot read the T5 vocabulary {vocabularies.DEFAULT_T5_VOCAB_PATH} (")
  assert "Point $PROMPT_TUNING_T5_VOCAB at a local copy" in message
  assert "put the model's spiece.model" in message and "INITIAL_CHECKPOINT_PATH" in message
  # Nothing was cached: once the setting is there, the same object loads.
  monkeypatch.setenv(vocabularies.T5_VOCAB_ENV, str(fixture_path("t5_sentencepiece.model")))
  assert vocabularies.t5_vocabulary().vocab_size == 32100


def test_unreachable_vocabulary_mentions_a_spiece_model_of_the_wrong_size(
    tmp_path, fresh_vocabularies, offline_gcs):
  folder = tmp_path / "hf"
  folder.mkdir()
  spiece_with_pieces(folder / "spiece.model", 64)
  vocabularies.use_checkpoint_vocabulary(str(folder))
  with pytest.raises(ValueError, match=r"\(.*spiece\.model is not used: 64 pieces, neither "
                                       r"T5's 32000 nor mT5's 250100\)"):
    vocabularies.t5_vocabulary().vocab_size


def test_missing_local_vocabulary_names_the_env_var(tmp_path, fresh_vocabularies, monkeypatch):
  missing = tmp_path / "nowhere" / "sentencepiece.model"
  monkeypatch.setenv(vocabularies.MT5_VOCAB_ENV, str(missing))
  with pytest.raises(ValueError, match=(
      rf"Cannot read the mT5 vocabulary {missing} \(NotFoundError: .*\)\. Point "
      r"\$PROMPT_TUNING_MT5_VOCAB at a readable copy of mT5's mc4\.250000\.100extra "
      r"SentencePiece model \(250100 pieces\), or unset it\.$")):
    vocabularies.mt5_vocabulary().vocab_size
