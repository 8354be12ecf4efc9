"""Prompt banks at inference: mixed-task batches and ensembles give what each prompt gives alone.

A row's output may depend only on its input and its own prompt, never on which other tasks or
prompts share its batch; the vote is then a pure function of the per-prompt outputs.
"""
import json

import flax
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from prompt_tuning import T5, PromptConfig, multi_infer
from prompt_tuning.inference import decoding
from prompt_tuning.prompts import initializers
from prompt_tuning.inference import ensembles
from prompt_tuning.prompts import bank
from prompt_tuning.formats import pretrained
from prompt_tuning.formats import prompt_io
from tests.conftest import tiny_config

CONFIG = tiny_config(num_encoder_layers=1)
LENGTH, MAX_LEN = 3, 8
ENC = np.array([[5, 9, 33, 1, 0, 0], [17, 2, 1, 0, 0, 0], [40, 41, 42, 43, 44, 1],
                [8, 1, 0, 0, 0, 0], [60, 12, 30, 1, 0, 0]], np.int32)
GREEDY = decoding.DecodingConfig(max_decode_length=MAX_LEN)


def _frozen_params(config=CONFIG, seed=4):
  """Random frozen weights (no prompt), filled by numpy from traced shapes: no init compile."""
  shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), ENC, ENC[:, :2])
  rng = np.random.RandomState(seed)
  params = {}
  for path, s in flax.traverse_util.flatten_dict(nn.meta.unbox(shapes["params"])).items():
    if path[-1] == "scale":
      params[path] = np.ones(s.shape, s.dtype)
    elif path[-1] == "kernel":
      params[path] = rng.normal(0.0, s.shape[0] ** -0.5, s.shape).astype(s.dtype)
    else:
      params[path] = rng.normal(0.0, 1.0, s.shape).astype(s.dtype)
  params = flax.traverse_util.unflatten_dict(params)
  params["decoder"]["logits_dense"]["kernel"][:, 1] *= 3.0  # some rows stop early
  return params


@pytest.fixture(scope="module")
def setup():
  """Three distinct prompts and each one's greedy outputs, decoded alone (a 1-prompt model)."""
  frozen = _frozen_params()
  rng = np.random.RandomState(0)
  prompts = [rng.uniform(-2.0, 2.0, (LENGTH, CONFIG.d_model)).astype(np.float32)
             for _ in range(3)]
  single = T5(CONFIG, prompt=PromptConfig(length=LENGTH))
  alone = [decoding.greedy(single, initializers.set_prompt(frozen, p), ENC,
                           max_decode_length=MAX_LEN) for p in prompts]
  tokens = np.stack([np.asarray(t) for t, _ in alone])  # [N, B, T]
  scores = np.stack([np.asarray(s) for _, s in alone])
  return frozen, prompts, tokens, scores


def _bank(frozen, prompts):
  model = bank.bank_model(CONFIG, len(prompts), LENGTH)
  return model, bank.with_bank(frozen, bank.build_bank(prompts))


def test_mixed_task_batches_equal_each_prompt_alone(setup):
  frozen, prompts, alone, alone_scores = setup
  assert len({alone[n].tobytes() for n in range(3)}) == 3  # the prompts change the outputs
  assert (alone[..., -1] == 0).any() and (alone[..., -1] != 0).any()  # early EOS and full length
  model, params = _bank(frozen, prompts)
  index = np.array([2, 0, 1, 1, 0])
  requests = [(int(i), ENC[b][ENC[b] > 0].tolist()) for b, i in enumerate(index)]
  # Batches of 3: two batches, the second padded; rows of different prompts share each batch.
  tokens, scores = ensembles.decode_mixed(model, params, requests, GREEDY, batch_size=3,
                                             input_length=ENC.shape[1])
  rows = np.arange(len(ENC))
  np.testing.assert_array_equal(tokens, alone[index, rows])
  np.testing.assert_allclose(scores, alone_scores[index, rows], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"prompt indices must be in \[0, 3\)"):
    ensembles.decode_mixed(model, params, [(3, [5, 1])], GREEDY, batch_size=3)


