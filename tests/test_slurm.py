"""The batch scripts on a real single-node SLURM (slurm/local-cluster.sh: munge, slurmctld, slurmd,
8 GPUs advertised through device files), with the production #SBATCH lines unchanged.

- test_chained_jobs_requeued_at_the_time_limit_run_one_iteration_each_and_a_job_on_a_complete_run_does_nothing:
  `slurm/submit.sh --iterations 2` submits two slurm/iteration.sh jobs, the second depending on
  the first (afterok). The first gets the time-limit signal (USR1 to the batch shell, as
  `--signal=B:USR1@300` sends it) in the middle of the reviews: it stops lion-local cleanly,
  requeues itself, comes back and completes iteration 1; the second then runs the next (the final
  imitation). The finished run holds every invariant of the loop, with no teacher call made twice,
  counted at a recording proxy in front of the teacher; then `sbatch --wait slurm/iteration.sh` on
  the complete run exits 0 without doing anything.
- test_teacher_service_job_serves_an_iteration_job: `slurm/serve.sh` as a job array of two vLLM
  replicas (CPU build) with no API key configured: each makes a key of its own and publishes it
  with its endpoint (0600 in a 0700 directory); a request without the key, or with the other
  replica's, gets 401; an iteration job whose config makes the teacher external finds both, spreads
  its requests over them and starts no teacher of its own; `doctor` reaches both too; the keys are
  in no other file the run or the jobs wrote and on no command line; cancelling the service
  withdraws the files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from loop_checks import (
    check_invariants, jsonl, run_config, set_keys, start_proxy, stop, teacher_deliveries,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local SLURM: brought up here unless it already runs (then left running)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root: run `sudo slurm/local-cluster.sh up` (make test does it as root)")
    status = subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "status"], capture_output=True, text=True)
    started_here = status.returncode != 0
    if started_here:
        up = subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "up"], capture_output=True, text=True)
        assert up.returncode == 0, up.stdout + up.stderr
    yield
    if started_here:
        subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "down"], capture_output=True, text=True)


def _job_environment(**extra: str) -> dict[str, str]:
    """What a user's shell passes to sbatch: lion-local's environment activated."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment.update(extra)
    return environment


def _sbatch(args: list[str], cwd: Path, **extra_env: str) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=_job_environment(**extra_env), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    assert shown.returncode == 0, f"job {job_id} is gone from slurmctld: {shown.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def _wait_for(job_id: str, states: tuple[str, ...], timeout_s: float = 400.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = _job(job_id)
        if job["JobState"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} after {timeout_s} s"
        time.sleep(1.0)


def _wait_for_idle_node(timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True).stdout.strip()
        if state.startswith("idle"):
            return
        assert time.monotonic() < deadline, f"the node is still {state!r}"
        time.sleep(0.5)


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


def _stages(*iterations: int) -> list[str]:
    return [f"{k}/{stage}" for k in iterations for stage in ("imitation", "discrimination", "generation")]


