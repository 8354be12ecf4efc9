"""Errors on the README's paths read as what they are and name the fix."""
import gin
import pytest

from prompt_tuning.data import dataset
from prompt_tuning.cli import gin_utils


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_unknown_task_message_reads_once():
  """It said `... e.g. 'tasks.glue'..` (a doubled period)."""
  with pytest.raises(ValueError) as e:
    dataset.get_mixture_or_task("no_such_task_xyz")
  assert ".." not in str(e.value)
  assert "Unknown task or mixture 'no_such_task_xyz'. Set MIXTURE_OR_TASK_MODULE" in str(e.value)


def test_a_task_flag_beside_the_file_task_gin_is_refused(tmp_path):
  """README's file-task gin binds MIXTURE_OR_TASK_NAME to its registration; a leftover
  --gin.MIXTURE_OR_TASK_NAME silently replaced it, so the task was never registered."""
  data = tmp_path / "train.jsonl"
  data.write_text('{"text": "fine", "label": "positive"}\n')
  task_gin = tmp_path / "my_task.gin"
  task_gin.write_text(f"""
from prompt_tuning.data import file_tasks
MIXTURE_OR_TASK_NAME = @sentiment/file_tasks.register_file_task()
sentiment/file_tasks.register_file_task:
  name = 'my_sentiment'
  train = '{data}'
  validation = '{data}'
  inputs = '{{text}}'
  targets = '{{label}}'
  class_labels = ['negative', 'positive']
""")
  files = ["runs/prompt_finetune.gin", str(task_gin)]
  with pytest.raises(ValueError, match="replaces the gin file's MIXTURE_OR_TASK_NAME"):
    gin_utils.parse(files, ["MIXTURE_OR_TASK_NAME = 'my_sentiment'"])
  gin.clear_config()
  gin_utils.parse(files, ["TRAIN_STEPS = 5"])  # the recipe as written still parses
