# `make demo` and `make test` set up .venv themselves: pip, torch, then the project with its extras, every package at
# the tested version of constraints.txt (the same pins docker/Dockerfile installs).
PY          ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# DeepSpeed JIT-builds a CPU communication op on first use; a cache per venv keeps two checkouts from rebuilding it
# for each other (a rank waiting on a rebuild can miss the rendezvous)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-fast lint format bench constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch torchvision
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev,fairscale,tensorboard,wandb]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vimoe_dist demo

# Two pytest workers: a unit test keeps one core busy, a job of several ranks waits on collectives and processes;
# tests/xdist_groups.py says how the tests are scheduled today, and what was measured.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup -p xdist_groups

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiproc and not system"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m vimoe_dist bench all

# after a change of dependencies in pyproject.toml: install them into .venv, run the tests, then pin what passed
constraints: $(STAMP)
	$(BIN)/python tools/constraints.py > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs .pytest_cache
