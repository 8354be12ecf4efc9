"""T5X-style gin flags for the entry points: `--gin_file`, `--gin.NAME=VALUE`, `--gin_bindings`,
`--gin_search_paths`, and the project's `gin/` folder always on the search path.

Errors in gin files or bindings are re-raised naming the file or binding and the fix. A binding
of a macro that no loaded gin file uses or defines (a typo such as `--gin.TASK_FEATURE_LENGHTS`)
is an error too: gin itself accepts it silently and the run goes on with the default.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import pathlib
from typing import Sequence

import gin
from gin import config_parser


def project_gin_dir() -> pathlib.Path:
  """The project's gin/ folder: the checkout's, or the copy installed as `prompt_tuning.gin`."""
  repo = pathlib.Path(__file__).resolve().parents[1] / "gin"
  if (repo / "runs").is_dir():  # a checkout (not site-packages/gin, which is gin-config itself)
    return repo
  spec = importlib.util.find_spec("prompt_tuning.gin")
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  raise FileNotFoundError("The project's gin/ configs are missing from this installation; "
                          "reinstall with `pip install .` from the repository")


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


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  candidates = [pathlib.Path(name)]
  candidates += [pathlib.Path(p) / name for p in search_paths]
  for c in candidates:
    if c.is_file():
      return str(c)
  raise FileNotFoundError(
      f"Gin file {name!r} not found; looked in: {[str(c) for c in candidates]}. Pass a path, or "
      "add its folder with --gin_search_paths.")


def search_paths(extra: Sequence[str] = ()) -> list[str]:
  paths = []
  for p in extra:
    paths.extend(x for x in p.split(",") if x)
  paths.append(os.getcwd())
  paths.append(str(project_gin_dir()))
  return paths


class _QuietIncludeMisses(logging.Filter):
  """gin logs an ERROR for every search path an `include` does not find; only the outcome
  matters (a real miss still raises)."""

  def filter(self, record):
    return not record.getMessage().startswith("Path not found")


def parse(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths=()) -> None:
  """Loads gin files then bindings (later wins), with errors that name what failed; refuses a
  binding of a macro that nothing loaded uses or defines."""
  quiet = _QuietIncludeMisses()
  logging.getLogger().addFilter(quiet)
  try:
    _parse(gin_files, bindings, extra_search_paths)
  finally:
    logging.getLogger().removeFilter(quiet)


def _parse(gin_files, bindings, extra_search_paths) -> None:
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  for f in gin_files:
    path = resolve_gin_file(f, paths)
    try:
      gin.parse_config_file(path)
    except Exception as e:  # gin raises many types; the message is what the user needs
      raise ValueError(f"Error in gin file {path}: {e}") from e
  known = _macros()[0] if bindings else set()  # what the files define
  bound = []  # (macro, binding): each unscoped macro a binding sets
  for b in bindings:
    try:
      gin.parse_config(b)
    except Exception as e:
      raise ValueError(f"Error in gin binding {b!r}: {e}. Bindings look like "
                       "--gin.TRAIN_STEPS=100 or --gin.MODEL_DIR=\"'/tmp/run'\" (strings need "
                       "inner quotes).") from e
    statements = _statements(b)
    own = [(s.selector, b) for s in statements if isinstance(s, config_parser.BindingStatement)
           and not s.arg_name and not s.scope]
    if any(isinstance(s, config_parser.IncludeStatement) for s in statements):
      known |= _macros()[0] - {name for name, _ in own}  # an `include` loads a file too
    bound += own
  if bound:  # references count from the files and the bindings alike
    _check_macros_used(bound, known | _macros()[1], gin_files)

class _Names(config_parser.ParserDelegate):
  """Parses gin text for its statements only, collecting the macros it references."""

  def __init__(self):
    self.references = set()

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    self.references.add(macro_name)
    return None


def _statements(text: str, names: _Names | None = None) -> list:
  return list(config_parser.ConfigParser(text, names or _Names()))


def _macros() -> tuple[set[str], set[str]]:
  """(defined, referenced) macros of gin's current config, both read from `gin.config_str()`,
  which renders every binding and its `%NAME` references after includes, in gin's own syntax."""
  names = _Names()
  statements = _statements(gin.config_str(), names)
  defined = {s.selector for s in statements
             if isinstance(s, config_parser.BindingStatement) and not s.arg_name}
  return defined, names.references


def _project_files_using(name: str) -> list[str]:
  """The project's gin files that reference or define macro `name` (for the error's advice)."""
  root = project_gin_dir()
  found = []
  for path in sorted(root.rglob("*.gin")):
    names = _Names()
    try:
      statements = _statements(path.read_text(), names)
    except Exception:  # pylint: disable=broad-except  (only advice; gin reports real errors)
      continue
    if name in names.references or any(isinstance(s, config_parser.BindingStatement)
                                       and not s.arg_name and s.selector == name
                                       for s in statements):
      found.append(path.relative_to(root).as_posix())
  return found


def _check_macros_used(bound, known: set[str], gin_files) -> None:
  """gin accepts a binding of a macro nobody reads and changes nothing: refuse it instead."""
  known = {k for k in known if "." not in k}  # `%gin.REQUIRED` is a constant, not a macro
  for name, binding in bound:
    if name in known:
      continue
    close = difflib.get_close_matches(name.upper(), sorted(known), n=3, cutoff=0.6)
    if close:
      advice = f"did you mean {' or '.join(close)}? Correct the name (--gin.{close[0]}=...)"
    else:
      advice = f"correct the name (the loaded files' macros: {', '.join(sorted(known))})"
    users = _project_files_using(name)
    if 0 < len(users) <= 2:
      advice += ", or load the gin file that uses it: " + " or ".join(
          f"--gin_file={u}" for u in users)
    elif users:
      advice += (f", or load the gin file that uses it with --gin_file ({len(users)} of the "
                 f"project's do: {', '.join(users[:3])}, ...)")
    raise ValueError(
        f"The gin binding {binding!r} sets the macro {name}, which none of the loaded gin files "
        f"({', '.join(gin_files)} and their includes) uses or defines, so it would change "
        f"nothing: {advice}.")


def parse_args(argv: Sequence[str], description: str) -> argparse.Namespace:
  """Parses the entry-point flags and applies them (gin, TFDS dir, multi-host runtime)."""
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
  parse(args.gin_file, list(args.gin_bindings) + dot_bindings, args.gin_search_paths)
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


def run_main(main) -> None:
  """Runs an entry point; user errors print one clear line instead of a traceback."""
  import sys
  from prompt_tuning.trainer import NonFiniteLossError  # the entry points import it anyway
  try:
    main()
  except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
    if os.environ.get("PROMPT_TUNING_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    print("(set PROMPT_TUNING_TRACEBACK=1 for the full traceback)", file=sys.stderr)
    sys.exit(2)
