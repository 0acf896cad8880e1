# The README's commands. `make run` sets up and runs the pipeline on embedded defaults (no services);
# `make test` runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PRESET ?= smoke
BIN := $(VENV)/bin
# CPU torch BEFORE the project, so pip never resolves a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2

.PHONY: setup run lint test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[test]"
	touch $@

run: setup
	$(BIN)/pd run --preset $(PRESET)

lint: setup
	$(BIN)/ruff check .

# Two workers, whole files as work units (tests/parallel.py); TEST_WORKERS=0 runs them in this one process.
test: setup
	$(BIN)/pytest -q -p no:cacheprovider --timeout=900 -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/pytest -q -p no:cacheprovider -m "not integration and not fullstack and not slow"

clean:
	rm -rf $(VENV) .pd
