#!/bin/sh
# torchaudio from PyPI is a CUDA build: its compiled extension needs libc10_cuda.so, which the
# CPU torch lacks, so `import torchaudio` (done by LLaMA-Factory's data module) fails. Without
# the extension files torchaudio imports and reports the extension unavailable (the state its
# loader is written for, e.g. a pex deployment); LLaMA-Factory uses torchaudio only to load audio.
set -eu
venv="$1"
rm -f "$venv"/lib/python3.*/site-packages/torchaudio/lib/*.so
"$venv/bin/python" -c "import torchaudio"
