"""Run folders on a local disk or on Google Cloud Storage (`gs://bucket/run`), through one API.

Everything a run writes to or reads from MODEL_DIR (and the other output folders) goes through
`path()`: an `etils.epath.Path`, which has pathlib's API (`/`, `exists()`, `is_dir()`,
`iterdir()`, `glob()`, `mkdir()`, `read_text()`, `write_bytes()`, `open()`, `rmtree()`, ...).
Local paths use the os; gs:// URLs go through TensorFlow's GCS filesystem, the one TensorBoard
and tf.data use (and orbax, which uses epath too). The functions below are the operations
whose protocol differs between the two:

- `atomic_write`: locally a temporary file renamed into place; on object storage a single
  upload, which is atomic already (an object appears whole or not at all; a rename would be a
  copy plus a delete).
- `complete_folder`: multi-file outputs (numpy exports, PEFT adapters). Locally the folder is
  assembled under a temporary name and renamed into place. Object storage has no folder
  rename, so the files are written in place and the marker object `COMPLETE_MARKER` last, as
  orbax marks finished checkpoints there; `is_complete` is how readers tell.
- `append_text`: GCS objects are immutable: TensorFlow re-uploads the object with the new text.
- `check_run_folder`: refuses URL schemes we cannot write and probes writability once, so a
  missing bucket or credentials fail before any compute, naming the fix.

Credentials: the libraries (TensorFlow, tensorstore, google-cloud-storage) each pick up Google's
application default credentials: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth
application-default login`, or the VM's / TPU's service account.
"""
from __future__ import annotations

import contextlib
import json
import logging
import errno
import os
import pathlib
import re
import socket
import time
import uuid
from typing import Iterator

from etils import epath

PathLike = str | os.PathLike
# URL schemes run folders may use, besides local paths: the ones written natively and tested.
SCHEMES = ("gs",)
# Written last into a multi-file output on object storage; orbax's name for the same purpose.
COMPLETE_MARKER = "commit_success.txt"

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(p: PathLike) -> str | None:
  """The URL scheme of `p` ("gs"), or None for a local path."""
  m = _URL.match(os.fspath(p))
  return m.group(1).lower() if m else None


def is_object_storage(p: PathLike) -> bool:
  return scheme(p) in SCHEMES


def path(p: PathLike, flag: str = "path") -> epath.Path:
  """`p` as a run-folder path: local, or gs://; other URL schemes are refused (see `SCHEMES`)."""
  text = os.fspath(p)
  kind = scheme(text)
  if kind is not None and kind not in SCHEMES:
    if flag.startswith("-"):
      example = f", e.g. {flag} gs://your-bucket/run"
    elif flag.isidentifier() and flag.isupper():  # a gin macro
      example = f", e.g. --gin.{flag}=\"'gs://your-bucket/run'\""
    else:
      example = ""
    raise ValueError(
        f"{flag} {text!r} is a {kind}:// URL, which we cannot read or write: pass a local path "
        f"or a Google Cloud Storage URL (gs://bucket/folder){example}. Supported URL schemes: "
        f"{', '.join(s + '://' for s in SCHEMES)}.")
  if kind is not None and not text.split("://", 1)[1].split("/", 1)[0]:
    raise ValueError(f"{flag} {text!r} names no bucket: expected gs://bucket/folder")
  return epath.Path(text)


def join(base: PathLike, *parts: str) -> epath.Path:
  return path(base).joinpath(*parts)


# ------------------------------------------------------------------------------------------------
# Files

def atomic_write(target: PathLike, data: str | bytes) -> epath.Path:
  """Writes `data` to `target` so that a reader sees the old content or the new, never a part."""
  target = path(target)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_object_storage(target):
    target.write_bytes(data)  # one upload: GCS makes the object visible only once complete
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Not mkstemp: its 0600 mode would make results unreadable to the rest of a shared group.
  tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return target


def append_text(target: PathLike, text: str) -> None:
  """Appends to a text file (creating it); on GCS the object is rewritten with `text` added."""
  with path(target).open("a") as f:
    f.write(text)


def rmtree(target: PathLike, missing_ok: bool = True) -> None:
  """Removes a folder and everything in it (on GCS: every object under the prefix)."""
  target = path(target)
  if not is_object_storage(target):
    if missing_ok and not target.exists():
      return
    target.rmtree()
    return
  # Not `exists()` first: TensorFlow's GCS client caches a folder's existence for a few seconds
  # (GCS_STAT_CACHE_MAX_AGE) and keeps reporting a folder it has just removed.
  try:
    target.rmtree()
  except FileNotFoundError:
    if not missing_ok:
      raise


