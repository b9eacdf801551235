# The two README commands: `make demo` and `make test`. Both set up .venv/ first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# torch is pinned to the local CPU wheel (constraints.txt); an unpinned torch pulls GBs of CUDA wheels.
PIP := $(VENV)/bin/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints.txt
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET_PIP)
	$(PIP) -e ".[test]" $(QUIET_PIP)
	touch $@

demo: setup
	$(VENV)/bin/vlm-merge demo --out out/demo --force

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m bench.chat_vector
