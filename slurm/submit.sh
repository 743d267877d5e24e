#!/usr/bin/env bash
# Submit the rest of a lion-local run as a chain of SLURM jobs, one slurm/iteration.sh job per
# remaining iteration (and the final imitation), each starting only after the previous one
# succeeded (--dependency=afterok). From the project root:
#
#   slurm/submit.sh configs/lion-7b.yaml [--iterations N] [--set KEY=VALUE ...]
#
# --iterations N submits only the next N jobs (the final imitation counts as one). Everything
# else after the config goes to lion-local. Prints one job id per line.
# sbatch options for every job come from SLURM's own input variables, e.g.
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_TIMELIMIT=48:00:00 slurm/submit.sh ...
# Environment: LION_LOCAL (the lion-local executable; default: lion-local on PATH).
set -euo pipefail

usage() {
    echo "usage: slurm/submit.sh <config.yaml> [--iterations N] [--set KEY=VALUE ...]" >&2
    exit 2
}
[[ $# -ge 1 && $1 != -* ]] || usage
CONFIG=$1
shift
LION_LOCAL=${LION_LOCAL:-lion-local}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

LIMIT=""
LION_ARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --iterations)
        [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || {
            echo "error: --iterations needs a positive whole number, e.g. --iterations 2" >&2
            exit 2
        }
        LIMIT=$2
        shift 2
        ;;
    --iterations=*)
        LIMIT=${1#--iterations=}
        [[ $LIMIT =~ ^[1-9][0-9]*$ ]] || {
            echo "error: --iterations needs a positive whole number, e.g. --iterations 2" >&2
            exit 2
        }
        shift
        ;;
    *)
        LION_ARGS+=("$1")
        shift
        ;;
    esac
done

if ! command -v "$LION_LOCAL" >/dev/null 2>&1; then
    echo "error: $LION_LOCAL not found; activate lion-local's environment or set LION_LOCAL=/path/to/lion-local" >&2
    exit 2
fi
command -v sbatch >/dev/null 2>&1 || {
    echo "error: sbatch not found; run this on a SLURM login node" >&2
    exit 2
}

# Also validates the config (exit 2 with one line naming the key) before anything is submitted.
remaining=$("$LION_LOCAL" status --config "$CONFIG" "${LION_ARGS[@]}" --remaining-iterations)
mapfile -t REMAINING <<<"$remaining"
[[ -n $remaining ]] || REMAINING=()
if [[ ${#REMAINING[@]} -eq 0 ]]; then
    echo "run of $CONFIG is complete: nothing to submit" >&2
    exit 0
fi
if [[ -n $LIMIT && $LIMIT -lt ${#REMAINING[@]} ]]; then
    REMAINING=("${REMAINING[@]:0:$LIMIT}")
fi

previous=""
for iteration in "${REMAINING[@]}"; do
    dependency=()
    if [[ -n $previous ]]; then
        # A failed job cancels the rest of the chain instead of leaving it pending forever.
        dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    fi
    job=$(sbatch --parsable --job-name="lion-iter-$iteration" "${dependency[@]}" \
        "$SCRIPT_DIR/iteration.sh" "$CONFIG" "${LION_ARGS[@]}")
    job=${job%%;*} # --parsable prints "id" or "id;cluster"
    echo "submitted iteration $iteration as job $job${previous:+ (after $previous)}" >&2
    echo "$job"
    previous=$job
done
