"""Prompt initialisers: values checked against the embedding table, and parameter placement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.prompts import initializers
from prompt_tuning.model.t5 import T5
from prompt_tuning.model.prompt import PromptConfig
from tests.conftest import fixture_path, tiny_config

# Ids the T5 SentencePiece model gives these labels (no EOS), written out so the test does not
# only compare our code with itself.
LABEL_IDS = {"positive": [1465], "negative": [2841], "not_entailment": [59, 834, 35, 5756, 297]}


def index_table(vocab_size=6000, d_model=3):
  """Row i is (i, i, i): a sampled row names its own index."""
  return np.repeat(np.arange(vocab_size, dtype=np.float32)[:, None], d_model, axis=1)


class IdVocab:
  """A stand-in vocabulary: each character is its code point."""

  def encode(self, text):
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def t5_vocab():
  seqio = pytest.importorskip("seqio")
  return seqio.SentencePieceVocabulary(str(fixture_path("t5_sentencepiece.model")))


@pytest.fixture(scope="module")
def tiny_embeddings():
  return np.load(fixture_path("tiny_embeddings_32128x4.npy"), allow_pickle=False)


def row_indices(prompt_PxD, embedding_VxD):
  """For each prompt row, the indices of the table rows equal to it."""
  return [np.flatnonzero((embedding_VxD == row).all(axis=1)) for row in prompt_PxD]


# ----- random uniform -----

def test_random_uniform_default_is_the_papers_symmetric_range():
  prompt = initializers.random_uniform(jax.random.PRNGKey(0), 100, 64)
  assert prompt.shape == (100, 64) and prompt.dtype == np.float32
  assert prompt.min() >= -0.5 and prompt.max() < 0.5
  assert prompt.min() < -0.45 and prompt.max() > 0.45  # the whole range is used


def test_random_uniform_original_code_range():
  prompt = initializers.random_uniform(jax.random.PRNGKey(1), 100, 64, low=0.0)
  assert prompt.min() >= 0.0 and prompt.max() < 0.5


def test_random_uniform_is_deterministic_and_checks_bounds():
  a = initializers.random_uniform(jax.random.PRNGKey(2), 4, 8)
  b = initializers.random_uniform(jax.random.PRNGKey(2), 4, 8)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="low < high"):
    initializers.random_uniform(jax.random.PRNGKey(0), 4, 8, low=0.5, high=0.5)


# ----- sampled vocabulary -----

def test_sampled_vocab_draws_distinct_rows_from_the_first_5000():
  table = index_table()
  prompt = initializers.sampled_vocab(jax.random.PRNGKey(0), table, 100)
  ids = prompt[:, 0].astype(int)
  assert prompt.dtype == np.float32
  assert len(set(ids)) == 100
  assert ids.max() < 5000
  np.testing.assert_array_equal(prompt, table[ids])


def test_sampled_vocab_on_the_real_table(tiny_embeddings):
  prompt = initializers.sampled_vocab(jax.random.PRNGKey(3), tiny_embeddings, 100)
  matches = row_indices(prompt, tiny_embeddings)
  assert all(len(m) for m in matches), "every row must be a row of the table"
  # The first 5000 rows of this table are distinct, so the index under 5000 is unique.
  first = [int(m[m < 5000][0]) for m in matches]
  assert len(set(first)) == 100


def test_sampled_vocab_population_limits():
  table = index_table(vocab_size=50)
  # A population beyond the vocabulary (ByT5: 384 rows) means the whole table.
  prompt = initializers.sampled_vocab(jax.random.PRNGKey(0), table, 50)
  assert sorted(prompt[:, 0].astype(int)) == list(range(50))


def test_sampled_vocab_longer_than_population_samples_with_replacement(caplog):
  """As the original: a prompt longer than the population repeats rows instead of failing."""
  table = index_table(vocab_size=50)
  with caplog.at_level("WARNING"):
    prompt = initializers.sampled_vocab(jax.random.PRNGKey(0), table, 25, population=10)
  ids = prompt[:, 0].astype(int)
  assert prompt.shape == (25, 3) and ids.max() < 10
  np.testing.assert_array_equal(prompt, table[ids])
  assert len(set(ids)) < 25  # 25 draws from 10 rows must repeat
  assert "with replacement" in caplog.text and "population of 10" in caplog.text
  # A prompt that fits the population logs nothing and stays distinct.
  caplog.clear()
  with caplog.at_level("WARNING"):
    prompt = initializers.sampled_vocab(jax.random.PRNGKey(0), table, 10, population=10)
  assert sorted(prompt[:, 0].astype(int)) == list(range(10)) and not caplog.text


# ----- class labels -----

def test_class_labels_are_mean_sub_token_embeddings(t5_vocab, tiny_embeddings):
  labels = ["positive", "negative", "not_entailment"]
  for label in labels:
    assert t5_vocab.encode(label) == LABEL_IDS[label]
  prompt = initializers.class_labels(jax.random.PRNGKey(0), tiny_embeddings, t5_vocab, labels,
                                     length=10)
  assert prompt.shape == (10, 4) and prompt.dtype == np.float32
  for i, label in enumerate(labels):
    expected = tiny_embeddings[LABEL_IDS[label]].mean(axis=0)
    np.testing.assert_allclose(prompt[i], expected, rtol=1e-6, atol=1e-7)
  # The multi-token label is an average, not any single sub-token's row.
  assert not (tiny_embeddings == prompt[2]).all(axis=1).any()
  # The remaining rows are distinct vocabulary rows from the first 5000.
  rest = [m[m < 5000] for m in row_indices(prompt[3:], tiny_embeddings)]
  assert all(len(m) for m in rest)
  assert len({int(m[0]) for m in rest}) == 7


def test_class_labels_errors(t5_vocab, tiny_embeddings):
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="'' tokenises to no tokens"):
    initializers.class_labels(rng, tiny_embeddings, t5_vocab, ["positive", ""], length=5)
  # A bad label fails even when its row would be left out.
  with pytest.raises(ValueError, match="'' tokenises to no tokens"):
    initializers.class_labels(rng, tiny_embeddings, t5_vocab, ["positive", ""], length=1)
  with pytest.raises(TypeError, match="list of strings"):
    initializers.class_labels(rng, tiny_embeddings, t5_vocab, "positive", length=5)


def test_class_labels_exactly_filling_the_prompt():
  table = index_table(vocab_size=200)
  prompt = initializers.class_labels(None, table, IdVocab(), ["ab", "c"], length=2)
  np.testing.assert_array_equal(prompt[:, 0], [(97 + 98) / 2, 99])


def test_class_labels_more_labels_than_rows_use_the_first_labels(caplog):
  """The paper's prompt-length-1 runs on two-label tasks: row 0 is the first label."""
  table = index_table(vocab_size=200)
  with caplog.at_level("WARNING"):
    prompt = initializers.class_labels(None, table, IdVocab(), ["ab", "c", "d"], length=2)
  np.testing.assert_array_equal(prompt[:, 0], [(97 + 98) / 2, 99])
  assert "['ab', 'c']" in caplog.text and "['d']" in caplog.text
  prompt = initializers.class_labels(None, table, IdVocab(), ["c", "d"], length=1)
  np.testing.assert_array_equal(prompt, table[[99]])
  # Through the dispatcher, as a gin run calls it.
  prompt = initializers.initialize("class_labels", jax.random.PRNGKey(0), length=1, d_model=3,
                                   embedding=table, vocab=IdVocab(), labels=["c", "d"])
  np.testing.assert_array_equal(prompt, table[[99]])


