"""Wayward prompts: the regulariser's value and gradient, that weight 0 changes nothing, that a
large weight makes the prompt's nearest tokens spell the text, and the gin file end to end."""
import json
import pathlib
import re
import shlex

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning import T5, PromptConfig
from prompt_tuning.training import optimizers
from prompt_tuning.training import step as train_lib
from prompt_tuning.training import wayward
from prompt_tuning.training.objective import EncoderDecoderModel
from prompt_tuning.scripts import nearest_tokens
from tests.conftest import tiny_config
from tests.training.test_step import _batch

RNG = jax.random.PRNGKey(0)
REPO = pathlib.Path(__file__).resolve().parents[2]
TEXT_IDS = (5, 17, 33, 8, 50, 21)


def _setup(regularizer=None, patterns=optimizers.PROMPT_PATTERNS, cfg=None):
  cfg = cfg or tiny_config()
  module = T5(cfg, prompt=PromptConfig(length=len(TEXT_IDS)))
  batch = _batch(vocab=cfg.vocab_size)
  params = nn.meta.unbox(module.init(RNG, batch["encoder_input_tokens"],
                                     batch["decoder_input_tokens"])["params"])
  trainable, frozen = optimizers.split_params(params, patterns)
  return EncoderDecoderModel(module, regularizer=regularizer), trainable, frozen, batch


def _grads(model, trainable, frozen, batch):
  """The gradient the train step hands its optimizer (kept as that optimizer's state)."""
  keep = optax.GradientTransformation(
      lambda p: jax.tree_util.tree_map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))
  state = train_lib.create_train_state(trainable, keep)
  step = jax.jit(lambda s, f, b: train_lib.train_step(s, f, b, RNG, model=model, tx=keep))
  new_state, metrics = step(state, frozen, batch)
  return new_state.opt_state, metrics


