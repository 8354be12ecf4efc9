"""What stops a training run cleanly: signals (SIGTERM, Ctrl-C) and non-finite steps."""
from __future__ import annotations

import signal

import jax.numpy as jnp
import numpy as np

from prompt_tuning.model import partitioning


class NonFiniteLossError(RuntimeError):
  pass


class Interrupted(KeyboardInterrupt):
  """A second Ctrl-C stopped the run (the first asked it to save and exit); says where."""


class Preemption:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks: it saves the
  current step, then exits cleanly.

  A second Ctrl-C raises KeyboardInterrupt at once, even in the middle of that save: orbax
  commits a checkpoint by renaming its complete temporary folder, so an aborted save leaves
  either the whole checkpoint or only a temporary folder that the next run deletes.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler not set from Python, nothing to restore
        signal.signal(sig, previous)


class NonFiniteWatch:
  """The first non-finite step and its metrics, kept on the device (no per-step host sync).

  `add` runs a few tiny device ops per step; `fetch` reads them back (one sync) and returns the
  first non-finite step since the last `reset`, or None.
  """

  _KEYS = ("loss", "grad_norm", "param_norm")

  def __init__(self):
    self.reset()

  def reset(self):
    self._first = None   # device int32: first bad step, or -1
    self._skipped = None
    self._values = None
    self.first_metrics, self.skipped = {}, 0

  def add(self, step: int, metrics) -> None:
    bad = ~metrics["finite"]
    values = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in self._KEYS])
    if self._first is None:
      self._first = jnp.where(bad, step, -1).astype(jnp.int32)
      self._skipped = bad.astype(jnp.int32)
      self._values = values
      return
    new = bad & (self._first < 0)
    self._first = jnp.where(new, step, self._first)
    self._values = jnp.where(new, values, self._values)
    self._skipped = self._skipped + bad.astype(jnp.int32)

  def fetch(self) -> int | None:
    if self._first is None:
      return None
    first = int(partitioning.to_host(self._first))
    if first < 0:
      return None
    values = partitioning.to_host(self._values)
    self.first_metrics = dict(zip(self._KEYS, values.tolist()))
    self.skipped = int(partitioning.to_host(self._skipped))
    return first


def nonfinite_message(metrics, step: int, last_saved: int | None, nonfinite_frozen) -> str:
  values = {k: float(partitioning.to_host(metrics[k])) for k in ("loss", "grad_norm",
                                                                   "param_norm")}
  shown = ", ".join(f"{k}={v}" for k, v in values.items())
  if np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"]):
    what = (f"The trainable parameters became non-finite or too large at step {step} ({shown}): "
            "the learning rate is likely too high.")
  else:
    what = f"Non-finite loss or gradient at step {step} ({shown})."
  if nonfinite_frozen:
    what += (" The frozen model has NaN or Inf values (allowed by allow_nonfinite_frozen=True) in "
             f"{', '.join(nonfinite_frozen[:5])}: the likely cause.")
  kept = (f"Nothing was saved after step {last_saved}; the last good checkpoint is kept."
          if last_saved is not None else "No checkpoint was saved.")
  return (f"{what} {kept} Lower the learning rate, check the data, or set skip_nonfinite=True "
          "(--gin.runs.train.skip_nonfinite=True) to skip such steps.")
