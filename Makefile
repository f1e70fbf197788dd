# The two commands of the README: `make demo` and `make test`. Both create or
# update the virtual environment at .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.clipjax-installed
# The reference peer, installed without its dependencies (they would pull a CUDA torch).
PEER := open-clip-torch==3.3.0 timm==1.0.31 torchvision==0.28.0

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(PEER)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipjax demo --workdir $${WORKDIR:-runs/demo}

lint: $(STAMP)
	$(VENV)/bin/ruff check clipjax configs tests benchmarks launch

test: lint
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
