"""What a run writes as it goes: metrics JSONL + TensorBoard, JSON results, and console logging."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping, Sequence

import jax

from prompt_tuning.formats import storage

log = logging.getLogger("prompt_tuning")


def truncate_metrics(path: str | os.PathLike, last_step: int | None) -> int:
  """Keeps the rows of a metrics JSONL up to `last_step` (None: none) and returns how many went.

  A restarted run logs again every step after the checkpoint it resumes from, and a kill in the
  middle of a write leaves a partial last line. Dropping both before the run appends leaves each
  step once, in order. Lines that do not parse as a row with a step are dropped too. The file is
  rewritten atomically (`storage.atomic_write`: a temporary file and `os.replace` locally, one
  upload on gs://), so a kill here leaves the old file or the new one, never a mix.
  """
  path = storage.path(path)
  if not path.exists():
    return 0
  text = path.read_bytes().decode("utf-8", errors="replace")
  lines = text.splitlines()
  kept = []
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
      continue  # a partial line from a kill mid-write, or not a row at all
    if last_step is not None and isinstance(step, int) and step <= last_step:
      kept.append(line)
  if len(kept) == len(lines) and text.endswith("\n") == bool(lines):
    return 0
  storage.atomic_write(path, "".join(line + "\n" for line in kept))
  return len(lines) - len(kept)


class MetricWriter:
  """TensorBoard summaries plus a JSONL file (process 0 only).

  `resume_step` is the step the run restarts from (None for a fresh run): rows the run will log
  again are dropped from the JSONL first (`truncate_metrics`). TensorBoard event files are left
  alone and keep the earlier copies of those steps: the replayed ones go to a newer file, and
  TensorBoard (by default, `purge_orphaned_data`) drops the older copies when it sees the step go
  back, so its curves show the resumed run.
  """

  def __init__(self, model_dir: str | os.PathLike, name: str, *, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    import tensorflow as tf
    self._tf = tf
    self.dir = storage.path(model_dir) / name
    self._writer = None  # created at the first write: no empty eval/ folder for runs without eval
    self._jsonl = storage.path(model_dir) / f"metrics_{name.replace('/', '_')}.jsonl"
    dropped = truncate_metrics(self._jsonl, resume_step)
    if dropped:
      log.info("Dropped %d lines of %s logged after step %d or left partial by a kill (this "
               "run logs those steps again)", dropped, self._jsonl.name, resume_step or 0)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self._writer is None:
      self._writer = self._tf.summary.create_file_writer(str(self.dir))
    with self._writer.as_default():
      for k, v in scalars.items():
        self._tf.summary.scalar(k, float(v), step=int(step))
    self._writer.flush()
    storage.append_text(self._jsonl, json.dumps(
        {"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


def fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------
# Output files

def write_jsonl(path, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes rows atomically, local or gs:// (`storage.atomic_write`: never a half-written file)."""
  storage.atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_json(path, value: Any) -> None:
  """Writes JSON atomically, local or gs:// (`storage.atomic_write`: never a half-written file)."""
  storage.atomic_write(path, json.dumps(value, indent=2, default=float))


def configure_logging() -> None:
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
