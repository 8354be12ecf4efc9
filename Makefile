# Quick start: `make demo` (prompt-tune the bundled model) and `make test` (the test suite).
# Both create or reuse .venv and install only when setup.py changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP_LIB := $(VENV)/.installed-lib-$(shell cksum setup.py | cut -d' ' -f1)
STAMP_TEST := $(VENV)/.installed-test-$(shell cksum setup.py | cut -d' ' -f1)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_LIB): | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(STAMP_LIB)

install: $(STAMP_LIB)

demo: $(STAMP_LIB)
	$(PY) -m prompt_tuning.demo

test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info
