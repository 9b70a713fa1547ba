# Set-up is idempotent: `make test` or `make demo` on a fresh clone does everything.
# torch==2.13.0 is installed first (the CPU wheel on the project machines) so that the
# package's `torch>=2.5` range never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the demo needs only the hard dependencies (no extras): a lighter first install
CORE_STAMP := $(VENV)/.installed-core

.PHONY: test demo lint setup clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,peft,interp]"
	touch $(STAMP) $(CORE_STAMP)

$(CORE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(CORE_STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(CORE_STAMP)
	$(VENV)/bin/modformer train configs/grokking.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
