#!/usr/bin/env bash
# One-shot accelerator check: the model and train step import without tensorflow, then the
# MFU sweep (phijax/bench/mfu.py). Writes the log and JSON under ${OUT:-/tmp}.
set -uo pipefail
OUT=${OUT:-/tmp}
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if ! python3 -c "import sys, flax; sys.exit(0 if tuple(map(int, flax.__version__.split('.')[:2])) >= (0, 12) else 1)"; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/flax-*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import sys, phijax.model, phijax.train_step, phijax.bench.mfu; bad=[m for m in ('tensorflow','seqio','gin') if m in sys.modules]; assert not bad, bad; print('imports without tensorflow/seqio/gin: ok')" || exit 1
PYTHONUNBUFFERED=1 python3 -m phijax.bench.mfu "$@" --json "$OUT/mfu.json" 2>&1 | grep -v -E "^(W|I)[0-9]{4} " | tee "$OUT/mfu.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/mfu.log"
