#!/usr/bin/env bash
# Creates .venv and installs phijax with its data, test and tpu extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[data,test,tpu]"  # tpu: libtpu for the AOT compile test
# The XLA:CPU kernels (attention and loss_kernel = 'cpu', bound by gin/experiments/cpu_demo.gin) are compiled with
# the host's C++ compiler; building them here names a missing compiler now, not at the first step.
.venv/bin/python -m phijax.kernels.cpu_ffi >/dev/null
