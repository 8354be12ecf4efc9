"""Prompt recycling: the recyclers recover a known map between two embedding tables, and a
recycled prompt reproduces the original's outputs on a model built to be equivalent under that
map (and an unrecycled one does not); the script and the eval entry point, end to end."""
import json
import pathlib

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.prompts import initializers
from prompt_tuning.formats import pretrained
from prompt_tuning.formats import prompt_io
from prompt_tuning.prompts import recycling
from prompt_tuning.scripts import recycle_prompt
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
RNG = jax.random.PRNGKey(0)


def _tables(vocab=300, d=16, e=24, seed=0):
  rs = np.random.RandomState(seed)
  source = rs.normal(size=(vocab, d))
  m = rs.normal(size=(d, e)) / np.sqrt(d)  # any linear map, even to another width
  return source, source @ m, m


def test_v2v_lin_recovers_the_map_and_lin_comb_applies_it():
  source, target, m = _tables()
  prompt = np.random.RandomState(1).normal(size=(7, 16))
  recycler = recycling.make_recycler("v2v-lin").fit(source[10:110], target[10:110])
  np.testing.assert_allclose(recycler.projection, m, atol=1e-5)
  for method in ("v2v-lin", "lin-comb"):
    recycled, info = recycling.recycle(prompt, source, target, method, num_words=100,
                                       word_offset=10)
    assert recycled.shape == (7, 24) and recycled.dtype == np.float32
    np.testing.assert_allclose(recycled, prompt @ m, atol=1e-5)
    assert info["fit_error"] < 1e-10


def test_the_maps_are_learned_from_the_chosen_rows_only():
  """Rows outside [offset, offset + n) follow another map: they must not change the result."""
  source, target, m = _tables()
  target[:10] = np.random.RandomState(5).normal(size=(10, 24))
  target[110:] = 0.0
  prompt = np.random.RandomState(1).normal(size=(3, 16))
  recycled, _ = recycling.recycle(prompt, source, target, "v2v-lin", num_words=100,
                                  word_offset=10)
  np.testing.assert_allclose(recycled, prompt @ m, atol=1e-5)
  everything, _ = recycling.recycle(prompt, source, target, "v2v-lin", num_words=300,
                                    word_offset=0)
  assert np.abs(everything - prompt @ m).max() > 1e-2  # the test can tell the rows apart


def test_v2v_nn_learns_the_map_approximately():
  source, target, m = _tables(vocab=2000)
  prompt = np.random.RandomState(1).normal(size=(5, 16))
  recycled, info = recycling.recycle(prompt, source, target, "v2v-nn", num_words=1500,
                                     word_offset=0, epochs=40, learning_rate=3e-3)
  untrained = recycling.make_recycler("v2v-nn", epochs=0).fit(source[:1500], target[:1500])
  assert info["fit_error"] < 0.1 < recycling.fit_error(untrained, source[:1500], target[:1500])
  error = np.mean((recycled - prompt @ m) ** 2) / np.mean((prompt @ m) ** 2)
  assert error < 0.2, error


def test_bad_inputs_are_refused():
  source, target, _ = _tables()
  with pytest.raises(ValueError, match="exceeds the vocabulary of 300 rows"):
    recycling.recycle(np.zeros((2, 16)), source, target)  # the default 1000 + 4000 rows
  with pytest.raises(ValueError, match="source model's d_model is 16"):
    recycling.recycle(np.zeros((2, 8)), source, target, num_words=100, word_offset=0)
  with pytest.raises(ValueError, match="Unknown recycler"):
    recycling.make_recycler("lin-lin")
  with pytest.raises(ValueError, match="takes no options"):
    recycling.make_recycler("v2v-lin", epochs=3)


# ----- a second model, equivalent under a known map -----

def _model(cfg, seed=0, prompt_length=None, perturb_scales=False):
  module = T5(cfg)
  x = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), x, x)["params"])
  if perturb_scales:  # trained models' norm scales are not all one
    rs = np.random.RandomState(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * rs.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        if "scale" in jax.tree_util.keystr(path) else v, params)
  return params


def _logits(cfg, params, prompt, enc, dec):
  module = T5(cfg, prompt=PromptConfig(length=prompt.shape[0]))
  full = initializers.set_prompt(params, prompt)
  return np.asarray(module.apply({"params": full}, enc, dec))


def _batch(vocab, seed=0):
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, vocab, (3, 10)).astype(np.int32)
  enc[1, 7:] = 0
  dec = rs.randint(2, vocab, (3, 6)).astype(np.int32)
  return enc, dec


