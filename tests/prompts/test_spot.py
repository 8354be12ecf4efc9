"""SPoT: the two task-embedding similarities, the retrieval ranking and its script, and the
transfer recipe (runs/spot_finetune.gin) end to end on the demo model."""
import json
import pathlib
import re
import shlex

import gin
import numpy as np
import pytest

from prompt_tuning.formats import prompt_io
from prompt_tuning.prompts import spot
from prompt_tuning.scripts import rank_source_prompts

REPO = pathlib.Path(__file__).resolve().parents[2]


def _prompt(seed, length=8, d_model=16, shift=0.0):
  return np.random.RandomState(seed).normal(shift, 1.0, (length, d_model)).astype(np.float32)


def test_the_similarities_are_the_papers_formulas():
  a, b = _prompt(0, length=5), _prompt(1, length=7)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  want_avg = unit(a.mean(0)) @ unit(b.mean(0))
  want_tok = np.mean([[unit(x) @ unit(y) for y in b] for x in a])
  np.testing.assert_allclose(spot.similarity(a, b, "average_tokens"), want_avg, rtol=1e-5)
  np.testing.assert_allclose(spot.similarity(a, b, "per_token"), want_tok, rtol=1e-5)
  # Both are cosines: scaling a prompt changes nothing, negating it flips the sign.
  for method in spot.METHODS:
    np.testing.assert_allclose(spot.similarity(3.0 * a, b, method), spot.similarity(a, b, method),
                               rtol=1e-5)
    np.testing.assert_allclose(spot.similarity(-a, b, method), -spot.similarity(a, b, method),
                               rtol=1e-5)
    np.testing.assert_allclose(spot.similarity(a, a, "average_tokens"), 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", spot.METHODS)
def test_the_same_tasks_prompt_ranks_first(method):
  """A library of other tasks' prompts (each near its own direction) and a perturbed copy of the
  target's: the copy ranks first, even against a larger prompt sharing part of the target."""
  target = _prompt(10, shift=0.5)
  library = {f"task_{i}": _prompt(i, shift=0.5 * ((-1) ** i)) for i in range(6)}
  library["same_task"] = target + 0.3 * np.random.RandomState(99).normal(size=target.shape)
  library["loud_half"] = 5.0 * np.concatenate([target[:4], _prompt(7, length=4)])
  ranked = spot.rank(target, library, method)
  assert ranked[0][0] == "same_task", ranked
  assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_prompts_of_other_models_are_refused():
  with pytest.raises(ValueError, match="same frozen model"):
    spot.similarity(_prompt(0, d_model=16), _prompt(1, d_model=32))
  with pytest.raises(ValueError, match="Unknown task-embedding method"):
    spot.similarity(_prompt(0), _prompt(1), "mean")


def test_the_script_ranks_files_and_run_folders_and_writes_json(tmp_path, capsys):
  target = _prompt(10, shift=0.5)
  prompt_io.save_prompt_npy(tmp_path / "a.npy", _prompt(1))
  prompt_io.save_prompt_npy(tmp_path / "b.npy", _prompt(2, shift=-0.5))
  # A run folder: its latest exported step is used.
  run = tmp_path / "same_run"
  prompt_io.save_prompt_npy(run / "numpy_checkpoints" / "checkpoint_10" /
                            "encoder.prompt.prompt.npy", _prompt(3))
  prompt_io.save_prompt_npy(run / "numpy_checkpoints" / "checkpoint_200" /
                            "encoder.prompt.prompt.npy", target + 0.1)
  prompt_io.save_prompt_npy(tmp_path / "target.npy", target)
  out = rank_source_prompts.main([
      "--target", str(tmp_path / "target.npy"), "--source", str(tmp_path / "a.npy"),
      "--source", f"bee={tmp_path / 'b.npy'}", "--source", str(run),
      "--json", str(tmp_path / "ranking.json")])
  printed = capsys.readouterr().out
  assert "average_tokens:" in printed and "per_token:" in printed
  written = json.loads((tmp_path / "ranking.json").read_text())
  assert written == json.loads(json.dumps(out))
  for method in spot.METHODS:
    rows = written["rankings"][method]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["source"] == "same_run"
    assert rows[0]["path"].endswith("checkpoint_200/encoder.prompt.prompt.npy")
    assert {r["source"] for r in rows} == {"a", "bee", "same_run"}


def test_the_script_names_a_bad_source(tmp_path, capsys):
  prompt_io.save_prompt_npy(tmp_path / "t.npy", _prompt(0))
  with pytest.raises(SystemExit):
    rank_source_prompts.main(["--target", str(tmp_path / "t.npy"), "--source",
                              str(tmp_path / "missing.npy")])
  assert "missing.npy does not exist" in capsys.readouterr().err


# ----- the transfer recipe, end to end on the demo -----

def _header_commands(path: pathlib.Path) -> list[list[str]]:
  text = re.sub(r"(?m)^# ?", "", path.read_text().split("from __gin__")[0]).replace("\\\n", " ")
  return [shlex.split(l.split("python -m prompt_tuning.train ", 1)[1])
          for l in text.splitlines() if "python -m prompt_tuning.train " in l]


def _shorter(argv, model_dir, steps):
  keep = [a for a in argv if not a.startswith(("--gin.MODEL_DIR", "--gin.TRAIN_STEPS",
                                               "--gin.EVAL_PERIOD", "--gin.CHECKPOINT_PERIOD",
                                               "--gin.EVAL_MAX_EXAMPLES", "--gin.SOURCE_PROMPT"))]
  return keep + [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                 f"--gin.CHECKPOINT_PERIOD={steps}", f"--gin.EVAL_PERIOD={steps}",
                 "--gin.EVAL_MAX_EXAMPLES=16", "--gin.runs.train.log_period=1"]


@pytest.fixture
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.slow
def test_the_recipe_starts_the_target_prompt_from_the_source_prompt(tmp_path, _clean_gin,
                                                                     monkeypatch):
  """runs/spot_finetune.gin's two commands (fewer steps): the target run's first evaluation is
  the source prompt's own score on the target task, bit for bit."""
  from prompt_tuning import eval as eval_main
  from prompt_tuning import train as train_main
  monkeypatch.chdir(REPO)  # the header's checkpoint path is relative to the checkout
  source_cmd, target_cmd = _header_commands(REPO / "gin" / "runs" / "spot_finetune.gin")
  source_cmd = _shorter(source_cmd, tmp_path / "source", 3)
  source_cmd.append("--gin.runs.train.evaluation=None")
  train_main.main(source_cmd)
  source_prompt = tmp_path / "source" / "numpy_checkpoints" / "checkpoint_3" / (
      "encoder.prompt.prompt.npy")

  gin.clear_config()
  # SOURCE_PROMPT: the source run's folder, resolved to its latest exported prompt.
  target = train_main.main(_shorter(target_cmd, tmp_path / "target", 2)
                           + [f"--gin.SOURCE_PROMPT='{tmp_path / 'source'}'"])
  first = json.loads((tmp_path / "target" / "metrics_eval.jsonl").read_text().splitlines()[0])
  assert first["step"] == 0 and target["step"] == 2

  gin.clear_config()  # the source prompt, evaluated as it is on the target task
  flags = [a for a in target_cmd if a.startswith(("--gin.INITIAL_CHECKPOINT_PATH",
                                                  "--gin.MIXTURE_OR_TASK", "--gin.TASK_FEATURE",
                                                  "--gin.PROMPT_LENGTH"))]
  evaluated = eval_main.main(["--gin_file=models/from_checkpoint.gin",
                              "--gin_file=runs/prompt_eval.gin", "--gin_file=prompts/from_file.gin",
                              f"--gin.PROMPT_FILE='{source_prompt}'", "--gin.EVAL_BATCH_SIZE=32",
                              "--gin.EVAL_MAX_EXAMPLES=16", *flags])
  results = evaluated["results"]["demo_taskless_last"]
  assert first["demo_taskless_last/loss"] == results["loss"]
  assert first["demo_taskless_last/exact_match"] == results["exact_match"]
