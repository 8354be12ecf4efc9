"""Gin at the edge: parsing the entry points' gin files and bindings (the flags are in
`prompt_tuning.cli.flags`), the project's `gin/` folder always on the search path, and model
configs read from gin model files (`config_from_gin`).

Errors in gin files or bindings are re-raised naming the file or binding and the fix. A binding
of a macro that no loaded gin file uses or defines (a typo such as `--gin.TASK_FEATURE_LENGHTS`)
is an error too: gin itself accepts it silently and the run goes on with the default.

Remembered settings (eval, infer): after parsing, `flags.parse_args(remembered=...)` binds the
settings a training run recorded in MODEL_DIR (task, lengths, prompt, frozen model) to the
macros the user did not set. Precedence, low to high: the project's gin files (gin/: run files,
models/, prompts/, ...), then MODEL_DIR's settings, then the user's own gin files (outside gin/)
and `--gin.X` / `--gin_bindings` flags.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import gin
from gin import config_parser


def _tolerate_namespace_packages() -> None:
  """gin looks up `include 'runs/x.gin'` also as a file of the Python package `runs`; when the
  working directory holds a plain `runs/` folder (a namespace package, no `__file__`), gin's
  check raises TypeError instead of answering no, and every include of our `runs/` files fails.
  Wrap that check (gin keeps its readers in a private list; nothing public replaces one)."""
  from gin import resource_reader
  original = resource_reader.system_path_file_exists

  def exists(path):
    try:
      return original(path)
    except (TypeError, ValueError, ImportError):
      return False

  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, check) in enumerate(readers):
    if check is original:
      readers[i] = (reader, exists)


_tolerate_namespace_packages()


def project_gin_dir() -> pathlib.Path:
  """The project's gin/ folder: the checkout's, or the copy installed as `prompt_tuning.gin`."""
  repo = pathlib.Path(__file__).resolve().parents[2] / "gin"
  if (repo / "runs").is_dir():  # a checkout (not site-packages/gin, which is gin-config itself)
    return repo
  spec = importlib.util.find_spec("prompt_tuning.gin")
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  raise FileNotFoundError("The project's gin/ configs are missing from this installation; "
                          "reinstall with `pip install .` from the repository")


# ------------------------------------------------------------------------------------------------
# A model gin file on its own (scripts, tests): `MODEL_CONFIG` without touching the run's gin state

def gin_search_paths(gin_file: str | os.PathLike | None = None) -> list[str]:
  """Folders that gin `include` statements are resolved against, most likely first.

  Our gin files include each other as `models/t5_1_1_base.gin`, relative to the top-level `gin/`
  folder (installed as the package `prompt_tuning.gin`); a user's own model file may also include
  files next to it.
  """
  paths = [str(project_gin_dir())]
  if gin_file is not None:
    here = pathlib.Path(gin_file).resolve().parent
    paths += [str(here.parent), str(here)]
  return list(dict.fromkeys(paths))


def config_from_gin(path, macro: str = "MODEL_CONFIG") -> T5Config | None:
  """Evaluates the `MODEL_CONFIG` macro of a gin model file, leaving the caller's gin state intact.

  gin has one global configuration. To parse in isolation we save its bindings, clear them,
  parse and evaluate the file, and restore the saved bindings (and search paths) afterwards, so a
  training script that already parsed its own gin files is unaffected. `MODEL_CONFIG = None`
  (models/from_checkpoint.gin) gives None: the checkpoint's own config is used.
  """
  from gin import config as gin_config
  from prompt_tuning.model.config import T5Config
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"gin model file {path} not found")
  saved = _save_gin_state(gin_config)
  try:
    gin.clear_config()
    # Our folders first: gin logs an error for every prefix that misses.
    prefixes = gin_config._LOCATION_PREFIXES  # pylint: disable=protected-access
    prefixes[:] = gin_search_paths(path) + [""]
    with gin.unlock_config():
      gin.parse_config_file(path)
    try:
      value = gin.query_parameter(f"{macro}/macro.value")
    except ValueError as e:
      raise ValueError(f"{path} does not set {macro} (expected `{macro} = @config.T5Config()`)"
                       ) from e
    if isinstance(value, gin_config.ConfigurableReference):
      value = value.scoped_configurable_fn()
    if value is not None and not isinstance(value, T5Config):
      raise ValueError(f"{path}: {macro} must evaluate to a prompt_tuning.model.config.T5Config, got "
                       f"{value!r}")
    return value
  finally:
    gin.clear_config()
    _restore_gin_state(gin_config, saved)


# pylint: disable=protected-access
def _save_gin_state(gin_config):
  return dict(config={k: dict(v) for k, v in gin_config._CONFIG.items()},
              imports=set(gin_config._IMPORTS),
              operative={k: dict(v) for k, v in gin_config._OPERATIVE_CONFIG.items()},
              singletons=dict(gin_config._SINGLETONS),
              prefixes=list(gin_config._LOCATION_PREFIXES),
              locked=gin_config.config_is_locked())


def _restore_gin_state(gin_config, saved) -> None:
  gin_config._CONFIG.clear()
  gin_config._CONFIG.update(saved["config"])
  gin_config._IMPORTS.clear()
  gin_config._IMPORTS.update(saved["imports"])
  with gin_config._OPERATIVE_CONFIG_LOCK:
    gin_config._OPERATIVE_CONFIG.clear()
    gin_config._OPERATIVE_CONFIG.update(saved["operative"])
  gin_config._SINGLETONS.clear()
  gin_config._SINGLETONS.update(saved["singletons"])
  gin_config._LOCATION_PREFIXES[:] = saved["prefixes"]
  gin_config._set_config_is_locked(saved["locked"])
# pylint: enable=protected-access


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


@dataclasses.dataclass
class Parsed:
  """What `parse` loaded: the gin files (resolved paths) and the macros the user set."""

  gin_files: list[str]
  user_macros: set[str]  # set by a binding or by a gin file outside the project's gin/ folder


def parse(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths=()) -> Parsed:
  """Loads gin files then bindings (later wins), with errors that name what failed; refuses a
  binding of a macro that nothing loaded uses or defines."""
  quiet = _QuietIncludeMisses()
  logging.getLogger().addFilter(quiet)
  try:
    return _parse(gin_files, bindings, extra_search_paths)
  finally:
    logging.getLogger().removeFilter(quiet)


def _in_project(path: str) -> bool:
  return pathlib.Path(path).resolve().is_relative_to(project_gin_dir().resolve())


def _own_file_macros(path: str, paths: Sequence[str], seen: set[str]) -> set[str]:
  """The macros a user's gin file (outside gin/) defines, with its includes outside gin/."""
  if path in seen or _in_project(path):
    return set()
  seen.add(path)
  try:
    statements = _statements(pathlib.Path(path).read_text())
  except Exception:  # pylint: disable=broad-except  (gin reported any real error already)
    return set()
  macros = {s.selector for s in statements
            if isinstance(s, config_parser.BindingStatement) and not s.arg_name and not s.scope}
  for s in statements:
    if isinstance(s, config_parser.IncludeStatement):
      try:
        included = resolve_gin_file(s.filename, [str(pathlib.Path(path).parent), *paths])
      except FileNotFoundError:
        continue
      macros |= _own_file_macros(included, paths, seen)
  return macros


