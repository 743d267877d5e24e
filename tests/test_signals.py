"""SIGTERM (scancel, a time limit) and SIGINT (Ctrl-C) at any moment, a server's start-up included:
lion-local stops every server it started, and exits with 128 + the signal in less than half the
servers' stop grace (set long here, GRACE_S: a loading server waited out for its whole grace, or a
trainer left to finish, would take longer; the measured exit times are in docs/reliability.md),
no process of the run left behind and no torn journal line.

- vLLM (its CPU build) still loading, when its API server ignores SIGTERM: SIGTERM to `lion-local run`.
  Before this was fixed, the wait for /health ran on a thread that was joined before the servers
  were stopped: 93.7 s with both servers loading.
- The student training (its own process), the teacher's vLLM up beside it: SIGTERM.
- `transformers serve` still loading: SIGINT to `lion-local run`.

Each test samples the run's process tree until the signal; every process it saw must be gone
once lion-local has exited.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from loop_checks import descendants, lion_local, tiny_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
GRACE_S = 60.0  # servers.*.stop_grace_s in these tests
EXIT_LIMIT_S = GRACE_S / 2  # a few seconds are measured; this holds on a host several times slower


class ProcessTree(threading.Thread):
    """Every process seen under a pid, sampled every 0.1 s: pid -> (create time, command line)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.seen: dict[int, tuple[float, str]] = {}
        self.current: dict[int, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.current = descendants(self.pid)
            for pid, command in self.current.items():
                # The latest command line: a child caught between fork and exec still shows its
                # parent's (a busy host makes that window longer). A process on its way out reads
                # as an empty one: it keeps the last it had.
                if pid in self.seen:
                    if command:
                        self.seen[pid] = (self.seen[pid][0], command)
                    continue
                try:
                    self.seen[pid] = (psutil.Process(pid).create_time(), command)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    def left(self) -> dict[int, str]:
        """The processes seen that still run (the same process: its create time; zombies are gone)."""
        alive = {}
        for pid, (created, command) in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = command
            except psutil.Error:
                continue
        return alive


def _server_port(command: str) -> int:
    words = command.split()
    return int(words[words.index("--port") + 1])


def _health_ok(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(run: subprocess.Popen, tree: ProcessTree, marks: tuple[str, ...], timeout_s: float = 400) -> list[str]:
    """Wait until, for each mark, a process whose command holds it runs under `run`; their commands."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.poll() is None, f"lion-local exited with {run.returncode} before the signal"
        commands = list(tree.current.values())
        found = [next((command for command in commands if mark in command), None) for mark in marks]
        if None not in found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no process for each of {marks} under lion-local after {timeout_s} s: {tree.current}")


def while_loading(server_mark: str, loading_mark: str, delay_s: float = 0.0) -> Callable:
    """The moment a server (its command holds `server_mark`) loads: a process holding `loading_mark`
    runs, `delay_s` has passed, and its /health does not answer yet."""

    def wait(run: subprocess.Popen, tree: ProcessTree) -> None:
        server, _ = _wait_for(run, tree, (server_mark, loading_mark))
        time.sleep(delay_s)
        assert not _health_ok(_server_port(server)), "the server had finished loading before the signal"

    return wait


def while_training(run: subprocess.Popen, tree: ProcessTree) -> None:
    """The moment the student trains (its trainer runs) while the teacher's server is up."""
    _wait_for(run, tree, ("lion_local.stages.sft", "serving/supervisor.py"))
    time.sleep(2.0)  # into the training steps


def _journals_are_whole(run_dir: Path) -> None:
    for path in run_dir.rglob("*.jsonl"):
        text = path.read_text(encoding="utf-8")
        assert not text or text.endswith("\n"), f"{path}: torn last line"
        for number, line in enumerate(text.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                raise AssertionError(f"{path}:{number}: not a whole JSON line: {line[:200]!r}") from None


def _interrupt(config: Path, cwd: Path, signum: int, moment: Callable) -> dict:
    """Start `lion-local run`, send `signum` at `moment` (it waits for it); what came of it."""
    run = subprocess.Popen(lion_local("run", "--config", str(config)), cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    tree = ProcessTree(run.pid)
    tree.start()
    try:
        moment(run, tree)
        time.sleep(0.3)  # one more sample of the tree
        sent = time.monotonic()
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        tree.done.set()
        if run.poll() is None:
            run.kill()
            run.wait()
    return {"code": run.returncode, "seconds": seconds, "stderr": stderr, "stdout": stdout, "left": tree.left(),
            "seen": tree.seen}


def _check_clean_stop(outcome: dict, signum: int, run_dir: Path) -> None:
    name = signal.Signals(signum).name
    assert outcome["code"] == 128 + signum, outcome["stderr"][-3000:]
    assert outcome["seconds"] < EXIT_LIMIT_S, f"exit took {outcome['seconds']:.1f} s"
    assert f"{name}: stopping; what finished is kept" in outcome["stderr"]
    assert "Traceback" not in outcome["stderr"] + outcome["stdout"], outcome["stderr"][-3000:]
    seen = [command for _, command in outcome["seen"].values()]
    assert any("serving/supervisor.py" in command for command in seen), seen
    assert outcome["left"] == {}, outcome["left"]
    _journals_are_whole(run_dir)


def _long_grace(data: dict) -> dict:
    for name in ("teacher", "student"):
        data["servers"][name]["stop_grace_s"] = GRACE_S
    return data


def _vllm_config(tiny_models: Path, tmp_path: Path) -> Path:
    data = _long_grace(yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text()))
    data["run_dir"] = str(tmp_path / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(tiny_models / name)
        data["servers"][name]["vllm"]["launcher"][0] = str(VLLM_PYTHON)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm/ (vLLM's CPU build)")
def test_sigterm_while_vllm_loads_stops_everything_without_waiting_out_the_grace(tiny_models: Path, tmp_path: Path):
    # The engine core runs: the API server is deep in its load.
    moment = while_loading("vllm.entrypoints", "VLLM::EngineCore")
    outcome = _interrupt(_vllm_config(tiny_models, tmp_path), tmp_path, signal.SIGTERM, moment)
    print(f"SIGTERM while vLLM loads: lion-local exited after {outcome['seconds']:.2f} s")
    _check_clean_stop(outcome, signal.SIGTERM, tmp_path / "run")


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm/ (vLLM's CPU build)")
def test_sigterm_while_the_student_trains_stops_the_trainer_and_the_teacher_s_vllm(tiny_models: Path, tmp_path: Path):
    # configs/tiny-cpu.yaml keeps the teacher's server up while the student trains.
    outcome = _interrupt(_vllm_config(tiny_models, tmp_path), tmp_path, signal.SIGTERM, while_training)
    print(f"SIGTERM while training: lion-local exited after {outcome['seconds']:.2f} s")
    _check_clean_stop(outcome, signal.SIGTERM, tmp_path / "run")
    assert any("lion_local.stages.sft" in command for _, command in outcome["seen"].values())
    assert (tmp_path / "run/teacher_answers.jsonl").read_text().count("\n") == 48  # kept for the resume


def test_sigint_while_transformers_serve_loads_stops_everything_without_waiting_out_the_grace(tiny_models: Path, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_long_grace(tiny_config(tiny_models, tmp_path / "run"))))
    # Two seconds in: the server imports and loads its model (it answers after about five).
    moment = while_loading("transformers serve", "transformers serve", delay_s=2.0)
    outcome = _interrupt(config, tmp_path, signal.SIGINT, moment)
    _check_clean_stop(outcome, signal.SIGINT, tmp_path / "run")
