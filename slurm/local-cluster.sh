#!/usr/bin/env bash
# A real single-node SLURM on this Debian machine (munge, slurmctld, slurmd), for the tests and
# for trying the batch scripts before a real cluster. Run as root:
#
#   slurm/local-cluster.sh up        install the packages if missing, write the config, start
#   slurm/local-cluster.sh status    say whether it is up (exit 0) or not (exit 1)
#   slurm/local-cluster.sh down      stop the daemons and cancel every job
#
# The node advertises LOCAL_SLURM_GPUS GPUs (default 8) through character devices with the null
# device's numbers, so the production `#SBATCH --gpus-per-node=8` lines run unchanged on a
# machine without GPUs (jobs see CUDA_VISIBLE_DEVICES=0,...,7; lion-local decides CPU or GPU
# from torch, never from that variable). It also advertises LOCAL_SLURM_CPUS CPUs (default 128),
# more than the machine has, so an iteration job and a teacher-service job fit side by side.
set -euo pipefail

ACTION=${1:-}
CPUS=${LOCAL_SLURM_CPUS:-128}
GPUS=${LOCAL_SLURM_GPUS:-8}
GPU_DEVICE_PREFIX=${LOCAL_SLURM_GPU_PREFIX:-/dev/lionfakegpu}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
SPOOL=/var/spool/lion-local-slurm
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

usage() {
    echo "usage: $0 up|down|status   (as root; see the comment at the top of this file)" >&2
    exit 2
}

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: $0 $ACTION must run as root (it installs packages, writes $CONF_DIR and starts daemons)" >&2
        exit 2
    fi
}

is_up() {
    # Up means: the controller answers and this node accepts work.
    local state
    state=$(timeout 10 sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n1) || return 1
    [[ $state == idle* || $state == mix* || $state == alloc* || $state == comp* ]]
}

install_packages() {
    local missing=()
    for binary in munged slurmctld slurmd sbatch; do
        command -v "$binary" >/dev/null 2>&1 || [[ -x /usr/sbin/$binary ]] || missing+=("$binary")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
}

make_gpu_devices() {
    for ((index = 0; index < GPUS; index++)); do
        # 1,3 are the null device's numbers: a device file slurmd can bind, with no hardware behind it.
        [[ -e ${GPU_DEVICE_PREFIX}${index} ]] || mknod "${GPU_DEVICE_PREFIX}${index}" c 1 3
    done
}

write_config() {
    local memory_mb
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    install -d "$CONF_DIR" "$SPOOL/ctld" "$SPOOL/d" "$LOG_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by lion-local's slurm/local-cluster.sh: a single-node cluster for tests.
ClusterName=lionlocal
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=16
GresTypes=gpu
NodeName=$NODE CPUs=$CPUS RealMemory=$memory_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$NODE Name=gpu File=${GPU_DEVICE_PREFIX}[0-$((GPUS - 1))]" >"$CONF_DIR/gres.conf"
    # No cgroup plugins are configured; an empty cgroup.conf keeps slurmd from probing for them.
    echo "# No cgroup plugins are configured (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none)." >"$CONF_DIR/cgroup.conf"
}

up() {
    need_root
    if is_up; then
        echo "local SLURM is already up (node $NODE)"
        return
    fi
    install_packages
    start_munge
    make_gpu_devices
    write_config
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    sleep 0.5
    /usr/sbin/slurmctld
    /usr/sbin/slurmd
    for _ in $(seq 1 60); do
        if is_up; then
            echo "local SLURM is up: node $NODE, $CPUS CPUs, $GPUS GPUs (${GPU_DEVICE_PREFIX}N), partition $PARTITION"
            return
        fi
        # A node that registered after a restart may still be marked down; bring it back.
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "error: SLURM did not come up within 60 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
    sinfo -N -l >&2 || true
    exit 1
}

down() {
    need_root
    scancel --full --user="$(id -un)" 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 30); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.5
    done
    echo "local SLURM is down"
}

status() {
    if is_up; then
        echo "local SLURM is up"
        sinfo -N -o "%N %t %c CPUs %G"
    else
        echo "local SLURM is down"
        exit 1
    fi
}

case $ACTION in
up) up ;;
down) down ;;
status) status ;;
*) usage ;;
esac