def _requeue_at_the_time_limit(job: str, run_dir: Path) -> None:
    """What --signal=B:USR1@300 does five minutes before the time limit, in the middle of the
    reviews: the job stops lion-local cleanly and requeues itself; it is then let start at once."""
    reviews = run_dir / "iter_1" / "reviews.jsonl"
    deadline = time.monotonic() + 300
    while not reviews.exists() or reviews.read_bytes().count(b"\n") < 20:
        assert _job(job)["JobState"] in ("PENDING", "RUNNING"), "the job ended before the reviews"
        assert time.monotonic() < deadline, "the reviews never started"
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    requeued = _wait_for(job, ("PENDING",) + FINISHED, timeout_s=120)
    assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", requeued
    assert "1/discrimination" not in _completed(run_dir)
    # SLURM holds a requeued job for about two minutes; let it start now, once the node has
    # finished the first run (slurmd refuses a credential issued in the second it revoked the last).
    _wait_for_idle_node()
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_chained_jobs_requeued_at_the_time_limit_run_one_iteration_each_and_a_job_on_a_complete_run_does_nothing(
    slurm_cluster, tiny_models: Path, teacher_url: str, tmp_path: Path
) -> None:
    # One iteration and the final imitation: the two iterations of a run that submit.sh chains.
    # A LoRA student, merged into full weights for serving (the adapter on vLLM: tests/test_vllm.py).
    # The teacher is the session's, behind a recording proxy that counts what reached it.
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = start_proxy(teacher_url, proxy_log)
    run_dir = tmp_path / "run"
    try:
        config = run_config(tiny_models, tmp_path, proxy_url)
        lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"], "serve": "merged"}
        data = set_keys(yaml.safe_load(config.read_text()),
                        {"iterations": 1, "seed_limit": 24, "generation.new_per_iteration": 8, "imitation.peft": lora})
        config.write_text(yaml.safe_dump(data))
        result = subprocess.run(
            ["bash", str(SLURM / "submit.sh"), str(config), "--iterations", "2"],
            cwd=tmp_path, env=_job_environment(), capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        jobs = result.stdout.split()
        assert len(jobs) == 2 and all(job.isdigit() for job in jobs), result.stdout
        assert f"afterok:{jobs[0]}" in _job(jobs[1])["Dependency"]

        _requeue_at_the_time_limit(jobs[0], run_dir)
        first = _wait_for(jobs[0], FINISHED)
        assert first["JobState"] == "COMPLETED" and first["ExitCode"] == "0:0", first
        second = _wait_for(jobs[1], FINISHED)
        assert second["JobState"] == "COMPLETED" and second["ExitCode"] == "0:0"
    finally:
        stop(proxy)
    assert second["StartTime"] >= first["EndTime"]  # ISO timestamps: string order is time order
    assert _completed(run_dir) == _stages(1) + ["final/imitation"]
    answered = check_invariants(run_dir, tiny_models)
    deliveries = teacher_deliveries(proxy_log, answered)
    assert set(deliveries) == {record["id"] for record in answered}
    assert {len(times) for times in deliveries.values()} == {1}, "an instruction reached the teacher twice"
    # Merged LoRA checkpoints: full weights served as usual, the adapter of the configured rank beside
    # them, and the final imitation continuing iteration 1's adapter.
    for name in ("iter_1", "final"):
        student = run_dir / name / "student"
        assert (student / "model.safetensors").is_file() and not (student / "adapter_config.json").exists()
        assert json.loads((student / "adapter" / "adapter_config.json").read_text())["r"] == 4
    job = json.loads((run_dir / "final" / "sft_job.json").read_text())
    assert job["adapter_init"] == str(run_dir / "iter_1" / "student" / "adapter")
    remaining = subprocess.run(
        [sys.executable, "-m", "lion_local", "status", "--config", str(config), "--remaining-iterations"],
        capture_output=True, text=True,
    )
    assert remaining.returncode == 0 and remaining.stdout.split() == []

    # A submission after the run is complete exits 0 and changes nothing.
    state_before = (run_dir / "state.json").read_bytes()
    server_logs_before = {path: path.stat().st_size for path in (run_dir / "logs").glob("server-*.log")}
    waited = subprocess.run(
        ["sbatch", "--wait", str(SLURM / "iteration.sh"), str(config)],
        cwd=tmp_path, env=_job_environment(), capture_output=True, text=True, timeout=600,
    )
    assert waited.returncode == 0, waited.stdout + waited.stderr
    third = re.search(r"Submitted batch job (\d+)", waited.stdout).group(1)
    assert (run_dir / "state.json").read_bytes() == state_before
    assert {path: path.stat().st_size for path in (run_dir / "logs").glob("server-*.log")} == server_logs_before

    logs = {job: (run_dir / "logs" / "slurm" / f"iteration-{job}.log").read_text() for job in (*jobs, third)}
    assert f"job {jobs[0]} (restart 0)" in logs[jobs[0]] and f"config {config}" in logs[jobs[0]]
    assert "GPUs 0,1,2,3,4,5,6,7" in logs[jobs[0]]  # the production --gpus-per-node=8, on device files
    # The first job stopped at the time-limit signal, requeued itself and came back for iteration 1.
    assert "time limit near: stopping lion-local" in logs[jobs[0]]
    assert "stopped cleanly (exit 143); requeueing job" in logs[jobs[0]]
    assert f"job {jobs[0]} (restart 1)" in logs[jobs[0]]
    # Each job ran one iteration: the first iteration 1 (its restart the stages left), the second the final imitation.
    restarted = logs[jobs[0]].split(f"job {jobs[0]} (restart 1)")[1]
    assert "iteration 1" in restarted and "completed 1/discrimination, 1/generation" in restarted
    assert "==== final/imitation" not in logs[jobs[0]]
    assert "iteration final" in logs[jobs[1]] and "==== final/imitation done" in logs[jobs[1]]
    assert "==== 1/" not in logs[jobs[1]]
    assert "iteration none (the run is complete)" in logs[third]
    assert "is complete: nothing to do" in logs[third]
    assert "server" not in logs[third].split("nothing to do")[0]
    # SLURM's own output file (the #SBATCH --output default) holds the same log.
    assert "is complete: nothing to do" in (tmp_path / f"slurm-lion-iteration-{third}.out").read_text()


def _service_config(tiny_models: Path, tmp_path: Path) -> Path:
    """configs/tiny-cpu.yaml, small, with no API key configured: the teacher on vLLM's CPU build, and
    the student, which the iteration job starts on loopback, on `transformers serve` (it starts sooner)."""
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    transformers = yaml.safe_load((ROOT / "configs/tiny-cpu-transformers.yaml").read_text())
    data.update(run_dir=str(tmp_path / "run"), seed_data=str(ROOT / "lion_local/data/smoke_seed.jsonl"),
                iterations=1, seed_limit=24)
    data["tiny_models"]["dir"] = str(tiny_models)
    data["imitation"]["final_imitation"] = False
    data["generation"]["new_per_iteration"] = 8
    data["servers"]["student"] = transformers["servers"]["student"]
    data["servers"]["teacher"]["vllm"]["launcher"][0] = str(ROOT / ".venv-vllm" / "bin" / "python")
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(tiny_models / name)
        assert "api_key_env" not in data["servers"][name]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _command_lines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes())
            except OSError:
                pass  # exited while we looked
    return lines


