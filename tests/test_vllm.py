"""lion-local on vLLM for real: vLLM's CPU build (.venv-vllm/, made by `make install`) serves the
tiny teacher and student of configs/tiny-cpu.yaml.

- Every flag lion-local passes to vLLM is parsed by the installed vLLM's own argument parser
  (tests/vllm_arg_check.py), so a flag that vLLM renames or removes fails here.
- One shared run (the `vllm_run` fixture), with an API key on both servers and the referee in mode
  scores_only (the reply constrained to the two scores by vLLM's structured outputs):
  `lion-local run` (one iteration) runs with the loopback as its only network interface (as
  root), is SIGKILLed in the middle of the discrimination while both servers are up, and is run
  again to completion. The tests then check: the loop's invariants; the student checkpoints TRL wrote loaded and answered in vLLM; the engine and its
  version in report.json and report.md; the key required by the servers (401 without it) and
  found in no command line, log or run file; no vLLM process and no shared memory left after
  the kill and after the end. (`doctor` on vLLM with a key on both servers: tests/test_real_model.py.)
- A flag vLLM does not know ends a run in one line naming the config key and the server's log.
- SIGKILL of lion-local while vLLM is still loading (when vLLM's API server ignores SIGTERM)
  leaves no vLLM process: the supervisor takes the tree down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lion_local.config import load_config
from loop_checks import check_invariants, descendants, jsonl, lion_local, process_environment
from serving.commands import vllm_command

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SECRET = "sk-lion-vllm-test-5c1d2e"
OFFLINE = os.geteuid() == 0
WRAPPER = [sys.executable, str(ROOT / "tests/loopback_only.py")] if OFFLINE else []
SERVER_MARKS = ("vllm.entrypoints", "VLLM::")
LORA_RANK = 4

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm/ (vLLM's CPU build): `make install` creates it on CPU machines"
)]


def _parsed_by_vllm(argvs: list[list[str]]) -> list[dict]:
    result = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests/vllm_arg_check.py")],
        input=json.dumps(argvs), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_flag_lion_local_passes_is_accepted_by_the_installed_vllm(tmp_path):
    argvs, names = [], []
    # A LoRA student checkpoint (imitation.peft.serve: adapter) is served with --enable-lora.
    adapter = tmp_path / "student"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "/models/student"}))
    student = load_config(ROOT / "configs/tiny-cpu.yaml").servers["student"]
    lora = vllm_command(student, student.host, 8000, model=str(adapter))
    assert lora[lora.index("--model") + 1] == "/models/student" and "student=" + str(adapter) in lora
    argvs.append(lora[len(student.vllm.launcher):])
    names.append("a LoRA adapter")
    for path, overrides in [
        ("configs/tiny-cpu.yaml", []),
        ("configs/lion-7b.yaml", ["servers.teacher.vllm.enforce_eager=true", "servers.teacher.vllm.max_model_len=4096"]),
        ("configs/lion-7b.yaml", ["servers.teacher.vllm.max_model_len=null", "servers.teacher.host=0.0.0.0"]),
    ]:
        config = load_config(ROOT / path, overrides)
        for name, server in config.servers.items():
            if server.engine == "vllm":
                command = vllm_command(server, server.host, 8000, model=server.model)
                argvs.append(command[len(server.vllm.launcher):])
                names.append(f"{path} {name}")
    rejected = load_config(ROOT / "configs/tiny-cpu.yaml", ["servers.teacher.vllm.extra_args=[--no-such-flag]"])
    server = rejected.servers["teacher"]
    argvs.append(vllm_command(server, server.host, 8000)[len(server.vllm.launcher):])

    *accepted, control = _parsed_by_vllm(argvs)
    assert len(accepted) >= 6
    for name, outcome in zip(names, accepted):
        assert outcome["ok"], f"{name}: {outcome['error']}"
    assert not control["ok"] and "--no-such-flag" in control["error"]  # the check can fail


# ----------------------------------------------------------------------------------------------
# The shared vLLM run
# ----------------------------------------------------------------------------------------------


def _vllm_processes(pid: int) -> dict[int, str]:
    """The vLLM processes below `pid` (this test's own: other tests may run vLLM beside it)."""
    return {child: command for child, command in descendants(pid).items() if any(mark in command for mark in SERVER_MARKS)}


def _running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still running (a pid taken by another command since does not count)."""
    running = {}
    for pid, command in processes.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone
        if stat[stat.rindex(")") + 2] != "Z" and now == command:
            running[pid] = command
    return running


def _wait_until_gone(processes: dict[int, str], timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := _running(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _shm_mapped() -> set[str]:
    """Names under /dev/shm that some live process maps."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split("/dev/shm/", 1)[1].split()[0] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


def _shm_leaked(before: set[str]) -> set[str]:
    """Shared-memory segments made since `before` that no live process maps: left behind. POSIX
    semaphores (sem.*) are left out: any Python multiprocessing user makes them, including the
    processes of other tests running beside this one."""
    return {name for name in set(os.listdir("/dev/shm")) - before - _shm_mapped() if not name.startswith("sem.")}


def _status_without_key(pid: int, url: str) -> int:
    """HTTP status of an unauthenticated request to `url`, sent from the network namespace of `pid`."""
    script = (
        "import ctypes, os, sys, httpx\n"
        f"fd = os.open('/proc/{pid}/ns/net', os.O_RDONLY)\n"
        "assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0\n" if OFFLINE else "import httpx, sys\n"
    ) + f"print(httpx.get({url!r}, timeout=10, trust_env=False).status_code)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip())


class Sampler(threading.Thread):
    """Reads the process tree under a pid every 0.2 s: command lines, environments, servers up."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.commands: set[str] = set()
        self.processes: dict[int, str] = {}  # every process seen below pid
        self.environments: list[dict[str, str]] = []
        self.most_servers_at_once = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            tree = descendants(self.pid)
            self.commands.update(tree.values())
            self.processes.update(tree)
            supervisors = [pid for pid, command in tree.items() if "serving/supervisor.py" in command]
            self.most_servers_at_once = max(self.most_servers_at_once, len(supervisors))
            for pid in supervisors:
                environment = process_environment(pid)
                if environment:
                    self.environments.append(environment)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def vllm_run(tiny_models: Path, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("vllm-run")
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(directory / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    # One iteration, no final imitation: the kill, the resume and every stage, in the suite's time.
    data["iterations"] = 1
    data["imitation"]["final_imitation"] = False
    data["roles"]["referee"]["mode"] = "scores_only"
    # A LoRA student served as an adapter on its base model (--enable-lora); merged: tests/test_slurm.py.
    data["imitation"]["peft"] = {"rank": LORA_RANK, "target_modules": ["q_proj", "v_proj"], "serve": "adapter"}
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(tiny_models / name)
        data["servers"][name]["vllm"]["launcher"][0] = str(VLLM_PYTHON)
        data["servers"][name]["api_key_env"] = "LION_TEST_VLLM_KEY"
    config = directory / "tiny-cpu.yaml"
    config.write_text(yaml.safe_dump(data))
    environment = {**os.environ, "LION_TEST_VLLM_KEY": SECRET}
    shm_before = set(os.listdir("/dev/shm"))
    outcome: dict = {"config": config, "run_dir": directory / "run", "shm_before": shm_before}

    reviews = directory / "run/iter_1/reviews.jsonl"
    first = subprocess.Popen([*WRAPPER, *lion_local("run", "--config", str(config))], env=environment, cwd=directory,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(first.pid)
    sampler.start()
    deadline = time.monotonic() + 400
    servers_log = directory / "run/servers.jsonl"
    while first.poll() is None and time.monotonic() < deadline:
        # The referee's server is the teacher's, up from the imitation on (it stays up while the student
        # trains). It is asked without the key then, because scores_only reviews come too fast to leave
        # time for a request between the kill point and the kill.
        started = [r for r in jsonl(servers_log) if r["server"] == "teacher"] if servers_log.exists() else []
        if started and "status_without_key" not in outcome:
            outcome["status_without_key"] = _status_without_key(first.pid, started[-1]["base_url"] + "/models")
        if reviews.exists() and len(reviews.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert first.poll() is None, f"the run ended before the kill point: {first.stdout.read()[-3000:]}"
    outcome["servers_at_kill"] = sampler.most_servers_at_once
    sampler.processes.update(descendants(first.pid))
    first.send_signal(signal.SIGKILL)
    first.wait()
    outcome["reviews_at_kill"] = len(reviews.read_text().splitlines())
    outcome["first_output"] = first.stdout.read()
    outcome["left_after_kill"] = _wait_until_gone(sampler.processes, 60)
    outcome["shm_after_kill"] = _shm_leaked(shm_before)
    sampler.done.set()

    second = subprocess.Popen([*WRAPPER, *lion_local("run", "--config", str(config))], env=environment, cwd=directory,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    resumed = Sampler(second.pid)
    resumed.start()
    outcome["second_output"] = second.communicate(timeout=900)[0]
    outcome["second_code"] = second.returncode
    resumed.done.set()
    outcome["left_at_end"] = _wait_until_gone(resumed.processes, 30)
    outcome["shm_at_end"] = _shm_leaked(shm_before)
    outcome["commands"] = sampler.commands | resumed.commands
    outcome["server_environments"] = sampler.environments + resumed.environments
    outcome["report"] = subprocess.run(lion_local("report", "--config", str(config)), capture_output=True,
                                       text=True, env=environment, cwd=directory, timeout=300)
    return outcome


def test_run_killed_in_discrimination_resumes_to_a_complete_run_on_vllm(vllm_run: dict, tiny_models: Path):
    assert vllm_run["servers_at_kill"] == 2  # the student and the referee's teacher, up together
    assert vllm_run["reviews_at_kill"] < 96, "the kill came after the last review"  # 48 seeds, 2 orders
    assert vllm_run["left_after_kill"] == {}, vllm_run["left_after_kill"]
    assert vllm_run["shm_after_kill"] == set()
    assert vllm_run["second_code"] == 0, vllm_run["second_output"][-4000:]
    assert vllm_run["left_at_end"] == {} and vllm_run["shm_at_end"] == set()
    run_dir = vllm_run["run_dir"]
    check_invariants(run_dir, tiny_models)
    reviews = jsonl(run_dir / "iter_1/reviews.jsonl")  # scores_only: each reply is the two scores alone
    assert reviews and all(re.fullmatch(r"(10|[1-9]) (10|[1-9])", r["raw"]) for r in reviews)
    assert all(r["completion_tokens"] <= 8 for r in reviews)

    # The LoRA adapter TRL wrote (of the configured rank, no full weights) was served by vLLM on the
    # base model and answered the whole Cache Pool.
    student = run_dir / "iter_1/student"
    adapter = json.loads((student / "adapter_config.json").read_text())
    assert adapter["r"] == LORA_RANK and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (student / "adapter_model.safetensors").is_file() and not (student / "model.safetensors").exists()
    imitation = json.loads((run_dir / "iter_1/imitation.json").read_text())
    assert 0 < imitation["training"]["trainable_parameters"] < imitation["training"]["parameters"] / 10
    started = jsonl(run_dir / "servers.jsonl")
    assert any(r["server"] == "student" and r["model"] == str(student) for r in started)
    assert "--enable-lora" in (run_dir / "logs/server-student.log").read_text() or any(
        "--enable-lora" in command for command in vllm_run["commands"]
    )
    answers = jsonl(run_dir / "iter_1/student_answers.jsonl")
    assert answers and sum(1 for a in answers if a["answer"].strip()) >= len(answers) // 2
    assert {r["engine"] for r in started} == {"vllm 0.32.0"}
    report = json.loads((run_dir / "iter_1/report.json").read_text())
    assert report["engines"] == {"teacher": "vllm 0.32.0", "student": "vllm 0.32.0"}
    assert vllm_run["report"].returncode == 0, vllm_run["report"].stderr[-2000:]
    assert "Servers: student on vllm 0.32.0, teacher on vllm 0.32.0." in (run_dir / "report.md").read_text()
    assert "version 0.32.0" in (run_dir / "logs/server-teacher.log").read_text()
    assert "teacher server: vllm 0.32.0" in vllm_run["second_output"] + vllm_run["first_output"]


def test_vllm_requires_the_key_and_it_is_found_nowhere(vllm_run: dict):
    assert vllm_run["status_without_key"] == 401
    assert vllm_run["server_environments"], "no server process was sampled"
    for environment in vllm_run["server_environments"]:
        assert environment["VLLM_API_KEY"] == SECRET
        assert environment["HF_HUB_OFFLINE"] == "1" and environment["VLLM_NO_USAGE_STATS"] == "1"
    assert not [command for command in vllm_run["commands"] if SECRET in command]
    assert any("vllm.entrypoints.openai.api_server" in command for command in vllm_run["commands"])
    for path in vllm_run["run_dir"].rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for output in (vllm_run["first_output"], vllm_run["second_output"]):
        assert SECRET not in output


def _small_config(tiny_models: Path, directory: Path, *extra_teacher_args: str, grace_s: float | None = None) -> Path:
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(directory / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(tiny_models / name)
        data["servers"][name]["vllm"]["launcher"][0] = str(VLLM_PYTHON)
    data["servers"]["teacher"]["vllm"]["extra_args"] += list(extra_teacher_args)
    data["servers"]["teacher"]["stop_grace_s"] = grace_s
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_flag_vllm_does_not_know_ends_the_run_in_one_line_naming_the_key(tiny_models: Path, tmp_path: Path):
    config = _small_config(tiny_models, tmp_path, "--no-such-flag")
    process = subprocess.Popen(lion_local("run", "--config", str(config)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    stdout, stderr = process.communicate(timeout=300)
    sampler.done.set()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: teacher server exited with code 2 while starting")
    assert "servers.teacher.vllm.extra_args" in line and "unrecognized arguments: --no-such-flag" in line
    assert str(tmp_path / "run/logs/server-teacher.log") in line
    answers = tmp_path / "run/teacher_answers.jsonl"
    assert not answers.exists() or not answers.read_text()  # no stage work was done
    assert _wait_until_gone(sampler.processes, 30) == {}


def test_sigkill_of_lion_local_while_vllm_loads_leaves_no_process(tiny_models: Path, tmp_path: Path):
    config = _small_config(tiny_models, tmp_path, grace_s=5.0)  # a loading API server waits out the grace
    log = tmp_path / "run/logs/serve-teacher.log"
    serve = subprocess.Popen(lion_local("serve", "teacher", "--config", str(config)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Killed once the engine core has been spawned and is still loading: the moment an API
    # server ignores the SIGTERM of its parent's death.
    while "VLLM::EngineCore" not in " ".join(_vllm_processes(serve.pid).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Starting vLLM server" not in log.read_text(), "vLLM finished loading before the kill"
    started = descendants(serve.pid)
    assert len(_vllm_processes(serve.pid)) >= 2
    serve.send_signal(signal.SIGKILL)
    serve.wait()
    assert _wait_until_gone(started, 30) == {}
