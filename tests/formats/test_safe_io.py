"""The one path-containment rule (`safe_io.inside`), through every caller that resolves a path a
stranger's file names: HF shard indexes, T5X tensorstore specs (frozen checkpoints), T5X prompt
extraction."""
import json
import os

import pytest

from prompt_tuning.formats import prompt_io
from prompt_tuning.formats import hf as hf_format
from prompt_tuning.formats import pretrained
from prompt_tuning.formats import safe_io
from tests.conftest import tiny_config

EVIL = ["../outside", "/etc/passwd", "a/../../outside", "gs://bucket/x", "~/x", "C:\\x",
        "a\\..\\..\\outside", "link/x"]


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "ckpt"
  (root / "ok").mkdir(parents=True)
  (tmp_path / "outside").mkdir()
  os.symlink(tmp_path / "outside", root / "link")
  return root


@pytest.mark.parametrize("relative", EVIL)
def test_inside_refuses_every_escape(folder, relative):
  with pytest.raises(ValueError, match="refusing path"):
    safe_io.inside(folder, relative, what="test")


def test_inside_accepts_paths_inside(folder):
  assert safe_io.inside(folder, "ok", what="test") == str((folder / "ok").resolve())
  with pytest.raises(ValueError, match="refusing path"):
    safe_io.inside(folder, ".", what="test")  # the folder itself is not a file in it


def _hf_with_shard(folder, shard):
  (folder / hf_format.HF_CONFIG).write_text(json.dumps(tiny_config().to_hf_dict()))
  (folder / hf_format.HF_SAFETENSORS_INDEX).write_text(json.dumps(
      {"weight_map": {"shared.weight": shard}}))


def _t5x_with_path(folder, path):
  from flax import serialization
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  state = {"optimizer": {"target": {"encoder": {"prompt": {"prompt": spec}}}}}
  (folder / "checkpoint").write_bytes(serialization.msgpack_serialize(state))


@pytest.mark.parametrize("relative", EVIL)
def test_every_caller_applies_the_same_rule(folder, relative):
  """The same escape gets the same refusal from each reader (one rule, not two)."""
  messages = []
  _hf_with_shard(folder, relative)
  with pytest.raises(ValueError, match="refusing path") as e:
    pretrained.load_pretrained(folder)
  messages.append(str(e.value))
  (folder / hf_format.HF_SAFETENSORS_INDEX).unlink()
  _t5x_with_path(folder, relative)
  with pytest.raises(prompt_io.PromptFileError, match="refusing path") as e:
    prompt_io.extract_prompt_from_t5x(folder)
  messages.append(str(e.value))
  # Both say why in the same words.
  reasons = {m.split(f"{relative!r}: ", 1)[1].split(" (")[0].split(", which")[0]
             for m in messages}
  assert len(reasons) == 1, messages
