#!/usr/bin/env bash
# Keeps a training run going through preemptions: finds the slice's state and, if it was
# preempted (queued resource SUSPENDED/FAILED, TPU VM PREEMPTED/TERMINATED) or is gone, deletes
# it, creates it again, sets it up and relaunches training with the same MODEL_DIR, so training
# continues from the last checkpoint there. A live slice whose trainer is not running on every
# worker gets the trainer stopped and relaunched.
#
#   PROJECT=... ZONE=... TPU_NAME=... ACCELERATOR_TYPE=... RUNTIME_VERSION=... \
#   MODEL_DIR=gs://... GIN_FILES=... tpu_scripts/resume.sh [--dry-run] [-- TRAIN_FLAG...]
#
# WATCH=1 repeats the check every POLL_S seconds (default 30) until interrupted; a failed round
# (e.g. the new request FAILED) is reported and retried. In a dry run the state is taken to be
# preempted (DRY_RUN_STATE overrides) to print the whole recovery.
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
require_slice
require ACCELERATOR_TYPE RUNTIME_VERSION
require_model_dir

check_once() {
  local s ready preempted
  ready=$(ready_state)
  if [[ "$CREATE_MODE" == queued ]]; then preempted=SUSPENDED; else preempted=PREEMPTED; fi
  s=$(state "${DRY_RUN_STATE:-$preempted}")
  case "$s" in
    "$ready")
      if training_running; then
        echo "$TPU_NAME is $s and training is running on every worker" >&2
        return 0
      fi
      echo "$TPU_NAME is $s but training is not running on every worker: relaunching" >&2
      stop_training
      launch_training "${ARGS[@]}"
      ;;
    SUSPENDED | SUSPENDING | FAILED | PREEMPTED | TERMINATED | STOPPED | NOT_FOUND)
      echo "$TPU_NAME is $s: recreating it and resuming from $MODEL_DIR" >&2
      if [[ "$s" != NOT_FOUND ]]; then
        delete_slice
      fi
      create_slice
      wait_ready
      setup_workers
      launch_training "${ARGS[@]}"
      ;;
    *)
      echo "$TPU_NAME is $s: nothing to do yet" >&2
      ;;
  esac
}

if [[ "${WATCH:-0}" == 1 && "$DRY_RUN" != 1 ]]; then
  while :; do
    (check_once) || echo "resume round failed (exit $?); trying again in ${POLL_S}s" >&2
    sleep "$POLL_S"
  done
fi
check_once
