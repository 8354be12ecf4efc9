"""Evaluation through the real entry points, as users run it: every task family of the task
library (all metric functions, text samples), rank classification, T5X's infer modes (score,
predict-with-aux, n-best) and the evaluation of every checkpoint of a run."""
import json
import pathlib

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from prompt_tuning import T5
from prompt_tuning.inference import decoding
from prompt_tuning import eval as eval_main
from prompt_tuning import infer as infer_main
from prompt_tuning.training import optimizers
from prompt_tuning.formats import pretrained
from prompt_tuning import train as train_main
from prompt_tuning.data import file_tasks
from tests.conftest import tiny_config

# One task per family and metric configuration, in every naming variant (plain, taskless_,
# task_index_, *_examples): each metric function of the task library runs at least once.
FAMILY_TASKS = [
    "taskless_glue_cola_v200_examples", "glue_sst2_v200", "task_index_glue_mrpc_v200",
    "taskless_glue_qqp_v200_examples", "glue_stsb_v200", "taskless_glue_mnli_matched_v200",
    "glue_qnli_v200_examples", "glue_rte_v200", "glue_wnli_v200",
    "taskless_glue_mrpc_from_qqp_v200", "glue_qqp_from_mrpc_v200_examples",
    "taskless_super_glue_rte_v102_examples", "super_glue_boolq_v102",
    "task_index_super_glue_cb_v102_examples", "taskless_super_glue_copa_v102",
    "super_glue_multirc_v102_examples", "taskless_super_glue_record_v102",
    "super_glue_wic_v102", "taskless_super_glue_wsc_v102_simple_eval_examples",
    "squad_v010_allanswers_examples", "mrqa_squad_v100", "mrqa_race_v100_examples",
]
# The diagnostic sets have a test split only.
DIAGNOSTIC_TASKS = ["glue_ax_v200", "super_glue_axb_v102", "task_index_super_glue_axg_v102"]
RANK_TASKS = ["taskless_super_glue_rte_v102_examples", "super_glue_boolq_v102",
              "task_index_super_glue_cb_v102_examples", "taskless_glue_mrpc_from_qqp_v200"]
LENGTHS = "{'inputs': 48, 'targets': 8}"


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _save_tiny(path, vocab_size):
  model = T5(tiny_config(vocab_size=vocab_size))
  x = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, x)["params"])
  pretrained.save_pretrained(path, model, params)
  return str(path)


@pytest.fixture(scope="module")
def t5_vocab_model(tmp_path_factory):
  """A tiny random T5 with the T5 vocabulary's 32128 rows (the tasks' vocabulary)."""
  return _save_tiny(tmp_path_factory.mktemp("frozen") / "tiny_t5_32k", 32128)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
  return _save_tiny(tmp_path_factory.mktemp("frozen") / "tiny_byte_t5", 384)


@pytest.fixture
def mock_tfds(monkeypatch):
  """Mock TFDS data. Mocked builders carry no split sizes, which seqio asks for to decide on its
  in-memory cache (a KeyError under mocking only); report them unknown, as for sources without
  metadata."""
  monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
  with tfds.testing.mock_data(num_examples=2):
    yield


def _mixture(name, tasks):
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(tasks), default_rate=1.0)
  return name


def _eval_flags(checkpoint, task, *extra):
  return ["--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
          f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
          "--gin.MIXTURE_OR_TASK_MODULE='tasks.all'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.EVAL_BATCH_SIZE=8", "--gin.PROMPT_LENGTH=2", *extra]


def _text_summaries(folder: pathlib.Path) -> dict[str, str]:
  """{tag: text} of the text summaries in a TensorBoard folder's event files."""
  out = {}
  for path in folder.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "text":
          out[value.tag] = tf.make_ndarray(value.tensor).item().decode()
  return out


