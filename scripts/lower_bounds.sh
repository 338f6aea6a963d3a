#!/usr/bin/env bash
# Run the library's core tests against chosen torch / peft / transformers releases, the check
# behind the lower bounds in pyproject.toml. Usage (from the repository root):
#
#   scripts/lower_bounds.sh PEFT [TRANSFORMERS|-] [TORCH]      # e.g. 0.16.0 4.57.6 2.7.1
#   scripts/lower_bounds.sh --trainer TRANSFORMERS ACCELERATE [PEFT] [TORCH]   # e.g. 5.10.4 1.0.0
#
# --trainer checks the `trainer` extra's bounds instead: the Trainer, TRL, Accelerate and
# diagnostics-callback tests, with pip choosing trl and datasets for that transformers (PEFT
# defaults to 0.18.0, the extra's bound).
#
# "-" lets pip pick transformers. TORCH defaults to 2.13.0 (the CPU build this project installs);
# other releases come from PyPI as CUDA builds of several GB, which run on the CPU too. A fresh
# virtual environment under ${WORK:-/tmp/lorapro-bounds} gets only what the core tests need
# (torch, peft and what it pulls, pytest, hypothesis, scipy); the tests run from a copy of HEAD.
# The two figure tests need matplotlib (the `plots` extra) and are left out.
set -euo pipefail
if [ "${1:-}" = "--trainer" ]; then
  transformers=${2:?usage: scripts/lower_bounds.sh --trainer TRANSFORMERS ACCELERATE [PEFT] [TORCH]}
  accelerate=${3:?usage: scripts/lower_bounds.sh --trainer TRANSFORMERS ACCELERATE [PEFT] [TORCH]}
  peft=${4:-0.18.0}
  torch=${5:-2.13.0}
  work=${WORK:-/tmp/lorapro-bounds}
  name="trainer-transformers-$transformers-accelerate-$accelerate-peft-$peft-torch-$torch"
  venv="$work/venv-$name" code="$work/code-$name"
  mkdir -p "$work"
  if [ ! -x "$venv/bin/python" ]; then
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install --quiet "torch==$torch"
    "$venv/bin/pip" install --quiet "torch==$torch" "peft==$peft" "transformers==$transformers" \
      "accelerate==$accelerate" trl datasets pytest hypothesis scipy matplotlib
  fi
  rm -rf "$code" && mkdir -p "$code"
  git archive HEAD src tests pyproject.toml | tar -x -C "$code"
  "$venv/bin/python" -c "import torch, peft, transformers, accelerate, trl; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__)"
  cd "$code"
  exec env PYTHONPATH="$code/src:$code/tests" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_integration_trainer.py tests/test_integration_callback.py tests/test_integration_accelerate.py \
    tests/test_diagnostics.py::test_trainer_callback_records_requested_steps \
    tests/test_diagnostics.py::test_callback_writes_every_figure
fi
peft=${1:?usage: scripts/lower_bounds.sh PEFT [TRANSFORMERS|-] [TORCH]}
transformers=${2:--}
torch=${3:-2.13.0}
work=${WORK:-/tmp/lorapro-bounds}
name="peft-$peft-transformers-$transformers-torch-$torch"
venv="$work/venv-$name" code="$work/code-$name"
mkdir -p "$work"
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
  pins=("torch==$torch" "peft==$peft")
  [ "$transformers" != "-" ] && pins+=("transformers==$transformers")
  "$venv/bin/pip" install --quiet "torch==$torch"
  # torch repeated so that resolving peft cannot replace it
  "$venv/bin/pip" install --quiet "${pins[@]}" pytest hypothesis scipy
fi
rm -rf "$code" && mkdir -p "$code"
git archive HEAD src tests benchmarks pyproject.toml | tar -x -C "$code"
"$venv/bin/python" -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
cd "$code"
PYTHONPATH="$code/src:$code/tests" "$venv/bin/python" -m pytest -q -p no:cacheprovider --hypothesis-seed=0 \
  tests/test_closed_form.py tests/test_optimizers.py tests/test_pairs.py tests/test_property.py \
  tests/test_mixed_precision.py tests/test_attach.py tests/test_diagnostics.py tests/test_misuse.py \
  tests/test_integration_adapters.py \
  --deselect tests/test_diagnostics.py::test_plots_are_written \
  --deselect tests/test_diagnostics.py::test_callback_writes_every_figure
