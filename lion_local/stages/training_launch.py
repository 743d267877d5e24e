"""The command line that runs student training (`lion_local.stages.sft`).

On one node with an accelerate file configured, lion-local runs `accelerate launch` with it
(FSDP or DeepSpeed over the node's GPUs, or DDP over gloo with several CPU processes); without
one, the training process runs directly (`python -m lion_local.stages.sft`): one process, whose
trainer finds the device itself, as under a one-process `accelerate launch`, without the
launcher's own start (about 2.6 CPU seconds). A file accelerate would not honour as written is
refused before anything starts (`check_launch_settings`). When the SLURM job spans
several nodes, training runs as one `srun` step with one task per node; each task runs
`accelerate launch` with its node's rank, and the processes meet through c10d rendezvous on the
job's first node, so no host file or ssh is needed.

accelerate's launch flags: https://huggingface.co/docs/accelerate/package_reference/cli#accelerate-launch
srun's flags: https://slurm.schedmd.com/srun.html
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lion_local.errors import LionError
from lion_local.config import Config, ConfigError, check_accelerate_config
from serving.commands import executable


class LaunchError(LionError):
    """Training cannot be launched as configured; the message says why and how to fix it."""


@dataclass(frozen=True)
class Allocation:
    """The nodes of the SLURM job lion-local runs in (one node outside SLURM)."""

    nodes: tuple[str, ...]
    cpus_per_task: int | None = None

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1


def current_allocation(environ: dict[str, str] | None = None) -> Allocation:
    """The allocation from SLURM's environment; node names expanded by `scontrol show hostnames`."""
    environ = dict(os.environ if environ is None else environ)
    count = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    if count <= 1:
        return Allocation(("localhost",), int(cpus) if cpus else None)
    node_list = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not node_list:
        raise LaunchError(f"SLURM_JOB_NUM_NODES={count} but SLURM_JOB_NODELIST is not set")
    try:
        expanded = subprocess.run(
            ["scontrol", "show", "hostnames", node_list], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={node_list!r} with scontrol: {exc}") from None
    return Allocation(tuple(expanded), int(cpus) if cpus else None)


def check_launch_settings(config: Config, on_gpu: bool | None = None) -> None:
    """Refuse (exit 2, before anything starts) an accelerate file that would not train as it says here.

    - distributed_type MULTI_CPU with several processes and no mpirun_hostfile: accelerate launch
      starts one process for it, so training would silently run in one;
    - distributed_type FSDP on the CPU (use_cpu: true, or torch sees no GPU): accelerate turns FSDP
      on for GPU-like devices only; on the CPU it trains with plain DDP over gloo, every process
      holding the whole model, so nothing would be sharded.
    """
    settings = check_accelerate_config(config) or {}
    key = f"imitation.accelerate_config: {config.imitation.accelerate_config}"
    kind = str(settings.get("distributed_type", "")).upper()
    processes = settings.get("num_processes")
    if kind == "MULTI_CPU" and isinstance(processes, int) and processes > 1 and not settings.get("mpirun_hostfile"):
        raise ConfigError(
            f"{key}: distributed_type MULTI_CPU with num_processes {processes} starts one process under accelerate "
            "launch unless mpirun starts them (mpirun_hostfile), so training would run in 1; to train with several "
            "processes on this machine's CPUs use configs/accelerate/cpu-ddp.yaml (MULTI_GPU with use_cpu: true)"
        )
    if kind != "FSDP":
        return
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if settings.get("use_cpu") is True or not on_gpu:
        import accelerate

        why = "use_cpu: true" if settings.get("use_cpu") is True else "torch sees no GPU on this machine"
        raise ConfigError(
            f"{key}: FSDP cannot train on the CPU ({why}): accelerate {accelerate.__version__} turns FSDP on for "
            "GPUs only and would train with plain DDP over gloo, each process holding the whole model; use "
            "configs/accelerate/cpu-ddp.yaml for several CPU processes, or train with this file on GPUs"
        )


def training_environment(config: Config) -> dict[str, str]:
    """Variables the training process gets on top of the offline ones: an accelerate file with
    use_cpu: true hides the GPUs, so that its processes train on the CPU as it says."""
    settings = check_accelerate_config(config) or {}
    return {"CUDA_VISIBLE_DEVICES": ""} if settings.get("use_cpu") is True else {}


def local_training_command(config: Config, job_file: Path) -> list[str]:
    """`accelerate launch` on this node with the configured accelerate file, or, without one, the
    training process itself (bf16 is then the trainer's setting, honoured on a GPU only: sft.py)."""
    if not config.imitation.accelerate_config:
        return [sys.executable, "-m", "lion_local.stages.sft", str(job_file)]
    return [executable("accelerate"), "launch", "--config_file", config.imitation.accelerate_config,
            "-m", "lion_local.stages.sft", str(job_file)]


def multi_node_command(config: Config, job_file: Path, allocation: Allocation, gpus_per_node: int) -> list[str]:
    """One srun task per node, each running `accelerate launch` with c10d rendezvous."""
    if gpus_per_node < 1:
        raise LaunchError(
            f"the job spans {len(allocation.nodes)} nodes but torch sees no GPU on {allocation.nodes[0]}; "
            "multi-node training needs GPUs (submit with --nodes=1 to train on one node)"
        )
    nodes = len(allocation.nodes)
    srun = [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        # One failed node ends the step at once instead of leaving the others waiting in a collective.
        "--kill-on-bad-exit=1",
    ]
    if allocation.cpus_per_task:
        # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05); without it each task gets one CPU.
        srun.append(f"--cpus-per-task={allocation.cpus_per_task}")
    # Each task learns its node's rank from SLURM_NODEID, which only exists inside the task.
    per_node = ["bash", "-c", 'exec "$0" launch --machine_rank "$SLURM_NODEID" "$@"', executable("accelerate")]
    launch = []
    if config.imitation.accelerate_config:
        launch += ["--config_file", config.imitation.accelerate_config]
    else:
        launch += ["--multi_gpu", "--mixed_precision", "bf16" if config.imitation.trainer.get("bf16") else "no"]
    launch += [
        "--num_machines",
        str(nodes),
        "--num_processes",
        str(nodes * gpus_per_node),
        "--main_process_ip",
        allocation.nodes[0],
        "--main_process_port",
        str(config.imitation.rendezvous_port),
        # c10d: ranks are agreed at rendezvous on the first node, so tasks may start in any order.
        "--rdzv_backend",
        "c10d",
        "--dynamo_backend",
        "no",
    ]
    return srun + per_node + launch + ["-m", "lion_local.stages.sft", str(job_file)]


def training_command(config: Config, job_file: Path) -> list[str]:
    """The command imitation runs: multi-node under a multi-node SLURM job, else single-node."""
    allocation = current_allocation()
    if not allocation.multi_node:
        return local_training_command(config, job_file)
    import torch

    return multi_node_command(config, job_file, allocation, torch.cuda.device_count())