@pytest.mark.slow
def test_every_task_family_evaluates_through_the_eval_entry_point(tmp_path, t5_vocab_model,
                                                                  t5_vocab_file, mock_tfds,
                                                                  capsys):
  """`prompt_tuning.eval` on one task of every family (mock TFDS data) plus a file task: every
  metric function runs through seqio.Evaluator's plumbing, `*_examples` tasks' text samples
  (seqio.metrics.Text) reach the results JSON and TensorBoard as text summaries. Before, every
  `*_examples` task crashed (`float()` of a Text value)."""
  import tasks.all  # noqa: F401
  rows = [{"text": "a fine film", "label": "positive"}, {"text": "dull", "label": "negative"}]
  data = tmp_path / "sentiment.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  file_task = file_tasks.register_file_task(
      "test_eval_file_sentiment", validation=str(data), inputs="review: {text}",
      targets="{label}", class_labels=["negative", "positive"], metrics=["accuracy", "f1"],
      keep_examples=True)
  try:
    # The diagnostics (test split only) are skipped in the mixture's validation evaluation.
    mixture = _mixture("test_eval_every_family", FAMILY_TASKS + [file_task] + DIAGNOSTIC_TASKS)
    out_path = tmp_path / "out" / "results.json"
    out = eval_main.main(_eval_flags(t5_vocab_model, mixture,
                                     f"--gin.OUTPUT_PATH='{out_path}'"))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gin.clear_config()
    diagnostics = eval_main.main(_eval_flags(
        t5_vocab_model, _mixture("test_eval_diagnostics", DIAGNOSTIC_TASKS),
        "--gin.EVAL_SPLIT='test'"))
  finally:
    seqio.TaskRegistry.remove(file_task)
  # (json.dumps: NaN correlations of two random predictions compare equal as text)
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  assert same(printed["results"], out["results"])
  assert same(json.loads(out_path.read_text())["results"], out["results"])
  assert out["decoding"] == "greedy"
  results, samples = out["results"], out["samples"]
  assert sorted(results) == sorted(FAMILY_TASKS + [file_task])
  assert sorted(diagnostics["results"]) == sorted(DIAGNOSTIC_TASKS)
  for task, metrics in results.items():
    assert metrics["examples"] >= 2 and np.isfinite(metrics["loss"]), task  # ReCoRD: more
    # Beyond loss, token_accuracy, examples and truncated_examples: the task's own metrics.
    assert len(metrics) > 4, (task, metrics)
  assert {"matthews_corrcoef"} <= set(results["taskless_glue_cola_v200_examples"])
  assert {"pearson_corrcoef", "spearman_corrcoef"} <= set(results["glue_stsb_v200"])
  assert {"f1", "accuracy"} <= set(results["task_index_glue_mrpc_v200"])
  assert {"em", "f1"} <= set(results["squad_v010_allanswers_examples"])
  examples_tasks = [t for t in results if t.endswith("_examples") or t == file_task]
  assert sorted(samples) == sorted(examples_tasks)
  rte = "taskless_super_glue_rte_v102_examples"
  [key] = [k for k in samples[rte] if k.endswith(" samples") and "wrong" not in k]
  assert "input:" in samples[rte][key] and "prediction:" in samples[rte][key]
  # TensorBoard: text summaries beside the JSON, per task, as seqio's TensorBoardLogger writes.
  tb = _text_summaries(out_path.parent / "eval_greedy" / rte)
  assert tb[f"eval/{key}"] == samples[rte][key]


def test_rank_classification_eval_names_its_results(tmp_path, t5_vocab_model, t5_vocab_file,
                                                    mock_tfds):
  """Rank classification scores each task's labels; its results do not overwrite greedy's."""
  import tasks.all  # noqa: F401
  model_dir = tmp_path / "run"
  mixture = _mixture("test_eval_rank", RANK_TASKS)
  out = eval_main.main(_eval_flags(t5_vocab_model, mixture,
                                   "--gin_file=decoding/rank_classification.gin",
                                   f"--gin.OUTPUT_PATH='{tmp_path / 'rank.json'}'"))
  assert out["decoding"] == "rank_classification"
  labels = {"taskless_super_glue_rte_v102_examples": ("entailment", "not_entailment")}
  rte = out["samples"]["taskless_super_glue_rte_v102_examples"]
  [text] = [v for k, v in rte.items() if k.endswith(" samples") and "wrong" not in k]
  predictions = [line.split(": ", 1)[1] for line in text.splitlines()
                 if line.startswith("prediction: ")]
  assert predictions and set(predictions) <= set(labels["taskless_super_glue_rte_v102_examples"])
  for task in RANK_TASKS:
    assert out["results"][task]["accuracy"] in (0.0, 50.0, 100.0)
  del model_dir


