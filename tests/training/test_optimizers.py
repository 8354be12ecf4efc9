"""The trainable/frozen split: patterns match whole parameter paths."""
import ast
import pathlib
import re

import flax
import numpy as np
import pytest

from prompt_tuning.training import optimizers

PARAMS = {
    "dogs": np.zeros(1),
    "i": {"love": {"dogs": np.ones(1), "dogs_too": np.ones(2)}},
    "encoder": {"prompt": {"prompt": np.ones((2, 3))}, "encoder_norm": {"scale": np.ones(3)}},
}


def paths(tree):
  return sorted(flax.traverse_util.flatten_dict(tree, sep="/"))


def test_patterns_match_the_whole_path():
  """`'dogs'` is the top-level `dogs`, not `i/love/dogs` nor `i/love/dogs_too`."""
  trainable, frozen = optimizers.split_params(PARAMS, ["dogs"])
  assert paths(trainable) == ["dogs"]
  assert "i/love/dogs" in paths(frozen) and "i/love/dogs_too" in paths(frozen)
  trainable, _ = optimizers.split_params(PARAMS, [".*/dogs"])
  assert paths(trainable) == ["i/love/dogs"]
  with pytest.raises(ValueError, match="No parameter path matches"):
    optimizers.split_params(PARAMS, ["prompt"])


def test_shipped_patterns_select_what_they_must():
  """PROMPT_PATTERNS (also gin/runs/prompt_finetune.gin) and ALL_PATTERNS (model_finetune.gin)."""
  trainable, frozen = optimizers.split_params(PARAMS, optimizers.PROMPT_PATTERNS)
  assert paths(trainable) == ["encoder/prompt/prompt"]
  assert len(paths(frozen)) == 4
  trainable, frozen = optimizers.split_params(PARAMS, optimizers.ALL_PATTERNS)
  assert paths(trainable) == paths(PARAMS) and not frozen
  merged = optimizers.merge_params(*optimizers.split_params(PARAMS))
  assert paths(merged) == paths(PARAMS)


def test_gin_trainable_patterns_are_the_shipped_ones():
  """Every `trainable_patterns` in gin/ selects the prompt only, or everything."""
  found = {}
  for gin_file in pathlib.Path(__file__).parents[2].joinpath("gin").rglob("*.gin"):
    for line in gin_file.read_text().splitlines():
      m = re.match(r"\s*trainable_patterns\s*=\s*(\[.*\])", line)
      if m:
        found[gin_file.name] = ast.literal_eval(m.group(1))
  assert set(found) == {"prompt_finetune.gin", "model_finetune.gin"}
  trainable, _ = optimizers.split_params(PARAMS, found["prompt_finetune.gin"])
  assert paths(trainable) == ["encoder/prompt/prompt"]
  trainable, frozen = optimizers.split_params(PARAMS, found["model_finetune.gin"])
  assert not frozen


def test_a_string_is_not_a_list_of_patterns():
  with pytest.raises(TypeError, match="list of regexes"):
    optimizers.split_params(PARAMS, "dogs")
