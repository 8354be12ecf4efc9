"""Decoding: greedy, sampling and beam search agree with teacher forcing; prompts stay per example.

The tiny random models here get a louder EOS column (`_params`) so that, within a few steps,
some rows stop and others run to the maximum length: both exits of the loop are exercised.
"""
import dataclasses
import functools
import pathlib

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.inference import decoding
from tests.conftest import tiny_config, tiny_hf_t5

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin" / "decoding"
MAX_LEN = 10


def _config():
  # The encoder runs once per decode, so one layer suffices there; two decoder layers keep
  # several caches to reorder. Fewer layers compile faster.
  return tiny_config(num_encoder_layers=1)


def _inputs(lengths=(7, 3, 5, 2, 6, 4), width=7, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, 64, size=(len(lengths), width)).astype(np.int32)
  for row, n in enumerate(lengths):
    enc[row, n - 1], enc[row, n:] = 1, 0
  return enc


ENC = _inputs()


@functools.lru_cache(maxsize=None)
def _random_params(model, seed, eos_scale):
  # numpy fills the traced shapes: much faster than compiling `model.init` for every model.
  bank = model.prompt is not None and model.prompt.bank_size is not None
  index = np.zeros(len(ENC), np.int32) if bank else None
  shapes = jax.eval_shape(functools.partial(model.init, prompt_index=index),
                          jax.random.PRNGKey(0), ENC, ENC[:, :3])
  rng = np.random.RandomState(seed)
  params = {}
  for path, s in flax.traverse_util.flatten_dict(nn.meta.unbox(shapes["params"])).items():
    if path[-1] == "scale":  # layer norms
      value = np.ones(s.shape)
    elif path[-1] == "prompt":
      value = rng.uniform(-0.5, 0.5, s.shape)
    elif path[-1] == "kernel":
      value = rng.normal(0.0, s.shape[0] ** -0.5, s.shape)
    else:  # token and relative-position embeddings
      value = rng.normal(0.0, 1.0, s.shape)
    params[path] = value.astype(s.dtype)
  params = flax.traverse_util.unflatten_dict(params)
  kernel = params["decoder"]["logits_dense"]["kernel"]
  kernel[:, 1] *= eos_scale
  return params


def _params(model, seed=0, eos_scale=3.0):
  """Random parameters whose EOS logit varies more, so that some rows finish early."""
  return jax.tree.map(jnp.asarray, _random_params(model, seed, eos_scale))  # a fresh tree


def _lengths(tokens_BxT, eos_id=1):
  """Generated length per row: up to and including the first EOS, else the full width."""
  tokens = np.asarray(tokens_BxT)
  has_eos = (tokens == eos_id).any(axis=1)
  return np.where(has_eos, np.argmax(tokens == eos_id, axis=1) + 1, tokens.shape[1])


@functools.partial(jax.jit, static_argnames="model")
def _teacher_forced(model, params, enc, tokens_BxT, prompt_index=None):
  """Full (uncached) forward pass on the decoded tokens: log-probabilities [B, T, V]."""
  logits = model.apply({"params": params}, enc, decoding.shift_right(tokens_BxT),
                       prompt_index=prompt_index)
  return jax.nn.log_softmax(logits, axis=-1)


@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
def test_greedy_is_argmax_of_teacher_forcing(matmul_dtype):
  """Every greedy token is the argmax of the full forward pass on the greedy prefix.

  Also with bfloat16 matmuls: the cached cross-attention keys and values are the forward pass's.
  """
  model = T5(_config().replace(matmul_dtype=matmul_dtype))
  params = _params(model)
  tokens, scores = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  tokens = np.asarray(tokens)
  lengths = _lengths(tokens)
  assert (lengths < MAX_LEN).any() and (lengths == MAX_LEN).any()  # both loop exits happen
  log_probs = np.asarray(_teacher_forced(model, params, ENC, tokens))
  expected_score = np.zeros(len(ENC))
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(tokens[b, :n], log_probs[b, :n].argmax(-1))
    assert np.all(tokens[b, n:] == 0)
    expected_score[b] = log_probs[b, np.arange(n), tokens[b, :n]].sum()
  np.testing.assert_allclose(scores, expected_score, rtol=1e-5, atol=1e-5)


def test_greedy_loop_stops_when_every_row_has_finished(monkeypatch):
  """The decoder runs as many steps as the longest output, not max_decode_length."""
  model = T5(_config())
  params = _params(model)
  tokens, _ = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  early = np.flatnonzero(_lengths(tokens) < MAX_LEN)
  steps = []
  step = decoding._step

  def counting_step(*args):
    jax.debug.callback(lambda: steps.append(1))
    return step(*args)

  monkeypatch.setattr(decoding, "_step", counting_step)
  # A new static length forces a fresh trace that picks up the counting step.
  tokens, _ = decoding.greedy(model, params, ENC[early], max_decode_length=MAX_LEN + 7)
  jax.effects_barrier()
  assert len(steps) == _lengths(tokens).max() < MAX_LEN