def test_eval_refuses_a_model_dir_without_checkpoints(tmp_path, byte_model):
  """A typo in MODEL_DIR used to create the folder and evaluate a random prompt (exit 0)."""
  typo = tmp_path / "no_such_run"
  flags = ["--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_eval.gin",
           f"--gin.INITIAL_CHECKPOINT_PATH='{byte_model}'", f"--gin.MODEL_DIR='{typo}'",
           "--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'",
           "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'"]
  with pytest.raises(ValueError, match="does not exist, so there is no trained prompt"):
    eval_main.main(flags)
  assert not typo.exists()
  typo.mkdir()
  gin.clear_config()
  with pytest.raises(ValueError, match="has no checkpoints"):
    eval_main.main(flags)
  # With only MODEL_DIR (the run's settings would come from it), the typo is still what is said.
  gin.clear_config()
  only_dir = flags[:3] + [f"--gin.MODEL_DIR='{tmp_path / 'also_no_such_run'}'"]
  with pytest.raises(ValueError, match="does not exist, so there is no trained prompt"):
    eval_main.main(only_dir)


# --- a short run, then every checkpoint and every infer mode ------------------------------------

DEMO = ["--gin.MIXTURE_OR_TASK_NAME='demo_taskless_last'",
        "--gin.MIXTURE_OR_TASK_MODULE='tasks.demo'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.PROMPT_LENGTH=4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, byte_model):
  """4 steps of prompt tuning on the demo task, checkpoints at steps 2 and 4."""
  gin.clear_config()
  model_dir = tmp_path_factory.mktemp("eval_run") / "run"
  train_main.main([
      "--gin_file=models/from_checkpoint.gin", "--gin_file=runs/prompt_finetune.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{byte_model}'", f"--gin.MODEL_DIR='{model_dir}'", *DEMO,
      "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.CHECKPOINT_PERIOD=2",
      "--gin.EVAL_PERIOD=1000", "--gin.DROPOUT_RATE=0.0", "--gin.runs.train.evaluation=None"])
  gin.clear_config()
  return str(model_dir)


def _demo_flags(run_file, byte_model, model_dir, *extra):
  return ["--gin_file=models/from_checkpoint.gin", f"--gin_file=runs/{run_file}",
          f"--gin.INITIAL_CHECKPOINT_PATH='{byte_model}'", f"--gin.MODEL_DIR='{model_dir}'",
          *DEMO, *extra]


def test_eval_all_checkpoints_writes_one_row_per_step(trained_run, byte_model):
  """CHECKPOINT_STEP='all' evaluates every saved step in order; each row equals evaluating that
  step alone."""
  flags = _demo_flags("prompt_eval.gin", byte_model, trained_run, "--gin.EVAL_BATCH_SIZE=8",
                      "--gin.EVAL_MAX_EXAMPLES=8")
  out = eval_main.main(flags + ["--gin.CHECKPOINT_STEP='all'"])
  assert [r["checkpoint_step"] for r in out["checkpoints"]] == [2, 4]
  lines = pathlib.Path(out["path"]).read_text().splitlines()
  assert [json.loads(l)["checkpoint_step"] for l in lines] == [2, 4]
  assert pathlib.Path(out["path"]).name == "eval_all_checkpoints_greedy.jsonl"
  losses = [r["results"]["demo_taskless_last"]["loss"] for r in out["checkpoints"]]
  assert losses[0] != losses[1]
  gin.clear_config()
  alone = eval_main.main(flags + ["--gin.CHECKPOINT_STEP=2"])
  assert alone["results"] == out["checkpoints"][0]["results"]


def test_infer_modes_score_aux_and_n_best(tmp_path, trained_run, byte_model):
  """T5X infer modes: `score` writes each target's log-likelihood (equal to an independent
  teacher-forced scoring), `predict_with_aux` the decodes' scores, and beam search's n-best
  hypotheses come best first."""
  from prompt_tuning.training import checkpoints
  from prompt_tuning.model.prompt import PromptConfig
  from prompt_tuning.runs import eval_infer
  from prompt_tuning.runs import setup as run_setup
  base = _demo_flags("prompt_infer.gin", byte_model, trained_run, "--gin.BATCH_SIZE=8",
                     "--gin.INFER_MAX_EXAMPLES=6", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'")
  read = lambda p: [json.loads(l) for l in pathlib.Path(p).read_text().splitlines()]
  [score_path] = infer_main.main(base + ["--gin.INFER_MODE='score'"])
  assert pathlib.Path(score_path).name == "demo_taskless_last-4.score.jsonl"
  scored = read(score_path)
  gin.clear_config()
  [aux_path] = infer_main.main(base + ["--gin.INFER_MODE='predict_with_aux'"])
  aux = read(aux_path)
  gin.clear_config()
  [pred_path] = infer_main.main(base)
  predicted = read(pred_path)
  gin.clear_config()
  [beam_path] = infer_main.main(base + ["--gin_file=decoding/beam_search.gin",
                                        "--gin.decoding.DecodingConfig.max_decode_length=8",
                                        "--gin.NUM_RETURN_SEQUENCES=3"])
  beams = read(beam_path)
  assert len(scored) == len(aux) == len(predicted) == len(beams) == 6

  # Independent scoring of the same examples with the restored prompt.
  setup = run_setup.build(
      model_config=None, prompt_config=PromptConfig(length=4),
      initial_checkpoint_path=byte_model, partition=run_setup.PartitionConfig(num_devices=1),
      trainable_patterns=optimizers.PROMPT_PATTERNS,
      task_feature_lengths={"inputs": 32, "targets": 8}, prompt_init=run_setup.PromptInit(),
      random_seed=0)
  trainable, _ = eval_infer._restore_trainable(setup, trained_run, 4)  # pylint: disable=protected-access
  params = optimizers.merge_params(trainable, setup.frozen)
  task = seqio.get_mixture_or_task("demo_taskless_last")
  examples = list(task.get_dataset({"inputs": 32, "targets": 8}, split="validation",
                                   shuffle=False).take(6).as_numpy_iterator())
  enc = np.zeros((6, 32), np.int32)
  tgt = np.zeros((6, 8), np.int32)
  for i, ex in enumerate(examples):
    enc[i, :len(ex["inputs"])] = ex["inputs"]
    tgt[i, :len(ex["targets"])] = ex["targets"]
  expected = decoding.score_targets(setup.module, params, enc, decoding.shift_right(tgt), tgt)
  np.testing.assert_allclose([r["score"] for r in scored], expected, rtol=1e-5, atol=1e-5)
  assert [r["target"] for r in scored] == [ex["targets_pretokenized"].decode() for ex in examples]

  assert [r["prediction"] for r in aux] == [r["prediction"] for r in predicted]
  np.testing.assert_allclose([r["aux_value"]["scores"] for r in aux],
                             [r["score"] for r in predicted], rtol=1e-6)
  _, greedy_scores = decoding.greedy(setup.module, params, enc, max_decode_length=8)
  np.testing.assert_allclose([r["score"] for r in predicted], greedy_scores, rtol=1e-5, atol=1e-5)

  for r in beams:
    assert len(r["n_best"]) == 3 and r["prediction"] == r["n_best"][0]["prediction"]
    s = [b["score"] for b in r["n_best"]]
    assert s == sorted(s, reverse=True)
  _, beam_scores = decoding.beam_search(setup.module, params, enc, max_decode_length=8,
                                        num_beams=4, return_all_beams=True)
  np.testing.assert_allclose([[b["score"] for b in r["n_best"]] for r in beams],
                             np.asarray(beam_scores)[:, :3], rtol=1e-5, atol=1e-5)
  del checkpoints
