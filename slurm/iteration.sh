#!/usr/bin/env bash
# One iteration of a lion-local run (imitation, discrimination, generation; or the final
# imitation once every iteration is done) as a SLURM job. From the project root:
#
#   sbatch slurm/iteration.sh configs/lion-7b.yaml [--set KEY=VALUE ...]
#
# Everything after the config goes to lion-local. The #SBATCH lines below are defaults for one
# 8-GPU node; override them on the sbatch command line (sbatch --nodes=2 --time=48:00:00 ...).
# The job is idempotent (a finished run does nothing) and requeue-safe: SLURM sends USR1 five
# minutes before the time limit, the job stops lion-local cleanly (finished work is kept) and
# requeues itself; the next start continues where it stopped. Logs go to
# <run_dir>/logs/slurm/iteration-<job id>.log as well as SLURM's own output file.
#
# Environment: LION_LOCAL (the lion-local executable; default: lion-local on PATH, which sbatch
# passes on from the submitting shell).
#SBATCH --job-name=lion-iteration
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch slurm/iteration.sh <config.yaml> [--set KEY=VALUE ...]" >&2
    exit 2
fi
CONFIG=$1
shift
LION_LOCAL=${LION_LOCAL:-lion-local}
JOB_ID=${SLURM_JOB_ID:-local}

if ! command -v "$LION_LOCAL" >/dev/null 2>&1; then
    echo "error: $LION_LOCAL not found; activate lion-local's environment before sbatch (sbatch passes" \
        "your environment on) or set LION_LOCAL=/path/to/venv/bin/lion-local" >&2
    exit 2
fi
if [[ ! -f $CONFIG ]]; then
    echo "error: config $CONFIG not found from $(pwd); submit from the project root or pass an absolute path" >&2
    exit 2
fi

# Air-gapped: nothing lion-local or its servers start may try to download or report anything.
eval "$("$LION_LOCAL" offline-env)"

RUN_DIR=$("$LION_LOCAL" config --config "$CONFIG" "$@" --get run_dir)
LOG_DIR=$RUN_DIR/logs/slurm
mkdir -p "$LOG_DIR"
# tee ignores SIGTERM so that lion-local's last lines still reach the log while SLURM stops the job.
exec > >(trap '' TERM INT; exec tee -a "$LOG_DIR/iteration-$JOB_ID.log") 2>&1

NEXT=$("$LION_LOCAL" status --config "$CONFIG" "$@" --remaining-iterations | sed -n 1p)
echo "==== lion-local iteration: job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0})" \
    "on ${SLURM_JOB_NODELIST:-$(hostname)} at $(date '+%F %T')"
echo "     config $CONFIG $*"
echo "     run_dir $RUN_DIR, iteration ${NEXT:-none (the run is complete)}"
echo "     GPUs ${CUDA_VISIBLE_DEVICES:-none}, log $LOG_DIR/iteration-$JOB_ID.log"

stop_requested=""
child=""
on_time_limit() {
    # USR1 comes five minutes before the time limit (--signal=B:USR1@300).
    echo "==== time limit near: stopping lion-local; the job will requeue itself"
    stop_requested=time_limit
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null || true
}
on_terminate() {
    # scancel, preemption or `scontrol requeue`: SLURM decides what happens next.
    echo "==== SIGTERM: stopping lion-local"
    stop_requested=terminate
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null || true
}
trap on_time_limit USR1
trap on_terminate TERM INT

"$LION_LOCAL" iteration --config "$CONFIG" "$@" &
child=$!
# `wait` returns early when a trapped signal arrives: wait until lion-local has really exited,
# then take its exit status (bash keeps it for a finished background job).
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
wait "$child" && status=0 || status=$?

if [[ $status -eq 0 ]]; then
    echo "==== done at $(date '+%F %T'): $("$LION_LOCAL" status --config "$CONFIG" "$@" | sed -n 1p)"
    exit 0
fi
if [[ $stop_requested == time_limit ]]; then
    echo "==== stopped cleanly (exit $status); requeueing job $JOB_ID to continue"
    scontrol requeue "$JOB_ID"
    exit 0
fi
echo "==== lion-local exited with $status at $(date '+%F %T'); see $RUN_DIR/logs/lion-local.log" >&2
exit "$status"