def test_beam_search_with_one_beam_is_greedy():
  model = T5(_config())
  params = _params(model)
  greedy_tokens, greedy_scores = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  beam_tokens, beam_scores = decoding.beam_search(model, params, ENC, max_decode_length=MAX_LEN,
                                                  num_beams=1, alpha=0.0)
  np.testing.assert_array_equal(beam_tokens, greedy_tokens)
  np.testing.assert_allclose(beam_scores, greedy_scores, rtol=1e-5, atol=1e-5)


# Beam search is no exact search: the greedy prefix can drop out of the beam, and then the
# result can score below greedy (seed 1 does that on one row with 4 beams). These seeds do not;
# the check guards against bookkeeping bugs that make beams systematically worse.
@pytest.mark.parametrize("seed,alpha", [(0, 0.6), (2, 0.0), (3, 0.6)])
def test_beam_search_scores_are_true_and_beat_greedy(seed, alpha):
  """Each returned beam's score is its teacher-forced log-likelihood / length penalty (so the
  cache was reordered correctly), beams come sorted, and the best is at least greedy's."""
  model = T5(_config())
  params = _params(model, seed=seed)
  beams, scores = decoding.beam_search(model, params, ENC, max_decode_length=MAX_LEN,
                                       num_beams=4, alpha=alpha, return_all_beams=True)
  beams, scores = np.asarray(beams), np.asarray(scores)
  assert beams.shape == (len(ENC), 4, MAX_LEN)
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert all(len({tuple(beam) for beam in row}) == 4 for row in beams)  # no duplicates
  for k in range(4):
    lengths = _lengths(beams[:, k])
    log_probs = np.asarray(_teacher_forced(model, params, ENC, beams[:, k]))
    for b, n in enumerate(lengths):
      assert np.all(beams[b, k, n:] == 0)
      lp = log_probs[b, np.arange(n), beams[b, k, :n]].sum()
      np.testing.assert_allclose(scores[b, k], lp / ((5 + n) / 6) ** alpha, rtol=1e-5, atol=1e-5)
  greedy_tokens, greedy_lp = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  greedy_score = np.asarray(greedy_lp) / ((5 + _lengths(greedy_tokens)) / 6) ** alpha
  assert np.all(scores[:, 0] >= greedy_score - 1e-5)
  assert np.any(scores[:, 0] > greedy_score + 1e-2)  # and it does search
  best, best_score = decoding.beam_search(model, params, ENC, max_decode_length=MAX_LEN,
                                          num_beams=4, alpha=alpha)
  np.testing.assert_array_equal(best, beams[:, 0])
  np.testing.assert_allclose(best_score, scores[:, 0])


def test_sampling_limits_equal_greedy():
  """top_k=1, temperature 0 and temperature -> 0 all reduce to argmax (top_p: see
  test_filter_logits)."""
  model = T5(_config())
  params = _params(model)
  expected, expected_scores = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  rng = jax.random.PRNGKey(3)
  for kw in (dict(top_k=1), dict(temperature=0.0), dict(temperature=1e-4)):
    tokens, scores = decoding.sample(model, params, ENC, rng, max_decode_length=MAX_LEN, **kw)
    np.testing.assert_array_equal(tokens, expected, err_msg=str(kw))
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5, err_msg=str(kw))


def test_samples_respect_top_k_and_are_scored_by_the_model():
  model = T5(_config())
  params = _params(model)
  tokens, scores = decoding.sample(model, params, ENC, jax.random.PRNGKey(0),
                                   max_decode_length=MAX_LEN, temperature=2.0, top_k=3)
  other, _ = decoding.sample(model, params, ENC, jax.random.PRNGKey(1),
                             max_decode_length=MAX_LEN, temperature=2.0, top_k=3)
  assert not np.array_equal(tokens, other)
  tokens = np.asarray(tokens)
  log_probs = np.asarray(_teacher_forced(model, params, ENC, tokens))
  top3 = np.argsort(-log_probs, axis=-1)[..., :3]
  for b, n in enumerate(_lengths(tokens)):
    assert all(tokens[b, t] in top3[b, t] for t in range(n))
    np.testing.assert_allclose(scores[b], log_probs[b, np.arange(n), tokens[b, :n]].sum(),
                               rtol=1e-5, atol=1e-5)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.asarray(decoding.filter_logits(logits, **kw) > decoding.NEG_INF)[0]
  np.testing.assert_array_equal(kept(top_k=3), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_p=0.75), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.85), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_p=0.1), [1, 0, 0, 0])
  np.testing.assert_array_equal(kept(top_k=2, top_p=0.99), [1, 1, 0, 0])


