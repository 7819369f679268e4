# Two commands do all the set-up on a fresh machine:
#   make train   create .venv, install etappe, train the CNN on the embedded digits set
#   make test    create .venv, install etappe with its test extras, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test setup bench

$(BIN)/etappe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: a CPU build that installs in seconds here, never a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/etappe

train: setup
	$(BIN)/etappe train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)