def test_mixed_rank_classification_ranks_each_tasks_own_labels(setup):
  """Tasks with label sets of different sizes share batches: each row picks among its own
  task's labels exactly as ranking that task alone would (padding never wins)."""
  frozen, prompts, _, _ = setup
  model, params = _bank(frozen, prompts[:2])
  tables = [decoding.pad_candidates([[5, 1], [7, 1]]),
            decoding.pad_candidates([[12, 1], [40, 1], [4, 9, 1]])]
  index = np.array([0, 1, 0, 1, 1])
  candidates = ensembles.stack_candidates(tables)[index]
  cfg = decoding.DecodingConfig(method="rank_classification")
  tokens, _ = ensembles.decode_rows(model, params, ENC, index, cfg, batch_size=len(ENC),
                                       candidate_targets_NxCxT=candidates)
  for k, table in enumerate(tables):
    best, _ = decoding.rank_classification(model, params, ENC, table,
                                           prompt_index=np.full(len(ENC), k))
    rows = index == k
    expected = table[np.asarray(best)][rows]
    np.testing.assert_array_equal(tokens[rows, :expected.shape[1]], expected)
  assert len({tuple(t) for t in tokens.tolist()}) >= 3  # the rows do not all agree


def test_ensemble_equals_a_vote_over_each_prompt_alone(setup):
  frozen, prompts, alone, alone_scores = setup
  model, params = _bank(frozen, prompts)
  out = ensembles.decode_ensemble(model, params, ENC, GREEDY, batch_size=3)
  np.testing.assert_array_equal(out.tokens_BxNxT, alone.transpose(1, 0, 2))
  np.testing.assert_allclose(out.scores_BxN, alone_scores.T, rtol=1e-5, atol=1e-5)
  keys = [[ensembles.output_key(alone[n, b]) for n in range(3)] for b in range(len(ENC))]
  choice, votes = ensembles.majority_vote(keys, alone_scores.T)
  np.testing.assert_array_equal(out.choice_B, choice)
  np.testing.assert_array_equal(out.votes_B, votes)
  np.testing.assert_array_equal(out.tokens_BxT, alone[choice, np.arange(len(ENC))])

  # Bank [A, B, A]: A has two votes wherever B disagrees, so the ensemble is A's output.
  model, params = _bank(frozen, [prompts[0], prompts[1], prompts[0]])
  out = ensembles.decode_ensemble(model, params, ENC, GREEDY, batch_size=3)
  np.testing.assert_array_equal(out.tokens_BxT, alone[0])
  assert (out.votes_B >= 2).all() and (out.votes_B == 2).any()


def test_majority_vote_ties_are_deterministic():
  vote = lambda keys, scores: tuple(
      x.tolist() for x in ensembles.majority_vote([keys], [scores]))
  assert vote(["a", "b", "a"], [-9.0, -0.1, -9.0]) == ([0], [2])  # votes beat scores
  assert vote(["x", "y", "z"], [-3.0, -1.0, -2.0]) == ([1], [1])  # 1-1-1: best score
  assert vote(["x", "y", "y", "x"], [-1.0, -2.0, -2.0, -1.0]) == ([0], [2])  # summed score
  assert vote(["x", "y", "y", "x"], [-3.0, -1.0, -1.0, -3.0]) == ([1], [2])
  assert vote(["x", "y", "y", "x"], [-1.0, -1.0, -1.0, -1.0]) == ([0], [2])  # lowest index
  assert vote(["x", "y"], [np.nan, -5.0]) == ([1], [1])  # NaN never wins a tie


def test_build_bank_reads_every_format_and_checks_shapes(tmp_path):
  rng = np.random.RandomState(0)
  a, b, c = (rng.normal(size=(LENGTH, 4)).astype(np.float32) for _ in range(3))
  np.save(tmp_path / "a.npy", a)
  with open(tmp_path / "b", "wb") as f:  # the original implementation's extension-less export
    np.save(f, b)
  prompt_io.export_peft_adapter(tmp_path / "c", c, base_model_name_or_path="t5",
                                num_layers=1, num_attention_heads=1)
  stacked = bank.build_bank([tmp_path / "a.npy", str(tmp_path / "b"), tmp_path / "c", a])
  np.testing.assert_array_equal(stacked, np.stack([a, b, c, a]))
  np.save(tmp_path / "long.npy", np.zeros((LENGTH + 1, 4), np.float32))
  with pytest.raises(prompt_io.PromptFileError, match=r"long.npy: shape \(4, 4\) differs"):
    bank.build_bank([tmp_path / "a.npy", tmp_path / "long.npy"])
  with pytest.raises(ValueError, match="a list of prompts"):
    bank.build_bank(str(tmp_path / "a.npy"))
  # with_bank replaces a single prompt by the bank.
  params = initializers.set_prompt({"encoder": {"x": 1}}, a)
  assert initializers.get_prompt(bank.with_bank(params, stacked)).shape == (4, LENGTH, 4)


