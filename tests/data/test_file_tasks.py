"""Tasks from JSONL/TSV files: registration, the data they yield, and line-level errors."""
import json

import gin
import pytest
import seqio

from prompt_tuning.data import file_tasks
from prompt_tuning.data import registry


@pytest.fixture
def cleanup():
  """Removes the tasks a test registers."""
  names = []
  yield names.append
  for name in names:
    seqio.TaskRegistry.remove(name)
    file_tasks._FILE_TASKS.pop(name, None)


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def examples(name, split):
  task = seqio.get_mixture_or_task(name)
  return list(task.get_dataset(None, split=split, shuffle=False, use_cached=False,
                               try_in_mem_cache=False).as_numpy_iterator())


SENTIMENT = [{"text": "a fine film", "label": "positive", "idx": 0},
             {"text": "dull", "label": "negative", "idx": 1}]


def test_jsonl_task(tmp_path, cleanup, t5_vocab_file):
  train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT)
  name = file_tasks.register_file_task(
      "ft_sentiment", train=train, validation=train, inputs="review: {text}", targets="{label}",
      class_labels=["negative", "positive"], metrics=["accuracy", "f1"])
  cleanup(name)
  assert name == "ft_sentiment"
  out = examples(name, "validation")
  assert [o["inputs_pretokenized"] for o in out] == [b"review: a fine film", b"review: dull"]
  assert [o["targets_pretokenized"] for o in out] == [b"positive", b"negative"]
  vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  assert list(out[0]["targets"]) == vocab.encode("positive") + [1]
  assert registry.class_labels(name) == ("negative", "positive")
  task = seqio.get_mixture_or_task(name)
  assert task.postprocess_fn("positive", example={}, is_target=False) == 1
  assert [fn.__name__ for fn in task.metric_fns] == ["accuracy", "f1_score_with_invalid"]


def test_tsv_with_header_and_without(tmp_path, cleanup, t5_vocab_file):
  (tmp_path / "h.tsv").write_text("sentence\tlabel\nok film\t1\nbad\t0\n")
  (tmp_path / "n.tsv").write_text("ok film\t1\n")
  name = file_tasks.register_file_task("ft_tsv", train=str(tmp_path / "h.tsv"),
                                       inputs="{sentence}", targets="{label}")
  cleanup(name)
  assert [o["targets_pretokenized"] for o in examples(name, "train")] == [b"1", b"0"]
  name = file_tasks.register_file_task("ft_tsv_noheader", train=str(tmp_path / "n.tsv"),
                                       tsv_field_names=["sentence", "label"],
                                       inputs="{sentence}", targets="{label}")
  cleanup(name)
  assert [o["inputs_pretokenized"] for o in examples(name, "train")] == [b"ok film"]


def test_qa_task_keeps_all_answers(tmp_path, cleanup, t5_vocab_file):
  path = write_jsonl(tmp_path / "qa.jsonl", [
      {"q": "Who?", "c": "Ann ran.", "a": ["Ann", "ann"]},
      {"q": "What?", "c": "It ran.", "a": ["It"]}])
  name = file_tasks.register_file_task("ft_qa", validation=path,
                                       inputs="question: {q} context: {c}", targets="{c}",
                                       answers_field="a", keep_examples=True)
  cleanup(name)
  out = examples(name, "validation")
  assert [list(o["answers"]) for o in out] == [[b"Ann", b"ann"], [b"It"]]
  task = seqio.get_mixture_or_task(name)
  assert task.postprocess_fn("x", example=out[0], is_target=True) == ["Ann", "ann"]
  assert registry.class_labels(name) == ()


def test_register_is_idempotent_and_replaces_changed_settings(tmp_path, cleanup):
  path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT)
  kwargs = dict(train=path, inputs="{text}", targets="{label}")
  name = file_tasks.register_file_task("ft_again", **kwargs)
  cleanup(name)
  first = seqio.get_mixture_or_task(name)
  assert file_tasks.register_file_task("ft_again", **kwargs) == name
  assert seqio.get_mixture_or_task(name) is first
  file_tasks.register_file_task("ft_again", **dict(kwargs, inputs="text: {text}"))
  assert seqio.get_mixture_or_task(name) is not first


def test_name_of_a_built_in_task_is_refused(tmp_path, cleanup):
  path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT)
  seqio.TaskRegistry.add("ft_not_a_file_task", source=seqio.FunctionDataSource(
      lambda split, shuffle_files: None, splits=["train"]), preprocessors=[],
      output_features={})
  cleanup("ft_not_a_file_task")
  with pytest.raises(ValueError, match="not a file task"):
    file_tasks.register_file_task("ft_not_a_file_task", train=path, inputs="{text}",
                                  targets="{label}")


