# `make demo` and `make test` set everything up on a fresh machine that has only Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup dev demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 is pinned in pyproject.toml: on these machines it resolves to a local CPU build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The main job: packaged raw text -> tokenizer -> pretrained model -> runs/speedrun/report.md (~10 min).
demo: $(VENV)/.installed
	$(BIN)/llmkit speedrun --config recipes/speedrun.yaml

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check llmkit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