def test_prompted_rows_do_not_depend_on_their_batch_mates():
  """Shuffling the batch and replacing half of it leaves every kept row's output unchanged:
  decoding a batch equals decoding each example alone (one compilation instead of B)."""
  model = T5(_config(), prompt=PromptConfig(length=3))
  params = _params(model, seed=1)  # a seed whose outputs vary in length
  order = np.array([3, 0, 5, 1, 4, 2])
  other = ENC[order].copy()
  other[::2] = _inputs(seed=1)[::2]  # rows 0, 2, 4 now hold unrelated examples
  kept = order[1::2]
  for decode_fn in (functools.partial(decoding.greedy, max_decode_length=MAX_LEN),
                    functools.partial(decoding.beam_search, max_decode_length=MAX_LEN,
                                      num_beams=3)):
    tokens, scores = decode_fn(model, params, ENC)
    tokens2, scores2 = decode_fn(model, params, other)
    np.testing.assert_array_equal(tokens2[1::2], np.asarray(tokens)[kept])
    np.testing.assert_allclose(scores2[1::2], np.asarray(scores)[kept], rtol=1e-5, atol=1e-5)


INDEX = np.array([0, 1, 1, 0, 1, 0], np.int32)  # each row's prompt in a bank of two


def _bank_model_and_params():
  model = T5(_config(), prompt=PromptConfig(length=3, bank_size=2))
  params = _params(model, seed=4)  # a seed whose outputs vary in length and with the prompt
  bank = params["encoder"]["prompt"]["prompt"]
  params["encoder"]["prompt"]["prompt"] = bank.at[1].multiply(4.0)  # make the prompts differ
  return model, params


def test_prompt_bank_rows_decode_with_their_own_prompt():
  """With a bank, row b decodes exactly like a single-prompt model holding bank[index[b]]."""
  bank_model, params = _bank_model_and_params()
  bank = params["encoder"]["prompt"]["prompt"]
  single_model = T5(_config(), prompt=PromptConfig(length=3))
  kw = dict(max_decode_length=MAX_LEN)
  tokens, scores = decoding.greedy(bank_model, params, ENC, prompt_index=INDEX, **kw)
  beams, _ = decoding.beam_search(bank_model, params, ENC, num_beams=3, prompt_index=INDEX, **kw)
  swapped, _ = decoding.greedy(bank_model, params, ENC, prompt_index=1 - INDEX, **kw)
  assert not np.array_equal(tokens, swapped)  # the prompt matters for this model
  for p in (0, 1):
    rows = INDEX == p
    single = jax.tree.map(lambda x: x, params)
    single["encoder"]["prompt"] = {"prompt": bank[p]}
    alone, alone_scores = decoding.greedy(single_model, single, ENC, **kw)
    np.testing.assert_array_equal(np.asarray(alone)[rows], np.asarray(tokens)[rows])
    np.testing.assert_allclose(np.asarray(alone_scores)[rows], np.asarray(scores)[rows],
                               rtol=1e-5, atol=1e-5)
    alone, _ = decoding.beam_search(single_model, single, ENC, num_beams=3, **kw)
    np.testing.assert_array_equal(np.asarray(alone)[rows], np.asarray(beams)[rows])


def test_rank_classification_agrees_with_score_targets():
  model, params = _bank_model_and_params()
  candidates = [[5, 1], [7, 8, 1], [12, 1], [40, 1], [4, 9, 1]]
  best, scores = decoding.rank_classification(model, params, ENC, candidates,
                                              prompt_index=INDEX)
  scores = np.asarray(scores)
  assert scores.shape == (len(ENC), len(candidates))
  np.testing.assert_array_equal(best, scores.argmax(axis=1))
  assert len(set(np.asarray(best).tolist())) > 1  # the inputs and prompts matter
  table = decoding.pad_candidates(candidates)
  for c in range(len(candidates)):
    targets = np.tile(table[c], (len(ENC), 1))
    expected = decoding.score_targets(model, params, ENC, decoding.shift_right(targets), targets,
                                      prompt_index=INDEX)
    np.testing.assert_allclose(scores[:, c], expected, rtol=1e-5, atol=1e-5)
  # Trailing padding does not change a target's score.
  unpadded = np.tile(np.array(candidates[0], np.int32), (len(ENC), 1))
  np.testing.assert_allclose(
      decoding.score_targets(model, params, ENC, decoding.shift_right(unpadded), unpadded,
                             prompt_index=INDEX), scores[:, 0], rtol=1e-5, atol=1e-5)
  # The dispatcher returns the winning candidate's tokens and score.
  cfg = decoding.DecodingConfig(method="rank_classification", candidate_targets=candidates)
  tokens, best_scores = decoding.decode(model, params, {"encoder_input_tokens": ENC,
                                                        "prompt_index": INDEX}, cfg)
  np.testing.assert_array_equal(tokens, table[np.asarray(best)])
  np.testing.assert_allclose(best_scores, scores.max(axis=1), rtol=1e-6)


