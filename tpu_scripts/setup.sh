#!/usr/bin/env bash
# Installs phijax (this checkout) and its dependencies with jax[tpu] on every worker.
#
#   PROJECT=... ZONE=... TPU_NAME=... tpu_scripts/setup.sh [--dry-run]
#
# Packs this checkout (without .venv, runs/, caches) into a tarball (or uses PHIJAX_SRC_TARBALL),
# copies it to ~/phijax on all workers and installs `-e .[PHIJAX_EXTRAS]` (default data,gcs,tpu;
# tpu brings jax[tpu]) and JAX_SPEC if set (e.g. jax[tpu]==0.10.2) into ~/phijax-venv with Python
# PYTHON_VERSION (default 3.11, via uv: the TPU VM images ship an older python3).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
setup_workers
