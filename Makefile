# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# TORCH_SPEC picks the torch build: the default is whatever pip resolves (a CUDA build on most
# Linux machines); CPU-only machines can say e.g. TORCH_SPEC=torch==2.13.0 for a local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
