# shellcheck shell=bash
# Shared by the tpu_scripts/*.sh: settings from the environment, --dry-run, and the gcloud calls.
# Sourced, never run. Every gcloud (and local) command goes through `run`, which prints it
# shell-quoted and, unless DRY_RUN=1, runs it.

set -euo pipefail
exec 3>&1  # the script's stdout: dry-run prints there even from inside $(...)

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TPU_SCRIPTS_DIR")

: "${DRY_RUN:=0}"
: "${GCLOUD:=gcloud}"
: "${CREATE_MODE:=queued}"        # queued (queued-resources create) or direct (tpu-vm create)
: "${QUEUED_RESOURCE_ID:=}"       # default: $TPU_NAME
: "${POLL_S:=30}"                 # seconds between state polls
: "${WAIT_TIMEOUT_S:=7200}"       # how long create/resume wait for the slice to come up
: "${REMOTE_DIR:=phijax}"         # on each worker, relative to the home directory
: "${REMOTE_VENV:=phijax-venv}"
: "${REMOTE_LOG_DIR:=phijax-logs}"
: "${PYTHON_VERSION:=3.11}"       # TPU VM images ship Python 3.10; uv installs this one
: "${PHIJAX_EXTRAS:=data,gcs,tpu}"  # the tpu extra brings jax[tpu] (libtpu)
: "${JAX_SPEC:=}"                 # optional extra requirement, e.g. jax[tpu]==0.10.2 to pin
: "${DRY_RUN_STATE:=}"            # dry-run only: the state resume.sh and status.sh assume

die() {
  echo "error: $*" >&2
  exit 2
}

# usage: prints the comment block at the top of the calling script (after the shebang).
usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# parse_args "$@": handles --dry-run and -h/--help; everything else lands in ARGS (after an
# optional `--`, everything is kept as it is).
parse_args() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  case "$DRY_RUN" in
    0 | 1) ;;
    *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
  esac
}