def test_gin_registers_and_returns_the_name(tmp_path, cleanup):
  path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT)

  @gin.configurable("ft_consumer")
  def consumer(mixture_or_task_name=gin.REQUIRED):
    return mixture_or_task_name

  gin.parse_config(f"""
      ft_consumer.mixture_or_task_name = @sentiment/file_tasks.register_file_task()
      sentiment/file_tasks.register_file_task.name = "ft_gin"
      sentiment/file_tasks.register_file_task.train = "{path}"
      sentiment/file_tasks.register_file_task.inputs = "{{text}}"
      sentiment/file_tasks.register_file_task.targets = "{{label}}"
      sentiment/file_tasks.register_file_task.class_labels = ["negative", "positive"]
  """)
  try:
    assert consumer() == "ft_gin"
    cleanup("ft_gin")
    assert registry.class_labels("ft_gin") == ("negative", "positive")
  finally:
    gin.clear_config()


@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok", "label": "positive"', "invalid JSON"),
    ('["ok", "positive"]', "expected a JSON object, got a list"),
    ('{"text": "ok"}', "missing field 'label' (the line has: text)"),
    ('{"text": null, "label": "positive"}', "field 'text' must be a string or a number, got null"),
    ('{"text": "ok", "label": "great"}', "targets 'great' is not one of the class labels"),
    ('{"text": "", "label": "positive"}', "inputs are empty"),
])
def test_bad_jsonl_line_is_named(tmp_path, line, problem):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(SENTIMENT[0]) + "\n\n" + line + "\n")
  with pytest.raises(file_tasks.FileTaskError) as error:
    file_tasks.register_file_task("ft_bad", train=str(path), inputs="{text}", targets="{label}",
                                  class_labels=["negative", "positive"])
  message = str(error.value)
  assert f"{path}:3: " in message  # line 2 is blank and skipped
  assert problem in message
  assert "ft_bad" not in seqio.TaskRegistry.names()


def test_bad_tsv_lines_are_all_reported(tmp_path):
  path = tmp_path / "dev.tsv"
  path.write_bytes(b"sentence\tlabel\nfine\t1\nno label here\nalso\t1\textra\n\xff\t0\n")
  with pytest.raises(file_tasks.FileTaskError) as error:
    file_tasks.register_file_task("ft_bad_tsv", validation=str(path), inputs="{sentence}",
                                  targets="{label}")
  message = str(error.value)
  assert "3 problem(s)" in message
  assert f"{path}:3: expected 2 tab-separated fields (sentence, label), found 1" in message
  assert f"{path}:4: expected 2 tab-separated fields (sentence, label), found 3" in message
  assert f"{path}:5: not valid UTF-8" in message


def test_bad_header_missing_file_and_settings(tmp_path):
  path = tmp_path / "h.tsv"
  path.write_text("text\tgold\nfine\t1\n")
  with pytest.raises(file_tasks.FileTaskError, match=r"h.tsv:1: header has no field 'label'"):
    file_tasks.register_file_task("ft_x", train=str(path), inputs="{text}", targets="{label}")
  with pytest.raises(file_tasks.FileTaskError, match="no such file"):
    file_tasks.register_file_task("ft_x", train=str(tmp_path / "nope.jsonl"), inputs="{text}")
  with pytest.raises(ValueError, match="at least one of train/validation/test"):
    file_tasks.register_file_task("ft_x", inputs="{text}")
  with pytest.raises(ValueError, match="give class_labels"):
    file_tasks.register_file_task("ft_x", train=str(path), metrics=["f1"])
  with pytest.raises(ValueError, match="unknown metric"):
    file_tasks.register_file_task("ft_x", train=str(path), metrics=["bleu"])
  qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Who?", "a": []}])
  with pytest.raises(file_tasks.FileTaskError, match=r"qa.jsonl:1: field 'a' must be a non-empty"):
    file_tasks.register_file_task("ft_x", train=qa, inputs="{q}", targets="{q}",
                                  answers_field="a")


def test_regression_targets_must_be_numbers(tmp_path):
  path = write_jsonl(tmp_path / "s.jsonl", [{"t": "a", "score": 3.5}, {"t": "b", "score": "hi"}])
  with pytest.raises(file_tasks.FileTaskError, match=r"s.jsonl:2: targets 'hi' is not a number"):
    file_tasks.register_file_task("ft_reg", train=path, inputs="{t}", targets="{score}",
                                  metrics=["pearson", "spearman"])
