# twinview: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first and pinned here so that pip never pulls a newer (multi-GB)
# build; pyproject.toml only states the compatible range. Override on other machines, e.g.
#   make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/twinview demo

# Everything, as CI runs it (.ci/run: make lint, then make test).
test: install
	$(PY) -m pytest

# The loop between edits: the unit tests, without the end-to-end runs marked `slow` (< 2 min on 2 cores).
test-fast: install
	$(PY) -m pytest -m "not slow" -q

# ruff (format and lint) on everything; mypy on the package, through a link tree that names the
# folders as the twinview namespace does (mypy cannot follow the editable install's import hook).
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	mkdir -p .typecheck/twinview
	for p in pretrain augment evaluate configs; do ln -sfn ../../$$p .typecheck/twinview/$$p; done
	MYPYPATH=.typecheck $(PY) -m mypy -p twinview.pretrain -p twinview.augment -p twinview.evaluate

# The prepared GPU check (bench/gpu_check.py): its figures go to docs/BENCHMARKS.md with the GPU named.
# `make gpu-check ARGS=--dry-run` runs every part at toy sizes on the CPU, as CI does.
gpu-check: install
	$(PY) bench/gpu_check.py $(ARGS)

bench: install
	$(PY) bench/host.py
	$(PY) bench/augment.py
	$(PY) bench/losses.py
	$(PY) bench/data.py
	$(PY) bench/train_step.py
	$(PY) bench/compile.py
	$(PY) bench/cifar10_quick.py

clean:
	rm -rf $(VENV) runs *.egg-info .typecheck .mypy_cache .ruff_cache