def _parse(gin_files, bindings, extra_search_paths) -> Parsed:
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  resolved, user_macros, seen = [], set(), set()
  for f in gin_files:
    path = resolve_gin_file(f, paths)
    try:
      gin.parse_config_file(path)
    except Exception as e:  # gin raises many types; the message is what the user needs
      raise ValueError(f"Error in gin file {path}: {e}") from e
    resolved.append(str(pathlib.Path(path).resolve()))
    user_macros |= _own_file_macros(path, paths, seen)
  known = _macros()[0] if bindings else set()  # what the files define
  file_task = _file_task_registration()
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
  if file_task and any(name == "MIXTURE_OR_TASK_NAME" for name, _ in bound):
    flag = next(b for name, b in bound if name == "MIXTURE_OR_TASK_NAME")
    raise ValueError(
        f"The binding {flag!r} replaces the gin file's MIXTURE_OR_TASK_NAME = "
        f"@{file_task}(), so the file task would never be registered from its files. Drop "
        "--gin.MIXTURE_OR_TASK_NAME (the file task's gin file names the task), or drop that "
        "gin file to run a registered task.")
  if bound:  # references count from the files and the bindings alike
    _check_macros_used(bound, known | _macros()[1], gin_files)
  return Parsed(resolved, user_macros | {name for name, _ in bound})

