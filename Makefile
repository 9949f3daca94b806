# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# TORCH_SPEC picks the torch build: the default is whatever pip resolves (a CUDA build on most
# Linux machines); CPU-only machines can say e.g. TORCH_SPEC=torch==2.13.0 for a local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

demo: $(STAMP)
	$(VENV)/bin/alexnet-mp demo

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_pipeline.py

# Regenerate the committed gRPC code after editing proto/ (tests check it is current).
proto: $(STAMP)
	cd proto && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. alexnet_api/v1/alexnet.proto

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
