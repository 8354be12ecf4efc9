"""The run-folder path layer (prompt_tuning/formats/storage.py) on a local folder and on gs://.

The gs:// cases run against a real GCS emulator on 127.0.0.1 (the `gcs_emulator` fixture):
every call goes through the same TensorFlow GCS client a real bucket would get.
"""
import json
import os

import pytest

from prompt_tuning.formats import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs_dir")


def _names(folder):
  return sorted(p.name for p in storage.path(folder).iterdir())


def test_files_folders_and_listing(root):
  """One API for both: write, read, append, list, glob, remove."""
  run = storage.path(root)
  storage.atomic_write(run / "a.json", json.dumps({"x": 1}))
  storage.atomic_write(run / "sub" / "b.bin", b"\x00\x01")
  storage.append_text(run / "log.jsonl", "1\n")
  storage.append_text(run / "log.jsonl", "2\n")
  assert json.loads((run / "a.json").read_text()) == {"x": 1}
  assert (run / "sub" / "b.bin").read_bytes() == b"\x00\x01"
  assert (run / "log.jsonl").read_text() == "1\n2\n"
  assert run.is_dir() and (run / "sub").is_dir() and not (run / "a.json").is_dir()
  assert _names(run) == ["a.json", "log.jsonl", "sub"]  # no temporary files left
  assert sorted(p.name for p in run.glob("*.json*")) == ["a.json", "log.jsonl"]
  storage.atomic_write(run / "a.json", "replaced")
  assert (run / "a.json").read_text() == "replaced"
  storage.rmtree(run / "sub")
  storage.rmtree(run / "missing")  # missing_ok by default
  # Listed, not `exists()`: TF's GCS client caches a folder's existence for a few seconds.
  assert _names(run) == ["a.json", "log.jsonl"] and not (run / "sub" / "b.bin").exists()


def test_copytree_between_local_and_gs(tmp_path, gcs_dir):
  src = tmp_path / "src"
  (src / "d").mkdir(parents=True)
  (src / "d" / "x.txt").write_text("x")
  (src / "y.bin").write_bytes(b"y")
  storage.copytree(src, gcs_dir)
  storage.copytree(gcs_dir, tmp_path / "back")
  assert (tmp_path / "back" / "d" / "x.txt").read_text() == "x"
  assert (tmp_path / "back" / "y.bin").read_bytes() == b"y"


def test_complete_folder_appears_finished_or_not_at_all(root):
  """A multi-file output counts only once every file is written: locally it is renamed into
  place, on gs:// its marker object is written last and `is_complete` reads the marker."""
  out = storage.join(root, "export")
  with storage.complete_folder(out) as folder:
    (folder / "one").write_text("1")
    assert not storage.is_complete(out)
    (folder / "two").write_text("2")
  assert storage.is_complete(out)
  names = _names(out)
  assert names == (["commit_success.txt", "one", "two"] if storage.is_object_storage(root)
                   else ["one", "two"])
  assert _names(root) == ["export"]  # no temporary folder left


def test_a_failed_rewrite_keeps_the_previous_output(root):
  out = storage.join(root, "export")
  with storage.complete_folder(out) as folder:
    (folder / "old").write_text("old")
  with pytest.raises(RuntimeError, match="killed"):
    with storage.complete_folder(out, replace=True) as folder:
      (folder / "new").write_text("partial")
      raise RuntimeError("killed")
  assert storage.is_complete(out) and (out / "old").read_text() == "old"
  assert not (out / "new").exists()
  assert _names(root) == ["export"]
  with pytest.raises(FileExistsError):
    with storage.complete_folder(out):
      pass


def test_replace_and_backup(root):
  out, backup = storage.join(root, "export"), storage.join(root, "backup_export")
  for text, kwargs in (("1", {}), ("2", {"backup": backup}), ("3", {"replace": True})):
    with storage.complete_folder(out, **kwargs) as folder:
      (folder / "v").write_text(text)
  assert (out / "v").read_text() == "3" and storage.is_complete(out)
  assert (backup / "v").read_text() == "1" and storage.is_complete(backup)
  assert _names(root) == ["backup_export", "export"]


def test_a_killed_object_storage_export_reads_as_unfinished(gcs_dir):
  """On gs:// the files of an export are visible while it is written: without the marker (a
  kill before the end) a reader must treat the folder as unfinished."""
  out = storage.join(gcs_dir, "export")
  (out / "one").write_text("1")
  assert out.exists() and not storage.is_complete(out)


def test_other_url_schemes_are_refused_naming_what_works():
  for url in ("s3://bucket/run", "hdfs://host/run", "file://tmp/run"):
    with pytest.raises(ValueError, match=r"cannot read or write.*gs://bucket/folder.*"
                                         r"--gin.MODEL_DIR"):
      storage.check_run_folder(url, "MODEL_DIR")
  with pytest.raises(ValueError, match=r"--output_dir gs://your-bucket/run"):
    storage.check_run_folder("s3://b/x", "--output_dir")
  with pytest.raises(ValueError, match="names no bucket"):
    storage.check_run_folder("gs:///run", "MODEL_DIR")


def test_check_run_folder_probes_and_leaves_nothing(root):
  folder = storage.check_run_folder(root, "MODEL_DIR")
  assert os.fspath(folder) == root
  assert not list(folder.glob(".write_test*"))


def test_a_missing_bucket_is_named_with_the_fix(gcs_emulator):
  """A typo in the bucket: the error names the URL, the probe object and how to create it."""
  with pytest.raises(ValueError) as e:
    storage.check_run_folder("gs://no-such-bucket-here/run", "MODEL_DIR")
  message = str(e.value)
  assert "MODEL_DIR 'gs://no-such-bucket-here/run' is not writable" in message
  assert "writing the probe object gs://no-such-bucket-here/run/.write_test." in message
  assert "gcloud storage buckets create gs://no-such-bucket-here" in message


@pytest.mark.parametrize("error, fix", [
    ("PermissionDeniedError", "roles/storage.objectUser"),
    ("UnauthenticatedError", "gcloud auth application-default login"),
])
def test_permission_and_credential_errors_name_the_fix(error, fix):
  """The emulator grants everything, so the refusals of a real bucket (HTTP 403 and 401, which
  TensorFlow raises as these errors) are given to the message builder directly."""
  import tensorflow as tf
  exc = getattr(tf.errors, error)(None, None, "Error executing an HTTP request")
  folder = storage.path("gs://bucket/run")
  message = storage._unwritable(folder, "MODEL_DIR", folder / ".write_test.h.1", exc)
  assert message.startswith("MODEL_DIR 'gs://bucket/run' is not writable: writing the probe "
                            "object gs://bucket/run/.write_test.h.1 failed")
  assert fix in message
