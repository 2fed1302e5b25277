# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
# Each creates its own virtualenv in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so pip never swaps in a different (multi-GB) build later. pip byte-compiles
# everything (45 s of the 105 s here): where PYTHONDONTWRITEBYTECODE is set, as on this box, nothing else would, and
# every process would compile torch and Ray again on import.
# CPU-only Linux box elsewhere: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU box: the default PyPI torch wheel for Linux is the CUDA build; nothing to change.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ray_jobs.speedrun --preset demo $(ARGS)

# two test processes, a file each at a time (a file's tests share their fixtures); longest files first (conftest)
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: install  # the unit tests that start no Ray, Serve app or browser
	$(PY) -m pytest -q -m "not ray" $(ARGS)

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV)