# ----- from a string -----

def test_from_string_embeds_each_token_then_samples(t5_vocab, tiny_embeddings):
  text = "Classify the sentiment of this review"
  ids = t5_vocab.encode(text)
  prompt = initializers.from_string(tiny_embeddings, t5_vocab, text, 20,
                                    rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(prompt[:len(ids)], tiny_embeddings[ids])
  assert all(len(m) for m in row_indices(prompt[len(ids):], tiny_embeddings[:5000]))


def test_from_string_longer_than_prompt():
  table = index_table(vocab_size=200)
  with pytest.raises(ValueError, match="tokenises to 5 tokens but the prompt has length 3"):
    initializers.from_string(table, IdVocab(), "hello", 3)
  prompt = initializers.from_string(table, IdVocab(), "hello", 3, truncate=True)
  np.testing.assert_array_equal(prompt[:, 0], [ord("h"), ord("e"), ord("l")])
  with pytest.raises(ValueError, match="pass `rng`"):
    initializers.from_string(table, IdVocab(), "hi", 3)


# ----- dispatcher -----

def test_initialize_dispatches_and_names_what_is_missing(tmp_path):
  table = index_table(vocab_size=200, d_model=4)
  rng = jax.random.PRNGKey(0)
  prompt = initializers.initialize("sampled_vocab", rng, length=5, d_model=4, embedding=table)
  assert prompt.shape == (5, 4)
  prompt = initializers.initialize("class_labels", rng, length=5, d_model=4, embedding=table,
                                   vocab=IdVocab(), labels=["a"])
  assert prompt[0, 0] == ord("a")
  with pytest.raises(ValueError, match="needs vocab .*, labels"):
    initializers.initialize("class_labels", rng, length=5, d_model=4, embedding=table)
  with pytest.raises(ValueError, match="needs embedding"):
    initializers.initialize("sampled_vocab", rng, length=5, d_model=4)
  with pytest.raises(ValueError, match="needs rng"):
    initializers.initialize("random_uniform", length=5, d_model=4)
  with pytest.raises(ValueError, match="Unknown prompt initialiser 'zeros'"):
    initializers.initialize("zeros", rng, length=5, d_model=4)
  with pytest.raises(ValueError, match=r"shape \(200, 4\) but d_model is 8"):
    initializers.initialize("sampled_vocab", rng, length=5, d_model=8, embedding=table)

  saved = np.full((5, 4), 0.25, np.float32)
  np.save(tmp_path / "p.npy", saved)
  np.testing.assert_array_equal(
      initializers.initialize("from_file", length=5, d_model=4, path=tmp_path / "p.npy"), saved)
  with pytest.raises(ValueError, match="PROMPT_LENGTH"):
    initializers.initialize("from_file", length=6, d_model=4, path=tmp_path / "p.npy")


# ----- placement in the parameter tree -----

def _init(prompt_config):
  """The model's variable tree (with its partitioning boxes), filled with numpy noise.

  `eval_shape` + numpy instead of `model.init`, whose RNG ops take seconds to compile on CPU.
  """
  model = T5(tiny_config(), prompt=prompt_config)
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens[:, :2])
  rng = np.random.default_rng(0)
  return model, jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                             shapes)


