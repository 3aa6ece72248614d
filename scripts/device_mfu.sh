#!/usr/bin/env bash
# One-shot accelerator check: the model and train step import without tensorflow, then the
# MFU sweep (phijax/bench/mfu.py), once per XLA_FLAGS variant. Writes logs and JSON under ${OUT:-/tmp}.
#   XLA_FLAG_SETS='A;B'  ';'-separated XLA_FLAGS variants, one sweep each (default: the current XLA_FLAGS)
#   ATTENTION_CHECK=1    first run scripts/device_attention_check.py (cuDNN vs the XLA reference)
# Usage: bash scripts/device_mfu.sh [phijax.bench.mfu flags], e.g.
#   bash scripts/device_mfu.sh --configs phi1 --batches 16,32 --remat save_dots_attn --steps 4
#   bash scripts/device_mfu.sh --configs phi1 --batches 16 --remat save_dots_attn --steps 4 \
#       --peer torch --peer_batches 8,16 --peer_modes eager,compile     # + the PyTorch peer, and the ratios
# With --peer, jax must not preallocate 75% of the GPU (torch runs in the same process after it):
# XLA_PYTHON_CLIENT_PREALLOCATE=false is exported (unless already set). The peer runs once per XLA_FLAGS set.
set -uo pipefail
OUT=${OUT:-/tmp}
case " $* " in
  *" --peer "* | *" --peer="*) export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1 ;;
esac
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if ! python3 -c "import sys, flax; sys.exit(0 if tuple(map(int, flax.__version__.split('.')[:2])) >= (0, 12) else 1)"; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/flax-*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import sys, phijax.model, phijax.train_step, phijax.bench.mfu; bad=[m for m in ('tensorflow','seqio','gin') if m in sys.modules]; assert not bad, bad; print('imports without tensorflow/seqio/gin: ok')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/mfu.log"
if [ "${ATTENTION_CHECK:-0}" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 scripts/device_attention_check.py --json "$OUT/attention_check.json" 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4} " | tee "$OUT/attention_check.log"
fi
IFS=';' read -ra FLAG_SETS <<< "${XLA_FLAG_SETS-${XLA_FLAGS:-}}"
[ "${#FLAG_SETS[@]}" -gt 0 ] || FLAG_SETS=("")
for i in "${!FLAG_SETS[@]}"; do
  XLA_FLAGS="${FLAG_SETS[$i]}" PYTHONUNBUFFERED=1 python3 -m phijax.bench.mfu "$@" --json "$OUT/mfu_$i.json" 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4} " | tee -a "$OUT/mfu.log"
done
