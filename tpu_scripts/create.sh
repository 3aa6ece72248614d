#!/usr/bin/env bash
# Creates a TPU VM slice and waits until it is up.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_NAME=phi1 ACCELERATOR_TYPE=v4-32 \
#   RUNTIME_VERSION=tpu-ubuntu2204-base tpu_scripts/create.sh [--dry-run]
#
# CREATE_MODE=queued (default) asks through `gcloud compute tpus queued-resources create` (waits
# for capacity; QUEUED_RESOURCE_ID defaults to TPU_NAME); CREATE_MODE=direct uses
# `gcloud compute tpus tpu-vm create`. SPOT=1: spot capacity; RESERVED=1: a reservation (queued);
# CREATE_FLAGS: more gcloud flags (split on spaces). POLL_S / WAIT_TIMEOUT_S: the wait.
# DRY_RUN=1 or --dry-run prints every command instead of running it.
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
require ACCELERATOR_TYPE RUNTIME_VERSION
create_slice
wait_ready
