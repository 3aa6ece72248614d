#!/usr/bin/env bash
# Starts training on every worker of the slice, in the background (nohup), one log per worker.
#
#   PROJECT=... ZONE=... TPU_NAME=... MODEL_DIR=gs://my-bucket/phi1 \
#   GIN_FILES="gin/experiments/phi1_pretrain.gin" tpu_scripts/launch.sh [--dry-run] [-- TRAIN_FLAG...]
#   (phi1_pretrain.gin needs its data macros as TRAIN_FLAGs: --gin_param="CODE_SOURCES = [...]" etc.)
#
# Runs `python -m phijax.train --gin_file=F... --gin_param="MODEL_DIR = '$MODEL_DIR'" TRAIN_FLAG...`
# with PHIJAX_DISTRIBUTED=auto (jax finds the other hosts of the slice). GIN_FILES: space-separated,
# relative to the checkout. TRAIN_ENV: extra KEY=VALUE words for the trainer's environment (e.g.
# LIBTPU_INIT_ARGS=...). Logs: ~/phijax-logs/train.log on each worker (tpu_scripts/logs.sh).
# Running it again with the same MODEL_DIR resumes from the last checkpoint there.
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
require_slice
require_model_dir
launch_training "${ARGS[@]}"
