#!/usr/bin/env bash
# Stops training on every worker: SIGTERM, then SIGKILL after STOP_GRACE_S seconds (default 60).
#
#   PROJECT=... ZONE=... TPU_NAME=... tpu_scripts/stop.sh [--dry-run]
#
# The slice stays up; launch.sh (or resume.sh) with the same MODEL_DIR continues from the last
# checkpoint.
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
stop_training
