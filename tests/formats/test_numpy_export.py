"""The checkpointer's numpy exports: both names the original's tools and ours read, written
atomically, and an earlier export of the same step kept as a backup."""
import io
import re

import numpy as np
import pytest

from prompt_tuning.training import checkpoints
from prompt_tuning.formats import prompt_io


def prompt(seed=0, shape=(3, 8)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def params(p):
  return {"encoder": {"prompt": {"prompt": p}}}


@pytest.fixture
def ckpt(tmp_path):
  c = checkpoints.Checkpointer(tmp_path / "run", keep=None)
  yield c
  c.close()


def test_export_has_the_originals_extensionless_name_with_np_save_bytes(ckpt):
  """`encoder.prompt.prompt` holds exactly what the original wrote: `np.save` of the float32
  array to a file object (so no `.npy` is appended); `.npy` holds the same bytes."""
  p = prompt()
  ckpt.ensure_numpy_export(7, params(p))
  folder = ckpt.numpy_export_dir(7)
  assert sorted(f.name for f in folder.iterdir()) == ["encoder.prompt.prompt",
                                                      "encoder.prompt.prompt.npy"]
  expected = io.BytesIO()
  np.save(expected, p)
  assert (folder / "encoder.prompt.prompt").read_bytes() == expected.getvalue()
  assert (folder / "encoder.prompt.prompt.npy").read_bytes() == expected.getvalue()
  # Read as the original's np_load does (np.load of an open file), and through our loader.
  with open(folder / "encoder.prompt.prompt", "rb") as f:
    assert np.load(f).tobytes() == p.tobytes()
  for name in ("encoder.prompt.prompt", "encoder.prompt.prompt.npy"):
    assert prompt_io.load_prompt(folder / name, expected_shape=p.shape).tobytes() == p.tobytes()


def test_a_bank_is_exported_under_both_names(ckpt):
  bank = prompt(shape=(2, 3, 8))
  ckpt.ensure_numpy_export(1, params(bank))
  for name in ("encoder.prompt.prompt", "encoder.prompt.prompt.npy"):
    with open(ckpt.numpy_export_dir(1) / name, "rb") as f:
      assert np.load(f, allow_pickle=False).tobytes() == bank.tobytes()


def test_re_export_of_a_step_keeps_the_old_folder_as_a_backup(ckpt):
  old, new = prompt(1), prompt(2)
  ckpt._export_numpy(5, params(old))
  ckpt._export_numpy(5, params(new))
  ckpt._export_numpy(5, params(new))
  root = ckpt.numpy_dir
  backups = sorted(p for p in root.iterdir() if p.name.startswith("backup_"))
  assert len(backups) == 2 and all(re.fullmatch(r"backup_checkpoint_5_\d{8}T\d{6}_\d{9}(\.\d+)?",
                                                b.name) for b in backups)
  assert sorted(p.name for p in root.glob("checkpoint_*")) == ["checkpoint_5"]
  assert prompt_io.load_prompt(ckpt.numpy_export_dir(5) / "encoder.prompt.prompt").tobytes() == \
      new.tobytes()
  kept = {prompt_io.load_prompt(b / "encoder.prompt.prompt.npy").tobytes() for b in backups}
  assert kept == {old.tobytes(), new.tobytes()}
  assert not list(root.glob(".*tmp*"))


def test_a_failed_export_leaves_the_previous_export_and_no_complete_looking_folder(ckpt,
                                                                                   monkeypatch):
  """A crash while writing the second file: no `checkpoint_N` folder appears for a new step, and
  an existing export of that step is untouched."""
  ckpt._export_numpy(4, params(prompt(1)))
  real, calls = prompt_io.save_prompt_npy, []

  def fail_second(path, array):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(path, array)

  monkeypatch.setattr(prompt_io, "save_prompt_npy", fail_second)
  for step in (4, 9):
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
      ckpt._export_numpy(step, params(prompt(2)))
  assert not ckpt.numpy_export_dir(9).exists() and not list(ckpt.numpy_dir.glob(".*tmp*"))
  assert prompt_io.load_prompt(ckpt.numpy_export_dir(4) / "encoder.prompt.prompt").tobytes() == \
      prompt(1).tobytes()
  monkeypatch.setattr(prompt_io, "save_prompt_npy", real)
  # The resume path completes what is missing; a complete export is left alone.
  ckpt.ensure_numpy_export(9, params(prompt(2)))
  assert prompt_io.load_prompt(ckpt.numpy_export_dir(9) / "encoder.prompt.prompt").tobytes() == \
      prompt(2).tobytes()
  assert not list(ckpt.numpy_dir.glob("backup_*"))


def test_resume_completes_an_export_missing_the_extensionless_name(ckpt):
  """An export written before the extension-less copy existed is written again on resume (the
  old folder kept as a backup); a complete one is not touched."""
  p = prompt(3)
  folder = ckpt.numpy_export_dir(2)
  prompt_io.save_prompt_npy(folder / "encoder.prompt.prompt.npy", p)
  ckpt.ensure_numpy_export(2, params(p))
  assert (folder / "encoder.prompt.prompt").read_bytes() == \
      (folder / "encoder.prompt.prompt.npy").read_bytes()
  assert len(list(ckpt.numpy_dir.glob("backup_checkpoint_2_*"))) == 1
  ckpt.ensure_numpy_export(2, params(p))
  assert len(list(ckpt.numpy_dir.glob("backup_checkpoint_2_*"))) == 1
