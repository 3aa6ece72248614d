#!/usr/bin/env bash
# Shows a worker's training log.
#
#   PROJECT=... ZONE=... TPU_NAME=... [WORKER=0] [LOG_LINES=100] [FOLLOW=1] tpu_scripts/logs.sh [--dry-run]
#
# WORKER: a worker index, or `all` (then the last LOG_LINES of every worker's log, without following).
# FOLLOW=1 (default for one worker) keeps printing new lines (tail -F) until interrupted.
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"
require_slice
WORKER=${WORKER:-0}
LOG_LINES=${LOG_LINES:-100}
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER must be a worker index or 'all', got '$WORKER'"
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || die "LOG_LINES must be a number, got '$LOG_LINES'"
follow=${FOLLOW:-1}
[[ "$WORKER" == all ]] && follow=0
if [[ "$follow" == 1 ]]; then
  ssh_workers "$WORKER" "tail -n $LOG_LINES -F \"$(remote_log_file)\""
else
  ssh_workers "$WORKER" "echo \"== \$(hostname) ==\"; tail -n $LOG_LINES \"$(remote_log_file)\""
fi
