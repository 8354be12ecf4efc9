"""The entry points' command line: T5X-style flags (`--gin_file`, `--gin.NAME=VALUE`,
`--gin_bindings`, `--gin_search_paths`, `--tfds_data_dir`, the multi-host runtime), and how a
run's errors and Ctrl-C print (one line each, no traceback)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

from prompt_tuning.cli import gin_utils


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="Gin file to load (repeatable; later files win). Relative paths are "
                           "looked up in --gin_search_paths, then the project's gin/ folder.")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="A gin binding, e.g. --gin_bindings='TRAIN_STEPS = 100' (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="Extra folders (comma-separated or repeated) to search for gin files")
  parser.add_argument("--tfds_data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--coordinator_address", default=None,
                      help="Multi-host: host:port of process 0 (calls jax.distributed.initialize)")
  parser.add_argument("--process_count", type=int, default=None, help="Multi-host: processes")
  parser.add_argument("--process_index", type=int, default=None, help="Multi-host: this process")


def split_gin_dot_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls T5X's `--gin.NAME=VALUE` flags out of argv as `NAME = VALUE` bindings."""
  rest, bindings = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" in body:
        name, value = body.split("=", 1)
      elif i + 1 < len(args):
        name, value = body, args[i + 1]
        i += 1
      else:
        raise SystemExit(f"Flag {arg} needs a value: --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def parse_args(argv: Sequence[str], description: str, *,
               remembered: Callable[[], tuple[str, Mapping[str, Any]] | None] | None = None
               ) -> argparse.Namespace:
  """Parses the entry-point flags and applies them (gin, TFDS dir, multi-host runtime).

  `remembered()`, called once the flags are parsed, returns (source, {macro: value}) to bind
  where the user set nothing (eval and infer: MODEL_DIR's run settings). `args.parsed` is what
  `parse` loaded.
  """
  rest, dot_bindings = split_gin_dot_flags(argv)
  parser = argparse.ArgumentParser(description=description)
  add_flags(parser)
  args = parser.parse_args(rest)
  if not args.gin_file:
    parser.error("at least one --gin_file is required, e.g. --gin_file=runs/prompt_finetune.gin")
  if args.tfds_data_dir:
    import seqio
    seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  if args.coordinator_address or args.process_count:
    import jax
    jax.distributed.initialize(args.coordinator_address, args.process_count, args.process_index)
  args.parsed = gin_utils.parse(args.gin_file, list(args.gin_bindings) + dot_bindings,
                      args.gin_search_paths)
  if remembered is not None:
    gin_utils.apply_remembered(remembered(), args.parsed.user_macros)
  return args


def call_configured(fn):
  """Calls a gin-configured entry function, turning gin's missing-macro errors into advice."""
  try:
    return fn()
  except Exception as e:
    text = str(e)
    if "gin.REQUIRED" in text or "Required bindings" in text or "No values supplied" in text:
      raise ValueError(f"{text}\nA required setting is missing: pass it as --gin.NAME=VALUE "
                       "(e.g. --gin.MODEL_DIR=\"'/tmp/run'\"), or include the gin file that "
                       "defines it (a models/ file defines MODEL_CONFIG).") from e
    raise


INTERRUPTED_STATUS = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def run_main(main) -> None:
  """Runs an entry point; user errors print one clear line instead of a traceback, and so does
  Ctrl-C (exit status 130; training saves its step first, see `runs.train`)."""
  import sys
  from prompt_tuning.runs.guards import NonFiniteLossError  # the entry points import it anyway
  try:
    result = main()
  except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
    if os.environ.get("PROMPT_TUNING_TRACEBACK"):
      raise
    # gin appends "In call to configurable 'train' (<function ...>)": not the user's business.
    text = "\n".join(line for line in str(e).splitlines()
                     if not line.strip().startswith("In call to configurable"))
    print(f"error: {text}", file=sys.stderr)
    print("(set PROMPT_TUNING_TRACEBACK=1 for the full traceback)", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:
    if os.environ.get("PROMPT_TUNING_TRACEBACK"):
      raise
    print(f"interrupted: {str(e) or 'stopped by Ctrl-C'}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    # Not sys.exit: it would wait for orbax's worker threads, which may be in the middle of
    # the very save the user just aborted.
    os._exit(INTERRUPTED_STATUS)  # pylint: disable=protected-access
  if isinstance(result, dict) and result.get("signal") == "SIGINT":
    sys.exit(INTERRUPTED_STATUS)  # saved, but the run did not finish