def test_value_is_the_mean_squared_distance_and_its_gradient_reaches_the_prompt_only():
  reg = wayward.WaywardRegularizer(TEXT_IDS, weight=0.7)
  model, trainable, frozen, batch = _setup(reg)
  plain, _, _, _ = _setup()
  params = optimizers.merge_params(trainable, frozen)
  prompt = np.asarray(params["encoder"]["prompt"]["prompt"], np.float64)
  target = np.asarray(params["token_embedder"]["embedding"], np.float64)[list(TEXT_IDS)]
  value, aux = reg(params)
  want = ((prompt - target) ** 2).sum() / len(TEXT_IDS)
  np.testing.assert_allclose(float(aux["wayward_distance"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(value), 0.7 * want, rtol=1e-5)

  g_reg, metrics = _grads(model, trainable, frozen, batch)
  g_plain, plain_metrics = _grads(plain, trainable, frozen, batch)
  # The trainable tree is the prompt alone; the regulariser adds d/dp of w * mean ||p - e||^2.
  assert [optimizers.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(g_reg)] == [
      "encoder/prompt/prompt"]
  extra = np.asarray(g_reg["encoder"]["prompt"]["prompt"]) - np.asarray(
      g_plain["encoder"]["prompt"]["prompt"])
  np.testing.assert_allclose(extra, 2 * 0.7 * (prompt - target) / len(TEXT_IDS), atol=1e-5)
  # "loss" stays the task loss; the objective adds the weighted distance.
  assert float(metrics["loss"]) == float(plain_metrics["loss"])
  np.testing.assert_allclose(float(metrics["objective"]), float(metrics["loss"]) + 0.7 * want,
                             rtol=1e-5)


def test_the_text_embeddings_are_a_fixed_target_even_when_the_embedding_trains():
  """Model tuning with the regulariser: it pulls the prompt, never the embedding table."""
  reg = wayward.WaywardRegularizer(TEXT_IDS, weight=1.0)
  model, trainable, frozen, batch = _setup(reg, patterns=optimizers.ALL_PATTERNS)
  plain, _, _, _ = _setup(patterns=optimizers.ALL_PATTERNS)
  g_reg, _ = _grads(model, trainable, frozen, batch)
  g_plain, _ = _grads(plain, trainable, frozen, batch)
  np.testing.assert_array_equal(np.asarray(g_reg["token_embedder"]["embedding"]),
                                np.asarray(g_plain["token_embedder"]["embedding"]))
  assert not np.array_equal(np.asarray(g_reg["encoder"]["prompt"]["prompt"]),
                            np.asarray(g_plain["encoder"]["prompt"]["prompt"]))


def test_weight_zero_trains_exactly_as_the_plain_loss():
  model, trainable, frozen, batch = _setup(wayward.WaywardRegularizer(TEXT_IDS, weight=0.0))
  plain, _, _, _ = _setup()
  tx = optimizers.prompt_tuning_optimizer()
  runs = []
  for m in (model, plain):
    state = train_lib.create_train_state(_copy(trainable), tx)  # the step donates its state
    step = train_lib.jit_train_step(m, tx, num_microbatches=2)
    losses = []
    for _ in range(3):
      state, metrics = step(state, frozen, batch, RNG)
      losses.append(float(metrics["loss"]))
    runs.append((np.asarray(state.params["encoder"]["prompt"]["prompt"]), losses, metrics))
  (p_reg, l_reg, m_reg), (p_plain, l_plain, _) = runs
  assert p_reg.tobytes() == p_plain.tobytes()
  assert l_reg == l_plain
  assert float(m_reg["objective"]) == l_reg[-1]


def _copy(tree):
  return jax.tree_util.tree_map(jnp.array, tree)


def _train(model, trainable, frozen, batch, steps):
  tx = optimizers.prompt_tuning_optimizer()
  state = train_lib.create_train_state(_copy(trainable), tx)  # the step donates its state
  step = train_lib.jit_train_step(model, tx)
  for _ in range(steps):
    state, metrics = step(state, frozen, batch, RNG)
  assert bool(metrics["finite"])
  return np.asarray(state.params["encoder"]["prompt"]["prompt"]), metrics


def test_a_large_weight_makes_the_nearest_tokens_spell_the_text():
  """The paper's effect: the prompt trains on the task and projects to the given text."""
  cfg = tiny_config(d_model=32, d_kv=8, d_ff=64)
  model, trainable, frozen, batch = _setup(wayward.WaywardRegularizer(TEXT_IDS, weight=10.0),
                                           cfg=cfg)
  plain, _, _, _ = _setup(cfg=cfg)
  table = np.asarray(frozen["token_embedder"]["embedding"])
  before = nearest_tokens.nearest_tokens(np.asarray(trainable["encoder"]["prompt"]["prompt"]),
                                         table, k=1)[0][:, 0]
  assert tuple(before) != TEXT_IDS  # a random prompt does not spell it already
  prompt, metrics = _train(model, trainable, frozen, batch, steps=60)
  ids = nearest_tokens.nearest_tokens(prompt, table, k=1)[0][:, 0]
  assert tuple(int(i) for i in ids) == TEXT_IDS
  # The paper projects by Euclidean distance: that spells the text too.
  euclid = np.argmin(((prompt[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
  assert tuple(int(i) for i in euclid) == TEXT_IDS
  plain_prompt, _ = _train(plain, trainable, frozen, batch, steps=60)
  plain_ids = nearest_tokens.nearest_tokens(plain_prompt, table, k=1)[0][:, 0]
  assert tuple(int(i) for i in plain_ids) != TEXT_IDS
  assert float(metrics["wayward_distance"]) < 0.05 * float(
      wayward.WaywardRegularizer(TEXT_IDS)(optimizers.merge_params(trainable, frozen))[1][
          "wayward_distance"])


def test_a_prompt_length_other_than_the_texts_is_refused():
  model, trainable, frozen, batch = _setup(wayward.WaywardRegularizer(TEXT_IDS[:4]))
  with pytest.raises(ValueError, match="set PROMPT_LENGTH=4"):
    model.loss_fn(optimizers.merge_params(trainable, frozen), batch)


@pytest.mark.parametrize("kwargs, message", [
    ({"token_ids": (), "weight": 1.0}, "needs the text's token ids"),
    ({"token_ids": (3,), "weight": -1.0}, "WAYWARD_WEIGHT must be a number >= 0"),
])
def test_bad_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    wayward.WaywardRegularizer(**kwargs)


def test_the_text_is_tokenised_with_the_tasks_vocabulary():
  ids = wayward.tokenize("the last word", task="demo_taskless_last", module="tasks.demo")
  assert ids == tuple(b + 3 for b in b"the last word")  # seqio.ByteVocabulary: bytes after 3 ids
  with pytest.raises(ValueError, match="WAYWARD_TEXT must be a non-empty string"):
    wayward.tokenize("", task="demo_taskless_last", module="tasks.demo")


def _header_command(path: pathlib.Path, entry: str) -> list[str]:
  text = re.sub(r"(?m)^# ?", "", path.read_text().split("from __gin__")[0]).replace("\\\n", " ")
  line = next(l for l in text.splitlines() if f"python -m prompt_tuning.{entry} " in l)
  return shlex.split(line.split(f"python -m prompt_tuning.{entry} ", 1)[1])


@pytest.fixture
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.slow
def test_the_gin_files_header_command_trains_the_demo_towards_its_text(tmp_path, _clean_gin,
                                                                       monkeypatch):
  """prompts/wayward.gin's own command (fewer steps): PROMPT_LENGTH follows the text, the logs
  hold the distance, and the exported prompt's nearest tokens spell the text."""
  from prompt_tuning import train as train_main
  monkeypatch.chdir(REPO)  # the header's checkpoint path is relative to the checkout
  argv = _header_command(REPO / "gin" / "prompts" / "wayward.gin", "train")
  argv = [a for a in argv if not a.startswith(("--gin.MODEL_DIR", "--gin.TRAIN_STEPS",
                                               "--gin.EVAL_PERIOD", "--gin.CHECKPOINT_PERIOD"))]
  argv += [f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=40",
           "--gin.CHECKPOINT_PERIOD=40", "--gin.runs.train.evaluation=None",
           "--gin.runs.train.log_period=40"]
  result = train_main.main(argv)
  assert result["trainable_params"] == len("the last word") * 128
  row = json.loads((tmp_path / "run" / "metrics_train.jsonl").read_text().splitlines()[-1])
  assert {"loss", "wayward_distance", "objective"} <= set(row)
  np.testing.assert_allclose(row["objective"], row["loss"] + row["wayward_distance"], rtol=1e-5)
  out = nearest_tokens.main([
      "--byte_vocab", "--k", "1", "--checkpoint", "prompt_tuning/demo/frozen_model", "--prompt",
      str(tmp_path / "run" / "numpy_checkpoints" / "checkpoint_40" / "encoder.prompt.prompt.npy")])
  assert "".join(t[0] for t in out["tokens"]).replace("\\x20", " ") == "the last word"
