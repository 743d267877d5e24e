"""Student training with two processes on the CPU, for real, through the imitation stage's own
launch path: `lion-local stage imitation` runs `accelerate launch --config_file <file>`, which
starts two `lion_local.stages.sft` processes (torchrun) that train the tiny student together
over gloo.

The module's run (`ddp_runs`): 12 teacher answers (the session's real teacher server), the
accelerate file configs/accelerate/cpu-ddp.yaml (2 processes, use_cpu), per-device batch 2 and
imitation.effective_batch_size 8, so the accumulation must be 8 / (2 x 2) = 2. The first
`stage imitation` is killed with SIGKILL as soon as a complete trainer checkpoint exists, and the
same command is run again; a second run directory trains the same config uninterrupted, as the
reference. Every file the processes of a run open for writing, rename into place, or save with
torch.save or safetensors under its run directory is recorded with the writer's pid and RANK by an
audit hook (sys.addaudithook, plus a record before each of those two save functions), loaded as
`sitecustomize` through PYTHONPATH into every Python process the stage starts; it observes and
changes nothing. (Files the tokenizers library writes in Rust, tokenizer.json, go unseen.)

- test_two_processes_train_with_the_effective_batch: both launches ran 2 processes (two
  sft processes below accelerate, each with CUDA_VISIBLE_DEVICES="" from use_cpu), which logged
  "process 0 of 2" and "process 1 of 2", MULTI_CPU over gloo, accumulation 2 = 8 / (2 x 2);
  sft_result.json says world 2, accumulation 2, effective batch 8, gloo; the trainer's own
  arguments saved with the checkpoint say accumulation 2; and the trainer made 2 optimizer steps
  per epoch over the 12 examples, as 2 processes x 2 x 2 make, where a trainer that took the
  world for 1 process (accumulation 4) makes 1.
- test_one_process_writes_the_checkpoint: in every launch, the finished checkpoint, the trainer
  checkpoints and the result files were written by rank 0 alone; rank 1 wrote its own
  rng_state_1.pth in each trainer checkpoint and nothing else. The student holds exactly the
  files of one checkpoint (no per-rank copies), and its weights load whole.
- test_the_checkpoint_loads_and_serves: transformers loads iter_1/student and it generates;
  `lion-local serve student` serves it (`transformers serve`, a real process) and it answers a
  completion in the student's prompt format.
- test_a_killed_two_process_training_resumes: the kill came after a complete trainer checkpoint
  and before the end of training; the stage process, accelerate and both trainer processes were
  gone within 20 s of it; the re-run resumed (both processes logged the checkpoint they resumed
  from, sft_result.json "resumed": true) and made all the steps; its weights equal the
  uninterrupted reference's.
- test_fsdp_on_the_cpu_is_refused_in_one_line: FSDP cannot run on the CPU through this path:
  accelerate (1.16) turns FSDP on for GPUs only, and in processes that see no GPU trains with
  plain DDP; the test shows that by launching an FSDP file with accelerate itself (both processes
  report MULTI_CPU and a DistributedDataParallel model; should a later accelerate shard on the
  CPU, this fails and says to lift the refusal). `stage imitation` with a two-process CPU FSDP
  file is refused before anything is written: exit 2, one line naming imitation.accelerate_config,
  the reason and the fix; so is configs/accelerate/fsdp.yaml on a machine without a GPU, and a
  MULTI_CPU file with 2 processes, which accelerate launch would run as one process (shown the
  same way).

No assertion on wall time; timeouts only guard against hangs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from safetensors.torch import load_file

from loop_checks import alive, descendants, jsonl, lion_local, process_environment, run_config, stop, wait_healthy
from lion_local.roles.student import student_prompt
from serving.process import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "configs/accelerate/cpu-ddp.yaml"
SEEDS = 12
PER_DEVICE = 2
WORLD = 2
EFFECTIVE = 8
ACCUMULATION = EFFECTIVE // (PER_DEVICE * WORLD)
# Enough optimizer steps (2 per epoch) that a kill after the first checkpoint lands before the end.
EPOCHS = 20
SAVE_STEPS = 4
HANG_GUARD_S = 600
CHECKPOINTS = "iter_1/sft_checkpoints/"
CHECKPOINT_FILES = {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pth",
                    "trainer_state.json", "training_args.bin"}
STUDENT_FILES = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training_args.bin"}
SFT_WORKER = "-m lion_local.stages.sft"

# Loaded as sitecustomize by every Python process the stage starts: records each file opened for
# writing, or renamed into place, under LION_TEST_AUDIT_ROOT, with the writer's pid and RANK. Python's
# audit events see the files Python opens; torch.save and safetensors open theirs in C++ and Rust,
# so those two functions are recorded as they are called (then called unchanged).
AUDIT_HOOK = '''
import functools
import importlib.machinery
import json
import os
import sys

_root = os.environ.get("LION_TEST_AUDIT_ROOT")
_SAVES = {"torch.serialization": "save", "safetensors.torch": "save_file"}
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record(kind, path):
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(_root + os.sep):
        line = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "kind": kind, "path": path}
        os.write(_fd, (json.dumps(line) + "\\n").encode())


def _hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITING):
            _record("open", args[0])
    elif event == "os.rename":
        _record("rename", args[1])


def _recorded(save, path_at):
    @functools.wraps(save)
    def wrapper(*args, **kwargs):
        path = args[path_at] if len(args) > path_at else kwargs.get("f", kwargs.get("filename"))
        if isinstance(path, (str, os.PathLike)):
            _record(save.__name__, path)
        return save(*args, **kwargs)
    return wrapper


class _Saves:
    def find_spec(self, name, path=None, target=None):
        if name not in _SAVES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            attribute = _SAVES[name]
            setattr(module, attribute, _recorded(getattr(module, attribute), 1))

        spec.loader.exec_module = exec_module
        return spec


if _root:
    _fd = os.open(os.path.join(os.environ["LION_TEST_AUDIT_DIR"], "writes-%d.jsonl" % os.getpid()),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.addaudithook(_hook)
    sys.meta_path.insert(0, _Saves())
'''


@dataclass(frozen=True)
class Launch:
    """One `stage imitation` command of a run: its audited writes and its section of sft.log."""

    writes: list[dict]
    log: str


@dataclass(frozen=True)
class DdpRuns:
    run_dir: Path  # killed once, then resumed
    reference: Path  # the same config, uninterrupted
    killed: Launch
    resumed: Launch
    uninterrupted: Launch
    kill_step: int  # the newest complete trainer checkpoint at the kill
    max_steps: int
    at_kill: dict[int, str]  # the processes below the stage at the kill
    worker_environments: list[dict[str, str] | None]
    left_after_kill: dict[int, str]


def training_config(tiny_models: Path, directory: Path, teacher_url: str, accelerate_file: Path) -> Path:
    """One iteration on SEEDS seeds, no final imitation, two-process training with `accelerate_file`."""
    path = run_config(tiny_models, directory, teacher_url, greedy=True)
    data = yaml.safe_load(path.read_text())
    data.update(iterations=1, seed_limit=SEEDS)
    imitation = data["imitation"]
    imitation.update(final_imitation=False, effective_batch_size=EFFECTIVE, accelerate_config=str(accelerate_file))
    imitation["trainer"].update(
        per_device_train_batch_size=PER_DEVICE, max_length=64, num_train_epochs=float(EPOCHS), save_steps=SAVE_STEPS
    )
    path.write_text(yaml.safe_dump(data))
    return path


def audited_environment(directory: Path, run_dir: Path, launch: str) -> tuple[dict[str, str], Path]:
    """The environment for a stage command whose processes record their writes under `run_dir`."""
    hook_dir, audit_dir = directory / "audit-hook", directory / f"audit-{launch}"
    hook_dir.mkdir(exist_ok=True)
    audit_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    path = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, "LION_TEST_AUDIT_ROOT": str(run_dir),
                   "LION_TEST_AUDIT_DIR": str(audit_dir)}
    return environment, audit_dir


def audited_writes(audit_dir: Path) -> list[dict]:
    return [record for path in sorted(audit_dir.glob("writes-*.jsonl")) for record in jsonl(path)]


def log_sections(run_dir: Path) -> list[str]:
    """sft.log split into one section per launch (each starts with the command lion-local ran)."""
    text = (run_dir / "iter_1/logs/sft.log").read_text(errors="replace")
    return ["==== " + section for section in text.split("\n==== ")[1:]]


def complete_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest trainer checkpoint whose trainer_state.json is written (0: none yet)."""
    steps = [0]
    for state in (run_dir / "iter_1/sft_checkpoints").glob("checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        steps.append(int(state.parent.name.split("-")[1]))
    return max(steps)


def _stage(config: Path, environment: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as output:
        return subprocess.run(lion_local("stage", "imitation", "--config", str(config)), stdout=output,
                              stderr=subprocess.STDOUT, env=environment, timeout=HANG_GUARD_S)


def kill_after_first_checkpoint(config: Path, run_dir: Path, environment: dict[str, str], log: Path) -> dict:
    """Start `stage imitation`, SIGKILL it once a complete trainer checkpoint exists; what was seen."""
    with open(log, "w") as output:
        process = subprocess.Popen(lion_local("stage", "imitation", "--config", str(config)), stdout=output,
                                   stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while complete_checkpoint_step(run_dir) == 0:
            assert process.poll() is None, f"the stage ended (code {process.returncode}) before a checkpoint: {log}"
            assert time.monotonic() < deadline, "no trainer checkpoint in time"
            time.sleep(0.01)
        at_kill = descendants(process.pid)
        workers = [pid for pid, command in at_kill.items() if SFT_WORKER in command and "accelerate" not in command]
        environments = [process_environment(pid) for pid in workers]
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        stop(process)
    step = complete_checkpoint_step(run_dir)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in at_kill) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"at_kill": at_kill, "kill_step": step, "left_after_kill": {p: c for p, c in at_kill.items() if alive(p)},
            "worker_environments": environments}


@pytest.fixture(scope="module")
def ddp_runs(tiny_models: Path, teacher_url: str, tmp_path_factory) -> DdpRuns:
    base = tmp_path_factory.mktemp("multiprocess")
    killed_dir, reference_dir = base / "killed", base / "reference"
    killed_dir.mkdir()
    reference_dir.mkdir()
    config = training_config(tiny_models, killed_dir, teacher_url, CPU_DDP)
    run_dir = killed_dir / "run"

    environment, killed_audit = audited_environment(killed_dir, run_dir, "killed")
    seen = kill_after_first_checkpoint(config, run_dir, environment, killed_dir / "killed.log")
    assert not (run_dir / "iter_1/student").exists() and not (run_dir / "iter_1/sft_result.json").exists(), (
        "the kill came after the training ended: raise EPOCHS"
    )

    environment, resumed_audit = audited_environment(killed_dir, run_dir, "resumed")
    result = _stage(config, environment, killed_dir / "resumed.log")
    assert result.returncode == 0, (killed_dir / "resumed.log").read_text()[-3000:]

    reference_config = training_config(tiny_models, reference_dir, teacher_url, CPU_DDP)
    environment, reference_audit = audited_environment(reference_dir, reference_dir / "run", "uninterrupted")
    result = _stage(reference_config, environment, reference_dir / "uninterrupted.log")
    assert result.returncode == 0, (reference_dir / "uninterrupted.log").read_text()[-3000:]

    killed_log, resumed_log = log_sections(run_dir)
    [uninterrupted_log] = log_sections(reference_dir / "run")
    steps_per_epoch = math.ceil(math.ceil(SEEDS / (PER_DEVICE * WORLD)) / ACCUMULATION)
    return DdpRuns(
        run_dir=run_dir,
        reference=reference_dir / "run",
        killed=Launch(audited_writes(killed_audit), killed_log),
        resumed=Launch(audited_writes(resumed_audit), resumed_log),
        uninterrupted=Launch(audited_writes(reference_audit), uninterrupted_log),
        max_steps=EPOCHS * steps_per_epoch,
        **seen,
    )


def _launches(runs: DdpRuns) -> dict[str, Launch]:
    return {"killed": runs.killed, "resumed": runs.resumed, "uninterrupted": runs.uninterrupted}


def test_two_processes_train_with_the_effective_batch(ddp_runs: DdpRuns) -> None:
    # At the kill: accelerate and two trainer processes, each told by use_cpu to see no GPU.
    assert len(ddp_runs.worker_environments) == WORLD, ddp_runs.at_kill
    for environment in ddp_runs.worker_environments:
        assert environment is not None and environment["CUDA_VISIBLE_DEVICES"] == ""
        assert environment["WORLD_SIZE"] == str(WORLD)
    assert sorted(env["RANK"] for env in ddp_runs.worker_environments) == ["0", "1"]

    for name, launch in _launches(ddp_runs).items():
        assert f"--config_file {CPU_DDP} -m lion_local.stages.sft" in launch.log.splitlines()[0], name
        for rank in range(WORLD):
            line = (f"process {rank} of {WORLD}: MULTI_CPU over gloo on cpu:0; per-device batch {PER_DEVICE} x {WORLD} "
                    f"processes x gradient accumulation {ACCUMULATION} = {EFFECTIVE}")
            assert launch.log.count(line) == 1, (name, line, launch.log[-3000:])

    result = json.loads((ddp_runs.run_dir / "iter_1/sft_result.json").read_text())
    assert {key: result[key] for key in ("world_size", "gradient_accumulation_steps", "effective_batch_size",
                                         "distributed_type", "backend", "device", "examples")} == {
        "world_size": WORLD, "gradient_accumulation_steps": ACCUMULATION, "effective_batch_size": EFFECTIVE,
        "distributed_type": "MULTI_CPU", "backend": "gloo", "device": "cpu", "examples": SEEDS,
    }
    assert json.loads((ddp_runs.run_dir / "iter_1/imitation.json").read_text())["training"]["world_size"] == WORLD

    # The trainer's own record: the arguments it trained with, and the optimizer steps it made
    # (2 per epoch from 2 processes x 2 x 2; a trainer sized for 1 process would make 1).
    import torch

    for run_dir in (ddp_runs.run_dir, ddp_runs.reference):
        args = torch.load(run_dir / "iter_1/student/training_args.bin", weights_only=False)
        assert (args.gradient_accumulation_steps, args.per_device_train_batch_size) == (ACCUMULATION, PER_DEVICE)
        assert json.loads((run_dir / "iter_1/sft_result.json").read_text())["steps"] == ddp_runs.max_steps


def _relative(record: dict, run_dir: Path) -> str:
    return Path(record["path"]).relative_to(run_dir).as_posix()


def test_one_process_writes_the_checkpoint(ddp_runs: DdpRuns, tiny_models: Path) -> None:
    base = load_file(tiny_models / "student/model.safetensors")
    for name, launch in _launches(ddp_runs).items():
        run_dir = ddp_runs.reference if name == "uninterrupted" else ddp_runs.run_dir
        by_rank: dict[str | None, set[str]] = {}
        for record in launch.writes:
            by_rank.setdefault(record["rank"], set()).add(_relative(record, run_dir))
        assert set(by_rank) <= {None, "0", "1"}, by_rank.keys()  # None: lion-local itself, not a trainer
        rank0, rank1 = by_rank.get("0", set()), by_rank.get("1", set())
        assert not rank0 & rank1, (name, sorted(rank0 & rank1))

        # Trainer checkpoints: rank 0 wrote the weights, optimizer and state of each one; rank 1 its
        # own RNG state in each, and nothing else anywhere.
        saved = {path.split("/")[2] for path in rank0 if path.startswith(CHECKPOINTS) and path.endswith("/trainer_state.json")}
        assert saved, (name, sorted(rank0))
        for checkpoint in saved:
            written = {Path(path).name for path in rank0 if path.startswith(f"{CHECKPOINTS}{checkpoint}/")}
            assert CHECKPOINT_FILES <= written, (name, checkpoint, sorted(written))
        rng = {path.split("/")[2] for path in rank1}
        assert rank1 == {f"{CHECKPOINTS}{checkpoint}/rng_state_1.pth" for checkpoint in rng}, (name, sorted(rank1))
        if name != "killed":  # (the kill may cut rank 1 off before the RNG state of the last one)
            assert saved <= rng, (name, sorted(saved - rng))

        # Only rank 0 wrote the result files and the finished checkpoint (none before the kill).
        results = {"iter_1/sft_progress.json"} | ({"iter_1/sft_result.json"} if name != "killed" else set())
        assert results <= rank0, (name, sorted(rank0))
        assert not any(path.startswith("iter_1/student/") for path in rank0 | rank1)
        partial = {path for path in rank0 if path.startswith("iter_1/student.partial/")}
        if name == "killed":
            assert not partial
        else:
            # (tokenizer.json is written by the tokenizers library in Rust, unseen by the hook)
            assert STUDENT_FILES - {"tokenizer.json"} <= {Path(path).name for path in partial}, (name, sorted(partial))

    for run_dir in (ddp_runs.run_dir, ddp_runs.reference):
        student = run_dir / "iter_1/student"
        assert {path.name for path in student.iterdir()} == STUDENT_FILES  # one checkpoint, no per-rank copies
        assert not (run_dir / "iter_1/student.partial").exists() and not (run_dir / "iter_1/sft_checkpoints").exists()
        trained = load_file(student / "model.safetensors")  # whole: every tensor of the base, none torn
        assert trained.keys() == base.keys() and all(bool(tensor.isfinite().all()) for tensor in trained.values())


def test_the_checkpoint_loads_and_serves(ddp_runs: DdpRuns, tiny_models: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = ddp_runs.run_dir / "iter_1/student"
    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    base = load_file(tiny_models / "student/model.safetensors")
    loaded = model.state_dict()
    assert set(base) <= set(loaded)
    assert any(not base[name].equal(loaded[name]) for name in base), "training changed nothing"
    prompt = tokenizer(student_prompt("Name a colour."), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]

    # Served by a real `transformers serve`, started the way lion-local starts the student's server.
    data = yaml.safe_load((ddp_runs.run_dir / "config.yaml").read_text())
    port = free_port()
    data["run_dir"] = str(tmp_path / "serve-run")
    data["servers"]["student"].update(model=str(student), port=port)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(lion_local("serve", "student", "--config", str(config)), stdout=log, stderr=log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": str(student), "prompt": student_prompt("Name a colour."), "max_tokens": 8, "temperature": 0.0},
            timeout=120,
        )
    finally:
        stop(server)
    assert reply.status_code == 200, reply.text[:2000]
    [choice] = reply.json()["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")


def test_a_killed_two_process_training_resumes(ddp_runs: DdpRuns) -> None:
    assert 0 < ddp_runs.kill_step < ddp_runs.max_steps
    # The stage, accelerate and both trainer processes died with the stage.
    assert any("accelerate" in command and "launch" in command for command in ddp_runs.at_kill.values())
    assert not ddp_runs.left_after_kill, f"still running 20 s after the kill: {ddp_runs.left_after_kill}"

    checkpoint = ddp_runs.run_dir / "iter_1/sft_checkpoints"
    resumed_from = [line for line in ddp_runs.resumed.log.splitlines() if "resuming training from" in line]
    assert len(resumed_from) == WORLD, ddp_runs.resumed.log[-3000:]
    steps = {int(line.rsplit("checkpoint-", 1)[1]) for line in resumed_from}
    assert len(steps) == 1 and all(f"resuming training from {checkpoint}/checkpoint-" in line for line in resumed_from)
    assert steps.pop() >= ddp_runs.kill_step
    result = json.loads((ddp_runs.run_dir / "iter_1/sft_result.json").read_text())
    assert result["resumed"] is True and result["steps"] == ddp_runs.max_steps
    assert not any("resuming training" in launch.log for launch in (ddp_runs.killed, ddp_runs.uninterrupted))

    ours = load_file(ddp_runs.run_dir / "iter_1/student/model.safetensors")
    theirs = load_file(ddp_runs.reference / "iter_1/student/model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[name].equal(theirs[name]) for name in ours), "the resumed training gave other weights"


# ----------------------------------------------------------------------------------------------
# FSDP (and MULTI_CPU) on the CPU: refused, and why
# ----------------------------------------------------------------------------------------------

CPU_FSDP = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "use_cpu": True, "mixed_precision": "no",
    "num_machines": 1, "num_processes": WORLD, "machine_rank": 0, "main_process_port": 0,
    "fsdp_config": {
        "fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_offload_params": False, "fsdp_use_orig_params": True,
        # accelerate refuses sync_module_states (and the RAM-efficient loading that needs it) on a CPU outright.
        "fsdp_cpu_ram_efficient_loading": False, "fsdp_sync_module_states": False,
    },
}
CPU_MULTI_CPU = {key: value for key, value in CPU_FSDP.items() if key != "fsdp_config"} | {"distributed_type": "MULTI_CPU"}

# What accelerate makes of a launch: one file per process it started (the processes share one
# stdout, where their lines can interleave).
PROBE = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
model = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)))
fields = [accelerator.process_index, accelerator.num_processes, accelerator.distributed_type.value, type(model).__name__]
Path(sys.argv[1], f"rank-{accelerator.process_index}").write_text(" ".join(map(str, fields)))
"""


def _probe(accelerate_file: Path, tmp_path: Path) -> list[list[str]]:
    script, ranks = tmp_path / "probe.py", tmp_path / f"probe-{accelerate_file.stem}"
    script.write_text(PROBE)
    ranks.mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--config_file", str(accelerate_file), str(script), str(ranks)],
                            capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(path.read_text().split() for path in ranks.iterdir())


def _refusal(config: Path) -> list[str]:
    result = subprocess.run(lion_local("stage", "imitation", "--config", str(config)), capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_fsdp_on_the_cpu_is_refused_in_one_line(tiny_models: Path, teacher_url: str, tmp_path: Path) -> None:
    import accelerate
    import torch

    fsdp_file, multi_cpu_file = tmp_path / "cpu-fsdp.yaml", tmp_path / "cpu-multi-cpu.yaml"
    fsdp_file.write_text(yaml.safe_dump(CPU_FSDP))
    multi_cpu_file.write_text(yaml.safe_dump(CPU_MULTI_CPU))

    # Why: accelerate starts both processes but shards nothing; each holds the whole model under DDP.
    assert _probe(fsdp_file, tmp_path) == [[str(rank), str(WORLD), "MULTI_CPU", "DistributedDataParallel"]
                                           for rank in range(WORLD)], (
        f"accelerate {accelerate.__version__} now runs FSDP on the CPU: lift the refusal in "
        "lion_local/stages/training_launch.py (check_launch_settings) and train with FSDP in this test"
    )
    # And MULTI_CPU with 2 processes: accelerate launch starts one.
    assert _probe(multi_cpu_file, tmp_path) == [["0", "1", "NO", "Sequential"]]

    directory = tmp_path / "fsdp"
    directory.mkdir()
    config = training_config(tiny_models, directory, teacher_url, fsdp_file)
    assert _refusal(config) == [
        f"error: imitation.accelerate_config: {fsdp_file}: FSDP cannot train on the CPU (use_cpu: true): accelerate "
        f"{accelerate.__version__} turns FSDP on for GPUs only and would train with plain DDP over gloo, each process "
        "holding the whole model; use configs/accelerate/cpu-ddp.yaml for several CPU processes, or train with this "
        "file on GPUs"
    ]
    assert not (directory / "run").exists(), "the refused stage wrote into the run directory"

    if not torch.cuda.is_available():  # the GPU file, on a machine without a GPU
        gpu_file = ROOT / "configs/accelerate/fsdp.yaml"
        data = yaml.safe_load(config.read_text())
        data["imitation"]["accelerate_config"] = str(gpu_file)
        config.write_text(yaml.safe_dump(data))
        [line] = _refusal(config)
        assert line.startswith(f"error: imitation.accelerate_config: {gpu_file}: FSDP cannot train on the CPU "
                               "(torch sees no GPU on this machine): ")

    data = yaml.safe_load(config.read_text())
    data["imitation"]["accelerate_config"] = str(multi_cpu_file)
    config.write_text(yaml.safe_dump(data))
    assert _refusal(config) == [
        f"error: imitation.accelerate_config: {multi_cpu_file}: distributed_type MULTI_CPU with num_processes 2 starts "
        "one process under accelerate launch unless mpirun starts them (mpirun_hostfile), so training would run in 1; "
        "to train with several processes on this machine's CPUs use configs/accelerate/cpu-ddp.yaml (MULTI_GPU with "
        "use_cpu: true)"
    ]
    assert not (directory / "run").exists()
