#!/usr/bin/env bash
# Deletes the slice (the queued resource together with its TPU VM, or the TPU VM). MODEL_DIR on
# GCS is kept.
#
#   PROJECT=... ZONE=... TPU_NAME=... tpu_scripts/delete.sh [--dry-run]
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
delete_slice