def _file_task_registration() -> str | None:
  """The `register_file_task` reference a gin file bound MIXTURE_OR_TASK_NAME to, if any."""
  try:
    value = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
  except ValueError:
    return None
  if (isinstance(value, gin.config.ConfigurableReference)
      and value.selector.endswith("register_file_task")):
    return value.scoped_selector
  return None


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


# ------------------------------------------------------------------------------------------------
# Settings remembered from MODEL_DIR, and the record a training run keeps

def apply_remembered(found: tuple[str, Mapping[str, Any]] | None, user_macros: set[str]) -> dict:
  """Binds `found = (source, {macro: value})` to the macros the user did not set and the
  loaded gin files use; logs them. Returns what was bound."""
  if not found:
    return {}
  source, values = found
  defined, referenced = _macros()
  applied = {}
  for name, value in values.items():
    if name in user_macros or name not in defined | referenced:
      continue
    gin.parse_config(f"{name} = {value!r}")
    applied[name] = value
  if applied:
    logging.getLogger("prompt_tuning").info(
        "Settings of the run in MODEL_DIR (from %s; flags and your own gin files win): %s",
        source, ", ".join(f"{k}={v!r}" for k, v in applied.items()))
  return applied


def bound_value(selector: str, param: str) -> Any:
  """The value gin binds to `selector.param` with macros resolved (None where unbound or a
  configurable reference: nothing is called)."""
  try:
    value = gin.get_bindings(selector, resolve_references=False).get(param)
  except (ValueError, KeyError):
    return None
  for _ in range(10):  # a macro may name another macro
    if not _is_macro(value):
      break
    value = gin.query_parameter(f"{value.scoped_selector}.value")
  return None if isinstance(value, gin.config.ConfigurableReference) else value


def _is_macro(value) -> bool:
  return (isinstance(value, gin.config.ConfigurableReference)
          and value.configurable.selector == "gin.macro")


def _describe(value, depth: int = 0) -> Any:
  """A gin value as JSON: macros resolved, a configurable reference as {"@": name, its bound
  parameters...} (recursively; nothing is called)."""
  if _is_macro(value):
    return _describe(gin.query_parameter(f"{value.scoped_selector}.value"), depth)
  if isinstance(value, gin.config.ConfigurableReference):
    scope = "/".join(value.scopes)
    out = {"@": (f"{scope}/" if scope else "") + value.configurable.selector
           + ("()" if value.evaluate else "")}
    if depth < 6:
      bindings = gin.get_bindings(value.scoped_selector, resolve_references=False)
      out.update({k: _describe(v, depth + 1) for k, v in sorted(bindings.items())})
    return out
  if isinstance(value, Mapping):
    return {str(k): _describe(v, depth) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_describe(v, depth) for v in value]
  try:
    json.dumps(value)
    return value
  except (TypeError, ValueError):
    return repr(value)


def _file_tasks() -> dict[str, dict[str, Any]]:
  """Every file task the config registers (register_file_task's bound arguments), by name."""
  selectors = {f"{s.scope}/{s.selector}" if s.scope else s.selector
               for s in _statements(gin.config_str())
               if isinstance(s, config_parser.BindingStatement) and s.arg_name
               and s.selector.split(".")[-1] == "register_file_task"}
  found = {}
  for selector in sorted(selectors):
    try:
      kwargs = _describe(gin.get_bindings(selector, resolve_references=False))
    except Exception:  # pylint: disable=broad-except  (only a record; the run reports errors)
      continue
    if isinstance(kwargs.get("name"), str):
      found[kwargs["name"]] = kwargs
  return found


def run_config(parsed: Parsed, entry: str = "prompt_tuning.runs.train") -> dict[str, Any]:
  """How gin configured a training run, for its record (`runs.train(run_config=...)`): the gin
  files, the config text, the optimizer as gin builds it (compared on resume: its bound
  parameters, macros resolved, whatever macros or files set them) and the file tasks."""
  try:
    optimizer = gin.get_bindings(entry, resolve_references=False).get("optimizer")
  except (ValueError, KeyError):
    optimizer = None
  return {"gin_files": list(parsed.gin_files), "gin_config": gin.config_str(),
          "optimizer": None if optimizer is None else _describe(optimizer),
          "file_tasks": _file_tasks()}
