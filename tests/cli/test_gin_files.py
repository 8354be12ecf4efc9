"""Every gin file under gin/ parses, and every configurable, parameter and `@reference` it names
resolves to the library as it is laid out now (a module that moved would fail here first)."""
import pathlib
import re

import gin
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
GIN_DIR = REPO / "gin"
GIN_FILES = sorted(p.relative_to(GIN_DIR).as_posix() for p in GIN_DIR.rglob("*.gin"))
# `@name()` / `@scope/name` references and `selector.param = ...` bindings, comments stripped.
_REFERENCE = re.compile(r"@(?:[\w.]+/)*([\w.]+)")
_BINDING = re.compile(r"^((?:[\w.]+/)*[\w.]+)\.(\w+)\s*=", re.M)
_BLOCK = re.compile(r"^((?:[\w.]+/)*[\w.]+):\s*$", re.M)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=True)
  yield
  gin.clear_config(clear_constants=True)


def _text(name: str) -> str:
  return "\n".join(line.split("#", 1)[0] for line in (GIN_DIR / name).read_text().splitlines())


def test_every_gin_file_is_found():
  assert len(GIN_FILES) >= 40
  assert {"runs/prompt_finetune.gin", "models/t5_1_1_base.gin", "decoding/greedy.gin",
          "prompts/from_class_labels.gin"} <= set(GIN_FILES)


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_parses_and_resolves_every_configurable(name):
  """gin checks configurable names and their parameters while it parses; then every selector the
  file binds or references must be registered, with each bound parameter in its signature."""
  gin.add_config_file_search_path(str(GIN_DIR))
  gin.parse_config_files_and_bindings([str(GIN_DIR / name)], [], finalize_config=False,
                                      skip_unknown=False)
  text = _text(name)
  selectors = set(_REFERENCE.findall(text)) | {s.rsplit("/", 1)[-1] for s in _BLOCK.findall(text)}
  selectors |= {s.rsplit("/", 1)[-1] for s, _ in _BINDING.findall(text)}
  selectors = {s for s in selectors if "." in s and not s.startswith("gin.")}  # macros: no dot
  for selector in sorted(selectors):
    # `gin.get_bindings` raises for a selector that matches no registered configurable.
    gin.get_bindings(selector, resolve_references=False)
  for selector, param in _BINDING.findall(text):
    selector = selector.rsplit("/", 1)[-1]
    if "." not in selector or selector.startswith("gin."):
      continue
    assert param in gin.get_bindings(selector, resolve_references=False), f"{name}: {selector}.{param} is not bound"
