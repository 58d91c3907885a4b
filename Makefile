# The two commands a newcomer needs: `make demo` and `make test`.
# Both create or refresh .venv, install fastedge with its extras and compile the core.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastedge-installed

.PHONY: all build test demo lint typecheck bench bench-load clean

all: build

# (Re)install when the packaging files change; editable so tests see the source tree.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The editable install only records the package; the compiled modules are built in
	# place by `build` below (building them here too would compile everything twice).
	FASTEDGE_NO_EXTENSIONS=1 $(PY) -m pip install -q -e '.[test,bench,dev]'
	touch $(STAMP)

# Recompile changed .pyx in place (cythonize skips unchanged modules).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest

demo: build
	$(PY) -m fastedge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check fastedge tests bench
	$(VENV)/bin/ruff format --check fastedge tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: build
	$(PY) -m pytest bench/ --benchmark-only

# Side-by-side load run against nginx and HAProxy (installs them from Debian if missing).
bench-load: build
	$(PY) -m bench.load.run --interleave --rounds 5 --duration 6 --results bench/RESULTS.md

clean:
	rm -rf build fastedge/_core/*.c fastedge/_core/*.so fastedge/_core/*.html \
		fastedge/*.c fastedge/*.so fastedge/http/*.c fastedge/http/*.so
