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

# llama.cpp through llama-cpp-python (the `llamacpp` extra: export-gguf --quant, eval --backend llama.cpp, the
# tests that load GGUF files in llama.cpp). pip builds it from source (about 12 minutes on 2 cores), so the wheel
# is built once into a cache outside the clone and installed from there; CPU build, no BLAS.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_WHEELS ?= $(HOME)/.cache/vlm-merge/wheels
LLAMACPP_CMAKE := -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: setup tf4 browser llamacpp demo test bench

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

llamacpp: $(VENV)/.llamacpp

$(VENV)/.llamacpp: $(VENV)/.installed
	@mkdir -p $(LLAMACPP_WHEELS)
	@if ! ls $(LLAMACPP_WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMACPP_VERSION) into $(LLAMACPP_WHEELS) (once; about 12 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(VENV)/bin/python -m pip wheel -q --no-deps --disable-pip-version-check \
	    -w $(LLAMACPP_WHEELS) llama-cpp-python==$(LLAMACPP_VERSION); \
	fi
	$(PIP) --find-links $(LLAMACPP_WHEELS) -e ".[test,llamacpp]" $(QUIET_PIP)
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

test: setup tf4 browser llamacpp
	$(VENV)/bin/python -m pytest -q -rs

bench: setup
	$(VENV)/bin/python -m bench.chat_vector