@pytest.mark.parametrize("kind, cfg_kwargs, perturb", [
    ("orthogonal", {}, False),                                       # T5 1.1, all scales one
    ("orthogonal", {"mlp_activations": ("relu",), "tie_word_embeddings": True}, False),  # T5 1.0
    ("signed_permutation", {}, True),                                 # trained-like scales
])
def test_a_recycled_prompt_reproduces_the_outputs_on_the_equivalent_model(kind, cfg_kwargs,
                                                                          perturb):
  cfg = tiny_config(vocab_size=128, **cfg_kwargs)
  source = _model(cfg, perturb_scales=perturb)
  basis = recycling.random_basis(cfg.d_model, kind, seed=4)
  target = recycling.equivalent_params(source, basis)
  np.testing.assert_allclose(target["token_embedder"]["embedding"],
                             np.asarray(source["token_embedder"]["embedding"]) @ basis, atol=1e-6)
  enc, dec = _batch(cfg.vocab_size)
  prompt = 0.5 * np.random.RandomState(2).normal(size=(5, cfg.d_model)).astype(np.float32)
  want = _logits(cfg, source, prompt, enc, dec)

  # The construction: the prompt mapped by the known basis gives the source outputs...
  np.testing.assert_allclose(_logits(cfg, target, (prompt @ basis).astype(np.float32), enc, dec),
                             want, atol=1e-4)
  # ...and the prompt as it is does not: the two models really differ.
  assert np.abs(_logits(cfg, target, prompt, enc, dec) - want).max() > 1e-1
  for method in ("v2v-lin", "lin-comb"):
    recycled, info = recycling.recycle(
        prompt, source["token_embedder"]["embedding"], target["token_embedder"]["embedding"],
        method, num_words=100, word_offset=2)
    got = _logits(cfg, target, recycled, enc, dec)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_per_feature_scales_with_a_rotation_are_refused():
  """RMSNorm's scales do not commute with a general rotation: such a 'target' would differ."""
  cfg = tiny_config()
  source = _model(cfg, perturb_scales=True)
  with pytest.raises(ValueError, match="only a signed permutation basis"):
    recycling.equivalent_params(source, recycling.random_basis(cfg.d_model, "orthogonal"))
  with pytest.raises(ValueError, match="must be orthogonal"):
    recycling.equivalent_params(source, 2.0 * np.eye(cfg.d_model))


# ----- the script and the eval entry point -----

@pytest.fixture
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _eval(checkpoint, length, *flags):
  from prompt_tuning import eval as eval_main
  gin.clear_config()
  out = eval_main.main([
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin", *flags,
      f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'", "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", f"--gin.PROMPT_LENGTH={length}",
      "--gin.EVAL_BATCH_SIZE=16", "--gin.EVAL_MAX_EXAMPLES=16"])
  return out["results"]["demo_taskless_last"]


def _from_file(path):
  return ("--gin_file=prompts/from_file.gin", f"--gin.PROMPT_FILE='{path}'")


@pytest.mark.slow
def test_the_script_and_the_run_file_recycle_and_eval_scores_it_as_the_original(tmp_path,
                                                                                 _clean_gin):
  """Demo frozen model -> a signed-permutation copy of it (scripts/rotate_model.py) -> the
  recycled prompt scores what the original scores, through the script + prompts/from_file.gin
  and through runs/recycled_prompt_eval.gin; the unrecycled prompt does not."""
  from prompt_tuning.demo import FROZEN_MODEL_DIR
  from prompt_tuning.scripts import rotate_model
  target_dir = tmp_path / "rotated"
  rotate_model.main(["--checkpoint", str(FROZEN_MODEL_DIR), "--output", str(target_dir),
                     "--kind", "signed_permutation", "--seed", "1"])
  _, source_params = pretrained.load_pretrained(str(FROZEN_MODEL_DIR))
  # A prompt of byte embeddings (any prompt would do: the scores are compared).
  rows = np.array([3 + b for b in b"last word:"])
  prompt = np.asarray(source_params["token_embedder"]["embedding"])[rows]
  prompt_io.save_prompt_npy(tmp_path / "prompt.npy", prompt)
  out = recycle_prompt.main([
      "--source_checkpoint", str(FROZEN_MODEL_DIR), "--target_checkpoint", str(target_dir),
      "--prompt", str(tmp_path / "prompt.npy"), "--output", str(tmp_path / "recycled.npy"),
      "--recycler", "v2v-lin", "--word_offset", "3", "--num_words", "256"])
  assert out["fit_error"] < 1e-10
  original = _eval(FROZEN_MODEL_DIR, len(rows), *_from_file(tmp_path / "prompt.npy"))
  recycled = _eval(target_dir, len(rows), *_from_file(tmp_path / "recycled.npy"))
  in_one_go = _eval(target_dir, len(rows), "--gin_file=runs/recycled_prompt_eval.gin",
                    f"--gin.SOURCE_CHECKPOINT='{FROZEN_MODEL_DIR}'",
                    f"--gin.SOURCE_PROMPT='{tmp_path / 'prompt.npy'}'",
                    f"--gin.RECYCLED_PROMPT='{tmp_path / 'again.npy'}'",
                    "--gin.RECYCLE_WORD_OFFSET=3", "--gin.RECYCLE_NUM_WORDS=256")
  unrecycled = _eval(target_dir, len(rows), *_from_file(tmp_path / "prompt.npy"))
  assert np.load(tmp_path / "again.npy").tobytes() == np.load(tmp_path / "recycled.npy").tobytes()
  for result in (recycled, in_one_go):
    np.testing.assert_allclose(result["loss"], original["loss"], atol=1e-4)
    assert result["exact_match"] == original["exact_match"]
    assert result["token_accuracy"] == original["token_accuracy"]
  assert abs(unrecycled["loss"] - original["loss"]) > 0.1