def copytree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under `src` to `dst` (either may be local or gs://); markers last."""
  src, dst = path(src), path(dst)
  files = sorted(_files(src), key=lambda f: f.name == COMPLETE_MARKER)
  for f in files:
    out = dst.joinpath(*f.parts[len(src.parts):])
    if not is_object_storage(out):
      out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(f.read_bytes())


def _files(root: epath.Path) -> Iterator[epath.Path]:
  for folder, _, names in root.walk():
    for name in names:
      yield epath.Path(folder) / name


# ------------------------------------------------------------------------------------------------
# Multi-file outputs

def is_complete(folder: PathLike) -> bool:
  """Whether a multi-file output written by `complete_folder` is there and finished."""
  folder = path(folder)
  if is_object_storage(folder):
    return (folder / COMPLETE_MARKER).exists()
  return folder.is_dir()  # renamed into place only once complete


@contextlib.contextmanager
def complete_folder(final: PathLike, *, backup: PathLike | None = None,
                    replace: bool = False) -> Iterator[epath.Path]:
  """Yields the folder to write a multi-file output into; it counts as written only on success.

  An existing `final` is kept as `backup` when one is given, replaced with `replace=True`, and
  otherwise refused. A failure (an exception in the block) leaves the previous content: locally
  the temporary folder is removed; on object storage the previous files are copied back from
  their backup (a kill leaves `final` without its marker, i.e. unfinished).
  """
  final = path(final)
  exists = final.exists()
  if exists and backup is None and not replace:
    raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
  if is_object_storage(final):
    with _complete_object_folder(final, exists, None if backup is None else path(backup)) as f:
      yield f
    return
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    tmp.mkdir()
    yield tmp
    if final.exists():
      # A folder cannot be renamed over a non-empty one: move the old one aside first.
      aside = path(backup) if backup is not None else final.with_name(
          f".{final.name}.old-{uuid.uuid4().hex[:8]}")
      os.replace(final, aside)
      os.replace(tmp, final)
      if backup is None:
        rmtree(aside)
    else:
      os.replace(tmp, final)
  finally:
    rmtree(tmp)


@contextlib.contextmanager
def _complete_object_folder(final: epath.Path, exists: bool,
                            backup: epath.Path | None) -> Iterator[epath.Path]:
  aside = None
  if exists:
    # No rename on object storage: copy the old files away, then clear `final` (its marker
    # first, so that it reads as unfinished from here on).
    aside = backup or final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    copytree(final, aside)
    with contextlib.suppress(FileNotFoundError):
      (final / COMPLETE_MARKER).unlink()
    rmtree(final)
  try:
    yield final
  except BaseException:
    if aside is not None:  # put the previous content back
      rmtree(final)
      copytree(aside, final)
      if backup is None:
        rmtree(aside)
    raise
  (final / COMPLETE_MARKER).write_text(json.dumps(
      {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "by": f"{socket.gethostname()}:{os.getpid()}"}))
  if aside is not None and backup is None:
    rmtree(aside)


# ------------------------------------------------------------------------------------------------
# Checks at start-up

def check_run_folder(folder: PathLike, flag: str = "MODEL_DIR", *,
                     write: bool = True) -> epath.Path:
  """`folder` as a path, after checking its scheme and (with `write`) that it can be written.

  The write probe is one small object per process (hosts of a multi-host run probe the same
  folder at once), deleted again. A failure names the folder, what was written and the fix.
  """
  folder = path(folder, flag)
  if not write:
    return folder
  # One probe per process: the hosts of a multi-host run check the same folder at once.
  name = f".write_test.{socket.gethostname()}.{os.getpid()}"
  probe = folder / name
  try:
    if not is_object_storage(folder):
      # Creates nothing: a folder that does not exist yet is probed in its deepest existing
      # parent (creating it there needs the same permission), so a run that stops before it
      # writes anything leaves no empty folder behind.
      parent = pathlib.Path(os.fspath(folder)).absolute()
      while not parent.exists() and parent != parent.parent:
        parent = parent.parent
      if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
      probe = path(parent / name)
    probe.write_text("ok")
    probe.unlink(missing_ok=True)
  except Exception as e:  # OSError locally; tf.errors.OpError (and subclasses) on GCS
    raise ValueError(_unwritable(folder, flag, probe, e)) from e
  logging.info("Writing to %s", folder)
  return folder


def _unwritable(folder: epath.Path, flag: str, probe: epath.Path, error: Exception) -> str:
  set_flag = (f"{flag} PATH" if flag.startswith("-") else f"--gin.{flag}=\"'/path/to/run'\"")
  if not is_object_storage(folder):
    reason = getattr(error, "strerror", None) or str(error)
    return (f"{flag} {str(folder)!r} is not writable ({reason}); choose a folder you can write "
            f"to with {set_flag}")
  bucket = os.fspath(folder).split("://", 1)[1].split("/", 1)[0]
  kind = type(error).__name__
  detail = " ".join(str(error).split())
  detail = detail if len(detail) <= 300 else detail[:300] + " ..."
  if kind == "NotFoundError" or "404" in detail:
    fix = (f"the bucket gs://{bucket} does not exist (or these credentials cannot see it): "
           f"create it (`gcloud storage buckets create gs://{bucket} --location=REGION`, in the "
           "TPUs' region) or fix the URL")
  elif kind == "PermissionDeniedError" or "403" in detail:
    fix = (f"the credentials in use may not write to gs://{bucket}: grant the account (your "
           "user, or the TPU VM's service account) roles/storage.objectUser on the bucket, e.g. "
           f"`gcloud storage buckets add-iam-policy-binding gs://{bucket} "
           "--member=serviceAccount:ACCOUNT --role=roles/storage.objectUser`")
  elif kind == "UnauthenticatedError" or "401" in detail or "credential" in detail.lower():
    fix = ("no usable Google Cloud credentials: on a workstation run `gcloud auth "
           "application-default login`; on a TPU/GCE VM use a service account with storage "
           "access; or set GOOGLE_APPLICATION_CREDENTIALS to a key file")
  else:
    fix = "check the URL, the network and the credentials (application default credentials)"
  return (f"{flag} {os.fspath(folder)!r} is not writable: writing the probe object "
          f"{os.fspath(probe)} failed: {fix}. ({kind}: {detail})")