# require VAR...: fails naming every unset/empty variable, before any command runs.
require() {
  local missing=() v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
  done
  if ((${#missing[@]})); then
    die "missing required environment variable(s): ${missing[*]} (see docs/scale_out.md, 'TPU VMs')"
  fi
}

require_slice() {
  require PROJECT ZONE TPU_NAME
  : "${QUEUED_RESOURCE_ID:=$TPU_NAME}"
  case "$CREATE_MODE" in
    queued | direct) ;;
    *) die "CREATE_MODE must be 'queued' or 'direct', got '$CREATE_MODE'" ;;
  esac
  LOC=(--project="$PROJECT" --zone="$ZONE")
}

# require_model_dir: every worker writes checkpoints and reads them back, so MODEL_DIR must be
# shared storage (a GCS bucket), not a worker's local disk.
require_model_dir() {
  require MODEL_DIR GIN_FILES
  [[ "$MODEL_DIR" == gs://?* ]] || die "MODEL_DIR must be a gs:// URL (shared by all workers), got '$MODEL_DIR'"
}

# shquote WORD: WORD as one shell word, single-quoted when needed (the form Python's shlex.quote
# gives, so a printed command reads back with shlex.split).
shquote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# quote_words WORD...: the words shell-quoted and joined by spaces, safe to embed in a command.
quote_words() {
  local out=() w
  for w in "$@"; do
    out+=("$(shquote "$w")")
  done
  echo "${out[*]}"
}

# run CMD...: print, then run unless dry-run. Dry-run prints to stdout (a script to copy), a real
# run logs to stderr.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_words "$@" >&3
  else
    echo "+ $(quote_words "$@")" >&2
    "$@"
  fi
}

gcloud_run() {
  run "$GCLOUD" "$@"
}

# ssh_workers WORKER COMMAND: the command string runs on the worker(s) (`all` or an index).
ssh_workers() {
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

# state ASSUMED: the slice's state, one word (a dry run prints the call and returns ASSUMED). Queued resources: ACCEPTED, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED (a preempted spot slice), FAILED, ...; direct: CREATING, READY,
# PREEMPTED, TERMINATED, ... NOT_FOUND when it does not exist.
state() {
  local args out err rc
  if [[ "$CREATE_MODE" == queued ]]; then
    args=(compute tpus queued-resources describe "$QUEUED_RESOURCE_ID" "${LOC[@]}" --format=value\(state.state\))
  else
    args=(compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format=value\(state\))
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    run "$GCLOUD" "${args[@]}"
    echo "$1"  # dry-run: the caller's assumption
    return
  fi
  echo "+ $(quote_words "$GCLOUD" "${args[@]}")" >&2
  err=$(mktemp)
  rc=0
  out=$("$GCLOUD" "${args[@]}" 2>"$err") || rc=$?
  if ((rc)); then
    if grep -q -E 'NOT_FOUND|not found' "$err"; then
      rm -f "$err"
      echo NOT_FOUND
      return
    fi
    cat "$err" >&2
    rm -f "$err"
    die "describing $TPU_NAME failed (exit $rc)"
  fi
  rm -f "$err"
  out=${out//[[:space:]]/}
  echo "${out:-UNKNOWN}"
}

# ready_state: the state in which the slice can run jobs.
ready_state() {
  if [[ "$CREATE_MODE" == queued ]]; then echo ACTIVE; else echo READY; fi
}

# wait_ready: polls until the slice is up; fails on a terminal state or after WAIT_TIMEOUT_S.
wait_ready() {
  local want s deadline
  want=$(ready_state)
  deadline=$((SECONDS + WAIT_TIMEOUT_S))
  while :; do
    s=$(state "$want")
    case "$s" in
      "$want") echo "$TPU_NAME is $s" >&2; return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED | NOT_FOUND)
        die "$TPU_NAME is $s while waiting for $want" ;;
    esac
    ((SECONDS < deadline)) || die "$TPU_NAME still $s after ${WAIT_TIMEOUT_S}s (WAIT_TIMEOUT_S)"
    echo "$TPU_NAME is $s; waiting for $want" >&2
    sleep "$POLL_S"
  done
}

# create_slice: one create call (queued resource or direct TPU VM); does not wait.
create_slice() {
  local extra=()
  if [[ -n "${CREATE_FLAGS:-}" ]]; then
    read -r -a extra <<<"$CREATE_FLAGS"
  fi
  if [[ "${SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  if [[ "$CREATE_MODE" == queued ]]; then
    if [[ "${RESERVED:-0}" == 1 ]]; then
      extra+=(--reserved)
    fi
    gcloud_run compute tpus queued-resources create "$QUEUED_RESOURCE_ID" --node-id="$TPU_NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
  else
    gcloud_run compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
  fi
}

# delete_slice: deletes the queued resource with its TPU VM (--force), or the TPU VM.
delete_slice() {
  if [[ "$CREATE_MODE" == queued ]]; then
    gcloud_run compute tpus queued-resources delete "$QUEUED_RESOURCE_ID" "${LOC[@]}" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
  fi
}

# A remote shell function: `alive PID` is true while PID runs (a zombie, a trainer that died under
# a parent which has not reaped it, counts as dead; `kill -0` would not tell).
# shellcheck disable=SC2016  # expanded on the worker
REMOTE_ALIVE='alive() { case "$(ps -o stat= -p "$1" 2>/dev/null | tr -d " ")" in "" | Z*) return 1 ;; esac; }'

# The trainer's pid and log on each worker (launch.sh writes them, stop.sh and logs.sh read them).
remote_pid_file() { echo "\$HOME/$REMOTE_LOG_DIR/train.pid"; }
remote_log_file() { echo "\$HOME/$REMOTE_LOG_DIR/train.log"; }

# launch_training TRAIN_ARG...: starts `python -m phijax.train` under nohup on every worker, in
# the background, with jax's TPU auto-detection of the other hosts; refuses to start a second
# trainer where one is still running.
launch_training() {
  local files=() args=() f train_env=() remote pid log
  read -r -a files <<<"$GIN_FILES"
  for f in "${files[@]}"; do
    args+=("--gin_file=$f")
  done
  args+=("--gin_param=MODEL_DIR = \"$MODEL_DIR\"" "$@")
  if [[ -n "${TRAIN_ENV:-}" ]]; then
    read -r -a train_env <<<"$TRAIN_ENV"
  fi
  pid=$(remote_pid_file)
  log=$(remote_log_file)
  remote="set -e; $REMOTE_ALIVE; mkdir -p \"\$HOME/$REMOTE_LOG_DIR\"; cd \"\$HOME/$REMOTE_DIR\""
  remote+="; if [ -f \"$pid\" ] && alive \"\$(cat \"$pid\")\"; then"
  remote+=" echo \"phijax.train is already running on \$(hostname) (pid \$(cat \"$pid\"))\" >&2; exit 1; fi"
  remote+="; env PHIJAX_DISTRIBUTED=auto ${train_env[*]+$(quote_words "${train_env[@]}") }nohup \"\$HOME/$REMOTE_VENV/bin/python\" -m phijax.train"
  remote+=" $(quote_words "${args[@]}") >>\"$log\" 2>&1 </dev/null &"
  remote+=" echo \$! >\"$pid\"; echo \"started phijax.train on \$(hostname): pid \$(cat \"$pid\"), log $log\""
  ssh_workers all "$remote"
}

# stop_training: SIGTERM to the trainer on every worker, SIGKILL after STOP_GRACE_S seconds.
stop_training() {
  local pid grace=${STOP_GRACE_S:-60}
  pid=$(remote_pid_file)
  ssh_workers all "$REMOTE_ALIVE; if [ -f \"$pid\" ]; then p=\$(cat \"$pid\"); kill -TERM \"\$p\" 2>/dev/null || true;\
 for _ in \$(seq $grace); do alive \"\$p\" || break; sleep 1; done;\
 kill -KILL \"\$p\" 2>/dev/null || true; rm -f \"$pid\"; echo \"stopped phijax.train on \$(hostname)\"; fi"
}

# training_running: exit 0 when the trainer runs on every worker.
training_running() {
  local pid
  pid=$(remote_pid_file)
  if [[ "$DRY_RUN" == 1 ]]; then
    ssh_workers all "$REMOTE_ALIVE; alive \"\$(cat \"$pid\")\""
    return 1  # dry-run: print the recovery path
  fi
  ssh_workers all "$REMOTE_ALIVE; alive \"\$(cat \"$pid\")\"" >/dev/null 2>&1
}

# setup_workers: copies this checkout to every worker and installs it (with jax[tpu]) into a venv
# (uv provides PYTHON_VERSION: the TPU VM images ship an older python3).
setup_workers() {
  local tarball=${PHIJAX_SRC_TARBALL:-} remote
  if [[ -z "$tarball" ]]; then
    tarball="${TMPDIR:-/tmp}/phijax-src-$TPU_NAME.tar.gz"
    run tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude=./.venv --exclude=./runs --exclude=./.cache \
      --exclude=./build --exclude=./shared --exclude=./.whl --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=.ruff_cache .
  fi
  gcloud_run compute tpus tpu-vm scp "$tarball" "$TPU_NAME:phijax-src.tar.gz" "${LOC[@]}" --worker=all
  remote="set -e; rm -rf \"\$HOME/$REMOTE_DIR\"; mkdir -p \"\$HOME/$REMOTE_DIR\""
  remote+="; tar -xzf \"\$HOME/phijax-src.tar.gz\" -C \"\$HOME/$REMOTE_DIR\"; cd \"\$HOME/$REMOTE_DIR\""
  remote+="; python3 -m pip install --user --quiet --upgrade uv"
  remote+="; \"\$HOME/.local/bin/uv\" venv --allow-existing --python $(quote_words "$PYTHON_VERSION") \"\$HOME/$REMOTE_VENV\""
  remote+="; \"\$HOME/.local/bin/uv\" pip install --python \"\$HOME/$REMOTE_VENV/bin/python\""
  remote+=" -e $(quote_words ".[$PHIJAX_EXTRAS]" ${JAX_SPEC:+"$JAX_SPEC"})"
  remote+="; \"\$HOME/$REMOTE_VENV/bin/python\" -c 'import jax, phijax; print(\"phijax ready on jax\", jax.__version__)'"
  ssh_workers all "$remote"
}
