# The two README commands: `make demo` and `make test`. Both set up .venv/ first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# torch is pinned to the local CPU wheel (constraints.txt); an unpinned torch pulls GBs of CUDA wheels.
PIP := $(VENV)/bin/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints.txt
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# transformers 4.x in a side environment (never a dependency): the test that loads merged outputs with 4.46
TF4 := bench/.venv-tf4
TF4_PIP := $(TF4)/bin/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints.txt

.PHONY: setup tf4 browser demo test bench

setup: $(VENV)/.installed

tf4: $(TF4)/.installed

$(TF4)/.installed: constraints.txt
	$(PYTHON) -m venv $(TF4)
	$(TF4_PIP) torch==2.13.0 transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.36.2 safetensors sentencepiece protobuf pillow $(QUIET_PIP)
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET_PIP)
	$(PIP) -e ".[test]" $(QUIET_PIP)
	touch $@

demo: setup
	$(VENV)/bin/vlm-merge demo --out out/demo --force

# The caption gallery is checked in a real headless browser (Debian's chromium). As root with apt
# (CI, fresh machines of this kind) it is installed; elsewhere that one test says it is skipped.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk) >/dev/null 2>&1 \
	      || echo "could not install chromium: the gallery browser test will be skipped"; \
	  else echo "chromium not found: the gallery browser test will be skipped"; fi; \
	fi

test: setup tf4 browser
	$(VENV)/bin/python -m pytest -q -rs

bench: setup
	$(VENV)/bin/python -m bench.chat_vector
