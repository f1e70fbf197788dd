# The two commands of the README: `make demo` and `make test`. Both create or
# update the virtual environment at .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.clipjax-installed
# The reference peers, installed without their dependencies (they would pull a CUDA torch;
# CLIP_benchmark's would also pull transformers): open_clip, and CLIP_benchmark with the
# one module its CLI imports (pycocoevalcap) for the parity test of `clipjax eval`.
PEER := open-clip-torch==3.3.0 timm==1.0.31 torchvision==0.28.0 clip-benchmark==1.6.2 \
        pycocoevalcap==1.2

.PHONY: venv demo test test-fast lint bench clean

# System packages, where Debian's apt is usable: tcmalloc (the fast CPU allocator clipjax
# re-executes under), Fashion-MNIST (the demo's data) and chromium (the browser that
# tests/test_serve.py drives through Playwright). Skipped quietly elsewhere.
SYSTEM_PACKAGES := libtcmalloc-minimal4 dataset-fashion-mnist chromium

$(STAMP): pyproject.toml Makefile
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
	  (apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1)) \
	  || echo "note: could not install $(SYSTEM_PACKAGES) with apt-get; continuing without"; \
	fi
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

# --dist loadfile: a test file runs on one worker, so its module fixtures (compiled
# programs, reference runs) are built once, not once per worker.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q

# The inner loop: everything but the end-to-end files (tests/conftest.py SLOW_FILES).
test-fast: lint
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -m "not slow"

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .jax_cache
