"""`python -m prompt_tuning.scripts.show_tasks` lists tasks and prints examples."""
import io

import tensorflow_datasets as tfds

from prompt_tuning.scripts import show_tasks


def test_lists_registered_tasks_and_mixtures(capsys):
  assert show_tasks.main(["--filter", "taskless_glue_sst2_v200"]) == 0
  out = capsys.readouterr().out
  assert "# 6 tasks" in out
  assert "\ntaskless_glue_sst2_v200_examples_byt5\n" in out
  assert "# 0 mixtures" in out


def test_unknown_task_suggests_names(capsys):
  assert show_tasks.main(["--task", "glue_sst2"]) == 2
  assert "did you mean: glue_sst2_v200" in capsys.readouterr().err


def test_prints_examples(t5_vocab_file):
  out = io.StringIO()
  with tfds.testing.mock_data(num_examples=2):
    show_tasks.show_examples("taskless_glue_sst2_v200", "validation", 1, out=out,
                             try_in_mem_cache=False)
  text = out.getvalue()
  assert "class labels ('negative', 'positive')" in text
  assert "--- example 0 (validation) ---" in text
  assert "inputs_pretokenized: sentence: " in text
  assert "targets: [" in text
