# Two commands for a fresh machine: `make up` (install, build the examples, serve them) and
# `make test` (install with test tools, run the whole suite). Everything goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: up test install install-test build bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python compiles llama.cpp from source on first install (about 6 minutes on 2 cores; pip
# caches the wheel), shown as a progress bar by tools/pip_progress.py. For NVIDIA GPUs:
# CMAKE_ARGS="-DGGML_CUDA=on" make install
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q 'rich>=13,<15'
	$(BIN)/python tools/pip_progress.py -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q 'rich>=13,<15'
	$(BIN)/python tools/pip_progress.py -e '.[test]'
	touch $@ $(VENV)/.installed

# jco (pinned in browser/package-lock.json) transpiles each app for the browser during `amphibia build`.
browser/node_modules/.package-lock.json: browser/package.json browser/package-lock.json
	cd browser && npm ci --no-audit --no-fund
	touch $@

install: $(VENV)/.installed browser/node_modules/.package-lock.json
install-test: $(VENV)/.installed-test browser/node_modules/.package-lock.json

build: install
	$(BIN)/amphibia build examples

up: build
	$(BIN)/amphibia up examples --host $(HOST) --port $(PORT)

# The browser tests drive Debian's Chromium with Playwright (never a browser download).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: install-test /usr/bin/chromium
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/amphibia bench cold-start
	$(BIN)/amphibia bench pool
	$(BIN)/amphibia bench chaos

clean:
	rm -rf .amphibia examples/*/.amphibia tests/apps/*/.amphibia browser/node_modules
