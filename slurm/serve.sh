#!/usr/bin/env bash
# A long-running SLURM job hosting one server of a lion-local config (default: the teacher's),
# for iteration jobs to share. From the project root:
#
#   sbatch slurm/serve.sh configs/lion-7b.yaml [teacher] [--set KEY=VALUE ...]
#   sbatch --array=0-1 slurm/serve.sh configs/lion-7b.yaml teacher     (two replicas)
#
# The server is started as the config describes it (vLLM with its tensor and data parallel
# sizes; `transformers serve` in smoke mode), bound to all interfaces, and once healthy its
# endpoint is published in <run_dir>/endpoints/<server>/<job id>-<host>-<port>.json, removed
# when the job ends. Iteration jobs use it when their config makes that server external with
# no base_urls, e.g.
#   sbatch slurm/iteration.sh configs/lion-7b.yaml --set servers.teacher.engine=external
# and balance their requests over every replica that is published and healthy.
# Bound beyond loopback, the server requires an API key: servers.<server>.api_key_env's, else a
# random key made by this job, passed to the server in its environment and written into the
# endpoint file only you can read (see slurm/README.md). It is never printed here.
# Environment: LION_LOCAL (the lion-local executable), SERVE_HOST (bind address, default 0.0.0.0).
#SBATCH --job-name=lion-serve
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=7-00:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch slurm/serve.sh <config.yaml> [role or server, default teacher] [--set KEY=VALUE ...]" >&2
    exit 2
fi
CONFIG=$1
shift
ROLE=teacher
if [[ $# -gt 0 && $1 != -* ]]; then
    ROLE=$1
    shift
fi
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

eval "$("$LION_LOCAL" offline-env)"

RUN_DIR=$("$LION_LOCAL" config --config "$CONFIG" "$@" --get run_dir)
LOG_DIR=$RUN_DIR/logs/slurm
mkdir -p "$LOG_DIR"
exec > >(trap '' TERM INT; exec tee -a "$LOG_DIR/serve-$ROLE-$JOB_ID.log") 2>&1

echo "==== lion-local serve $ROLE: job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
    "on ${SLURM_JOB_NODELIST:-$(hostname)} at $(date '+%F %T')"
echo "     config $CONFIG $*"
echo "     endpoint files under $RUN_DIR/endpoints/, log $LOG_DIR/serve-$ROLE-$JOB_ID.log"

child=""
stop_server() {
    echo "==== stopping the $ROLE server at $(date '+%F %T')"
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null || true
}
trap stop_server TERM INT USR1

"$LION_LOCAL" serve "$ROLE" --config "$CONFIG" --host "${SERVE_HOST:-0.0.0.0}" --publish "$@" &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
wait "$child" && status=0 || status=$?
echo "==== $ROLE server exited with $status at $(date '+%F %T')"
exit "$status"
