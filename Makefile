# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# TORCH_SPEC picks the torch build: the default is whatever pip resolves (a CUDA build on most
# Linux machines); CPU-only machines can say e.g. TORCH_SPEC=torch==2.13.0 for a local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench proto clean deploy-smoke

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

# The tests run in a new random order each time (pytest-randomly), from a seed this prints:
# `make test SEED=N` repeats that order.
test: $(STAMP)
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "test order: seed $$seed (make test SEED=$$seed repeats it)"; \
	$(PY) -m pytest -q --durations=20 -p randomly --randomly-seed=$$seed $(PYTEST_ARGS)

# The house style: ruff's format, and its checks as pyproject.toml names them (CI runs this before the tests).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/alexnet-mp demo

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_pipeline.py

# Regenerate the committed gRPC code after editing proto/ (tests check it is current). grpcio-tools is
# the test extra's pin (1.80.1): its protobuf 6.31 gencode runs on protobuf 6 and 7 alike.
PROTOS := alexnet_api/v1/alexnet.proto alexnet_api/inference_v2/open_inference_grpc.proto
proto: $(STAMP)
	cd proto && for file in $(PROTOS); do \
		../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $$file || exit 1; done

# `ray up deploy/onprem.yaml` for real against this machine over SSH, then `ray down` (root; not in CI).
deploy-smoke: $(STAMP)
	bash deploy/smoke.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
