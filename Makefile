# `make demo` and `make test` set everything up on a fresh machine that has only Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup dev llamacpp demo test lint bench clean

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

# llama.cpp (llama-cpp-python) is the reference runner of the GGUF tests. It builds from source once
# (~10 min on 2 cores, tools/examples/tests/llava off) into the llmkit cache; later installs reuse the wheel.
LLAMACPP_VERSION := 0.3.36
WHEELS := $(or $(LLMKIT_CACHE),$(HOME)/.cache/llmkit)/wheels
LLAMACPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.installed-llamacpp: | $(BIN)/python
	@ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMACPP_VERSION) once into $(WHEELS) (about 10 minutes)"; \
	  CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 10 $(BIN)/pip wheel --quiet \
	    --no-deps --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMACPP_VERSION); }
	$(BIN)/pip install --quiet $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
	touch $@

setup: $(VENV)/.installed
dev: $(VENV)/.installed-dev
llamacpp: $(VENV)/.installed-llamacpp

# The main job: packaged raw text -> tokenizer -> pretrained model -> runs/speedrun/report.md (~10 min).
demo: $(VENV)/.installed
	$(BIN)/llmkit speedrun --config recipes/speedrun.yaml

# The real-checkpoint verb tests (Qwen2.5-0.5B and Gemma-3 with llama.cpp references, logits over 150k-262k
# vocabularies) run in a process of their own: after the rest of the suite the allocator's high-water mark
# plus theirs came within 2 GB of the machine's 24 GB. So does the README's walkthrough (every command of the
# README and of the recipes' headers, in a fresh folder), which loads the three real models in-process.
test: $(VENV)/.installed-dev $(VENV)/.installed-llamacpp
	$(BIN)/python -m pytest -q --ignore=tests/test_real_families.py --ignore=tests/test_readme.py
	$(BIN)/python -m pytest -q tests/test_real_families.py
	$(BIN)/python -m pytest -q tests/test_readme.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check llmkit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