def test_decode_dispatches_each_method():
  model = T5(_config())
  params = _params(model)
  batch = {"encoder_input_tokens": ENC}
  rng = jax.random.PRNGKey(5)
  # Settings used by the tests above, so these calls reuse their compilations.
  cases = {
      "greedy": decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN),
      "beam": decoding.beam_search(model, params, ENC, max_decode_length=MAX_LEN, num_beams=4),
      "sample": decoding.sample(model, params, ENC, rng, max_decode_length=MAX_LEN, top_k=1),
  }
  for method, expected in cases.items():
    cfg = decoding.DecodingConfig(method=method, max_decode_length=MAX_LEN, num_beams=4,
                                  top_k=1)
    got = decoding.decode(model, params, batch, cfg, rng=rng)
    np.testing.assert_array_equal(got[0], expected[0], err_msg=method)
    np.testing.assert_allclose(got[1], expected[1], err_msg=method)
  with pytest.raises(ValueError, match="rng"):
    decoding.decode(model, params, batch, decoding.DecodingConfig(method="sample"))
  with pytest.raises(ValueError, match="method"):
    decoding.DecodingConfig(method="nucleus")


# Stands in for the evaluation code that takes %DECODING_CONFIG.
_decoding_config_consumer = gin.external_configurable(
    lambda decoding_config=None: decoding_config, name="decoding_config_consumer",
    module="tests.inference.test_decoding")


@pytest.mark.parametrize("name,method", [("greedy", "greedy"), ("beam_search", "beam"),
                                         ("sample", "sample"),
                                         ("rank_classification", "rank_classification")])
def test_gin_files_bind_a_decoding_config(name, method):
  gin.clear_config()
  try:
    gin.parse_config_file(str(GIN_DIR / f"{name}.gin"))
    gin.parse_config("tests.inference.test_decoding.decoding_config_consumer.decoding_config = "
                     "%DECODING_CONFIG")
    if method == "rank_classification":
      gin.parse_config("CANDIDATE_TARGETS = [[5, 1], [7, 1]]")
    cfg = _decoding_config_consumer()
  finally:
    gin.clear_config()
  assert isinstance(cfg, decoding.DecodingConfig) and cfg.method == method
  assert hash(cfg) == hash(dataclasses.replace(cfg))  # usable as a static jit argument
  if method == "rank_classification":
    assert cfg.candidate_targets == ((5, 1), (7, 1))


def test_greedy_matches_hf_generate(tmp_path):
  """Greedy token ids equal HF `generate` on a tiny random T5 1.1 loaded by `load_pretrained`."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("prompt_tuning.formats.pretrained")
  import prompt_tuning
  hf_model = tiny_hf_t5()
  hf_model.save_pretrained(tmp_path)
  model, params = prompt_tuning.load_pretrained(str(tmp_path))

  ids = torch.tensor(ENC, dtype=torch.long)
  with torch.no_grad():
    hf_out = hf_model.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=MAX_LEN,
                               do_sample=False, num_beams=1).numpy()[:, 1:]  # drop start token
  tokens, _ = decoding.greedy(model, params, ENC, max_decode_length=MAX_LEN)
  tokens = np.asarray(tokens)
  lengths = _lengths(tokens)
  assert (lengths < MAX_LEN).any()  # some rows stop early, so padding after EOS is compared too
  np.testing.assert_array_equal(tokens[:, :hf_out.shape[1]], hf_out)
  assert np.all(tokens[:, hf_out.shape[1]:] == 0)


def test_argmax_last_axis_equals_jnp_argmax_with_ties():
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 300))
  x = x.at[1, 7].set(9.0).at[1, 200].set(9.0)  # a tie: the first index wins
  x = x.at[2].set(-jnp.inf).at[2, 299].set(0.0)
  got = decoding.argmax_last_axis(x)
  np.testing.assert_array_equal(got, jnp.argmax(x, -1))
  assert int(got[1]) == 7 and got.dtype == jnp.int32