def test_stack_candidates_pads_with_real_candidates():
  table = ensembles.stack_candidates([[[5, 1, 0], [7, 8, 1]], [[12, 1]]])
  np.testing.assert_array_equal(table, [[[5, 1, 0], [7, 8, 1]], [[12, 1, 0], [12, 1, 0]]])


# ----- the command line -----

@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_cli_ensemble_eval_and_mixed_inference_agree(tmp_path):
  """Both run modes end to end on the demo tasks; prompt 0's predictions on `demo_last` are the
  same whether its batches held the other prompts (ensemble) or another task (mixed)."""
  cfg = tiny_config(vocab_size=384)  # the demo tasks' byte vocabulary
  checkpoint = tmp_path / "frozen"
  pretrained.save_pretrained(checkpoint, T5(cfg), _frozen_params(cfg))
  rng = np.random.RandomState(1)
  files = []
  for n in range(3):
    files.append(str(tmp_path / f"p{n}.npy"))
    np.save(files[-1], rng.uniform(-3, 3, (4, cfg.d_model)).astype(np.float32))
  common = ["--gin_file=models/from_checkpoint.gin",
            f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
            "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 6}", "--gin.BATCH_SIZE=8",
            "--gin.runs.PartitionConfig.num_devices=1"]  # one device: a faster compile
  result = multi_infer.main(common + [
      "--gin_file=runs/prompt_ensemble_eval.gin", f"--gin.PROMPT_FILES={files}",
      "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'", "--gin.EVAL_MAX_EXAMPLES=5",
      f"--gin.OUTPUT_DIR='{tmp_path / 'ensemble'}'"])
  metrics = result["results"]["demo_taskless_last"]
  assert set(metrics) >= {"ensemble", "mean", "best", "prompts", "unanimous"}
  assert [p["prompt_file"] for p in metrics["prompts"]] == files
  assert metrics["best"]["exact_match"] >= metrics["mean"]["exact_match"]
  rows = [json.loads(l) for l in open(tmp_path / "ensemble" / "demo_taskless_last-ensemble.jsonl")]
  assert len(rows) == 5 and all(len(r["prompt_predictions"]) == 3 for r in rows)
  assert all(r["prediction"] in r["prompt_predictions"] for r in rows)
  assert (tmp_path / "ensemble" / "ensemble_results.json").exists()

  gin.clear_config()
  out_dir = tmp_path / "mixed"
  # Three tasks, so the bank (and the compiled decoder) is the ensemble's.
  tasks = ["demo_taskless_last", "demo_first", "demo_upper"]
  mixed = multi_infer.main(common + [
      "--gin_file=runs/prompt_bank_infer.gin", f"--gin.PROMPT_FILES={files}",
      f"--gin.TASKS={tasks}", "--gin.INFER_MAX_EXAMPLES=5", f"--gin.INFER_OUTPUT_DIR='{out_dir}'"])
  assert list(mixed["results"]) == tasks
  lines = [json.loads(l) for l in open(out_dir / "mixed_predictions.jsonl")]
  assert [l["task"] for l in lines[:6]] == tasks * 2
  last = [l["prediction"] for l in lines if l["prompt_index"] == 0]
  assert last == [r["prompt_predictions"][0] for r in rows]
  first_inputs = [l["inputs"] for l in lines if l["task"] == "demo_first"]
  assert all(i.startswith("first: ") for i in first_inputs)

  gin.clear_config()
  with pytest.raises(ValueError, match="one prompt file per task"):
    multi_infer.main(common + [
        "--gin_file=runs/prompt_bank_infer.gin", f"--gin.PROMPT_FILES={files}",
        "--gin.TASKS=['demo_first']", f"--gin.INFER_OUTPUT_DIR='{out_dir}'"])