def test_set_prompt_returns_a_new_tree_the_model_uses():
  """Only the prompt changes, the input tree is untouched, and apply sees the new value."""
  model, variables = _init(PromptConfig(length=3))
  before = np.asarray(initializers.get_prompt(variables))
  new_PxD = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
  updated = initializers.set_prompt(variables, new_PxD)
  np.testing.assert_array_equal(initializers.get_prompt(updated), new_PxD)
  np.testing.assert_array_equal(initializers.get_prompt(variables), before)
  assert updated["params"]["decoder"] is variables["params"]["decoder"]
  tokens = jnp.ones((1, 4), jnp.int32)
  apply = jax.jit(model.apply)
  assert not np.allclose(apply(updated, tokens, tokens[:, :2]),
                         apply(variables, tokens, tokens[:, :2]))
  with pytest.raises(ValueError, match=r"\(4, 16\) but the model's is \(3, 16\)"):
    initializers.set_prompt(variables, np.zeros((4, 16), np.float32))


def test_set_prompt_in_a_bank_and_on_bare_params():
  _, variables = _init(PromptConfig(length=3, bank_size=2))
  params = variables["params"]
  new_PxD = np.ones((3, 16), np.float32)
  updated = initializers.set_prompt(params, new_PxD, index=1)
  np.testing.assert_array_equal(initializers.get_prompt(updated, index=1), new_PxD)
  np.testing.assert_array_equal(initializers.get_prompt(updated, index=0),
                                initializers.get_prompt(params, index=0))
  with pytest.raises(ValueError, match="pass index="):
    initializers.set_prompt(params, new_PxD)
  # Frozen parameters without a prompt get one.
  frozen = {"encoder": {"encoder_norm": {"scale": np.ones(16)}}}
  full = initializers.set_prompt(frozen, new_PxD)
  np.testing.assert_array_equal(full["encoder"]["prompt"]["prompt"], new_PxD)
  assert "prompt" not in frozen["encoder"]