def _files_holding(root: Path, secret: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and secret in path.read_bytes()]


def test_teacher_service_job_serves_an_iteration_job(slurm_cluster, tiny_models: Path, tmp_path: Path) -> None:
    """Two vLLM replicas with no key configured: each makes its own, publishes it in a private file,
    and answers only requests that carry it; the iteration job and doctor find the keys there."""
    config = _service_config(tiny_models, tmp_path)
    run_dir = tmp_path / "run"
    endpoints = run_dir / "endpoints" / "teacher"
    # The service gets no GPU here: the iteration job takes the node's eight. One thread per
    # replica keeps two CPU servers from starving each other on a small machine.
    service = _sbatch(
        ["--array=0-1", "--gpus-per-node=0", str(SLURM / "serve.sh"), str(config), "teacher"],
        cwd=tmp_path, OMP_NUM_THREADS="1",
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(endpoints.glob("*.json"))) < 2:
            assert time.monotonic() < deadline, f"two endpoints not published: {list(endpoints.glob('*'))}"
            time.sleep(1.0)
        files = sorted(endpoints.glob("*.json"))
        published = [json.loads(path.read_text()) for path in files]
        assert {record["slurm_array_task_id"] for record in published} == {"0", "1"}
        assert len({record["base_url"] for record in published}) == 2
        keys = [record["api_key"] for record in published]
        assert all(isinstance(key, str) and len(key) >= 40 for key in keys) and keys[0] != keys[1]
        assert endpoints.stat().st_mode & 0o777 == 0o700
        assert {path.stat().st_mode & 0o777 for path in files} == {0o600}

        for record in published:
            url = record["base_url"] + "/chat/completions"
            body = {"model": record["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            assert httpx.post(url, json=body, timeout=30, trust_env=False).status_code == 401
            wrong = {"Authorization": f"Bearer {keys[0] if record['api_key'] == keys[1] else keys[1]}"}
            assert httpx.post(url, json=body, headers=wrong, timeout=30, trust_env=False).status_code == 401
            right = {"Authorization": f"Bearer {record['api_key']}"}
            assert httpx.post(url, json=body, headers=right, timeout=60, trust_env=False).status_code == 200

        result = subprocess.run(
            ["sbatch", "--wait", str(SLURM / "iteration.sh"), str(config), "--set", "servers.teacher.engine=external"],
            cwd=tmp_path, env=_job_environment(), capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        doctor = subprocess.run(
            [str(Path(sys.executable).parent / "lion-local"), "doctor", "--config", str(config),
             "--set", "servers.teacher.engine=external"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-3000:]
        assert re.search(r"^OK +server teacher +external at http://", doctor.stdout, re.M), doctor.stdout
        processes = _command_lines()
        holding = {key: _files_holding(tmp_path, key.encode()) for key in keys}
    finally:
        subprocess.run(["scancel", service], check=True)

    for key, path in zip(keys, files):
        assert holding[key] == [path], f"the key of {path.name} is in {holding[key]}"
        assert not [line for line in processes if key.encode() in line], "a key is on a command line"
        assert key not in result.stdout + result.stderr + doctor.stdout + doctor.stderr
    assert _completed(run_dir) == _stages(1)
    assert not (run_dir / "logs" / "server-teacher.log").exists(), "the iteration job started its own teacher"
    assert "teacher: 2 published endpoint(s)" in (run_dir / "logs" / "lion-local.log").read_text()
    replica_logs = sorted((run_dir / "logs").glob("serve-teacher-*.log"))
    assert len(replica_logs) == 2
    for replica_log in replica_logs:
        assert replica_log.read_text().count("POST /v1/chat/completions") >= 10, f"{replica_log} got few requests"
    assert len(jsonl(run_dir / "teacher_answers.jsonl")) == 24

    deadline = time.monotonic() + 90
    while list(endpoints.glob("*.json")):
        assert time.monotonic() < deadline, "the cancelled service left its endpoint files"
        time.sleep(0.5)
    for key in keys:  # withdrawn with its file: the key is in no file the run or the jobs wrote
        assert _files_holding(tmp_path, key.encode()) == []
