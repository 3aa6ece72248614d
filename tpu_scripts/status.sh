#!/usr/bin/env bash
# Prints the slice's state (queued resource or TPU VM), one word; NOT_FOUND when there is none.
#
#   PROJECT=... ZONE=... TPU_NAME=... tpu_scripts/status.sh [--dry-run]
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
state "${DRY_RUN_STATE:-UNKNOWN}"
