"""`lion-local stage`, `iteration` and `status` drive a run one step at a time, as SLURM jobs do.

Unlike tests/test_loop_integration.py, the run here starts its own teacher (`transformers serve`
launched by lion-local, the smoke-mode default) and must stop it before each training, so this
also covers the servers' lifecycle across stages, and a SIGTERM that stops a stage cleanly. The
teacher's API key (set in the environment) is found nowhere in the run directory afterwards. The
run is small (12 seeds, 4 new instructions, one iteration plus the final imitation) to keep it
quick.

Offline: every lion-local command runs in a network namespace whose only interface is the
loopback (tests/loopback_only.py, as root), so the whole smoke pipeline is shown to need nothing
beyond this machine; and every process lion-local starts (servers, accelerate, the trainer),
sampled from /proc while the commands run, was started with the offline environment (`OFFLINE_ENVIRONMENT` in `lion_local/offline.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

from lion_local.offline import OFFLINE_ENVIRONMENT
from loop_checks import descendants, process_environment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = os.geteuid() == 0  # a network namespace needs root; CI runs as root
# Every command runs with the loopback as its only network interface.
WRAPPER = [sys.executable, str(ROOT / "tests/loopback_only.py")] if OFFLINE else []


def _command(config: Path, *args: str) -> list[str]:
    return [*WRAPPER, sys.executable, "-m", "lion_local", *args, "--config", str(config)]


def _lion_local(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(config, *args), capture_output=True, text=True)


class StartedProcesses:
    """Samples, every 50 ms, the processes below each lion-local command whose command line holds
    `marker`, and their environments.

    Keyed by pid and command line together: a child caught between fork and exec still shows its
    parent's command line (and environment), and must be sampled again once it has exec'd; such a
    sample of lion-local's own command line is left out."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.seen: dict[tuple[int, str], dict[str, str] | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid, command in descendants(os.getpid()).items():
                if "-m lion_local " in command and self.marker in command:  # a command this test ran
                    for child, child_command in descendants(pid).items():
                        # An exiting process shows an empty command line and environment; a child
                        # between fork and exec shows lion-local's own, and its environment.
                        if child_command and child_command != command and (child, child_command) not in self.seen:
                            self.seen[child, child_command] = process_environment(child)
            self._stop.wait(0.05)

    def __enter__(self) -> StartedProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


def test_stage_iteration_and_status_step_through_a_run(tiny_run_config: Path, tmp_path: Path, monkeypatch) -> None:
    if not OFFLINE:
        warnings.warn("not root: the run used the host's network; the loopback-only check needs root")
    with StartedProcesses(str(tmp_path)) as started:
        _step_through_a_run(tiny_run_config, tmp_path, monkeypatch)

    # What lion-local started: both servers and the trainer (no accelerate file: run directly), all offline.
    commands = [command for _, command in started.seen]
    assert any("transformers serve" in c and c.split("serve ")[1].startswith(str(tmp_path / "run")) for c in commands)
    teacher_model = yaml.safe_load(tiny_run_config.read_text())["servers"]["teacher"]["model"]
    assert any("transformers serve" in c and f"serve {teacher_model} " in c for c in commands)
    assert any("-m lion_local.stages.sft" in c for c in commands)
    assert not any("accelerate" in c and " launch " in c for c in commands)
    for (_, command), environment in started.seen.items():
        if environment is None:
            continue  # it ended before its environment could be read
        missing = {k: v for k, v in OFFLINE_ENVIRONMENT.items() if environment.get(k) != v}
        assert not missing, f"{command!r} was started without {missing}"


def _step_through_a_run(tiny_run_config: Path, tmp_path: Path, monkeypatch) -> None:
    data = yaml.safe_load(tiny_run_config.read_text())
    data.update(iterations=1, seed_limit=12)
    # The teacher's requests carry an API key (transformers serve ignores it); it must never be
    # written anywhere in the run directory or its logs.
    secret = "sk-lion-local-test-0f9e8d7c6b5a"
    monkeypatch.setenv("LION_TEST_TEACHER_KEY", secret)
    data["servers"]["teacher"]["api_key_env"] = "LION_TEST_TEACHER_KEY"
    data["generation"]["new_per_iteration"] = 4
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(data))
    run_dir = Path(data["run_dir"])

    status = _lion_local(config, "status")
    assert status.returncode == 0 and "not started (4 stages to run)" in status.stdout

    early = _lion_local(config, "stage", "discrimination")
    assert early.returncode == 3  # a stage asked out of order
    assert early.stderr.strip() == (
        "error: stage 1/discrimination cannot run yet: the next stage is 1/imitation; run that first"
    )
    assert not run_dir.exists()

    first = _lion_local(config, "stage", "imitation")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _completed(run_dir) == ["1/imitation"]
    status = _lion_local(config, "status").stdout.splitlines()
    assert status[0].endswith("iteration 1 of 1, next stage 1/discrimination")
    assert "teacher answers 12/12, student trained" in status[1]
    # The run started its own teacher and stopped it before training the student.
    teacher_log = (run_dir / "logs/server-teacher.log").read_text()
    assert teacher_log.count("starting teacher") == 1
    assert "stopped teacher server" in (run_dir / "logs/lion-local.log").read_text()

    # SIGTERM (scancel, a time limit) in the middle of the reviews: a clean stop, servers down.
    interrupted = subprocess.Popen(
        _command(config, "iteration"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    reviews = run_dir / "iter_1/reviews.jsonl"
    deadline = time.monotonic() + 240
    while not (reviews.exists() and reviews.read_bytes().count(b"\n") >= 3):
        assert interrupted.poll() is None and time.monotonic() < deadline, interrupted.communicate()[1][-3000:]
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    _, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: stopping; what finished is kept, and the same command continues from here" in stderr
    log = (run_dir / "logs/lion-local.log").read_text()
    assert log.count("stopped student server") == 1 and log.count("stopped teacher server") == 2
    assert _completed(run_dir) == ["1/imitation"]

    rest = _lion_local(config, "iteration")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert _completed(run_dir) == ["1/imitation", "1/discrimination", "1/generation"]
    report = json.loads((run_dir / "iter_1/report.json").read_text())
    assert report["pools"]["cache"] == 12 and report["roles"]["student"]["calls"] == 12
    assert report["generation"]["accepted"]["total"] + report["generation"]["shortfall"]["total"] == 4

    again = _lion_local(config, "stage", "generation")
    assert again.returncode == 3
    assert "every iteration is complete; the next stage is final/imitation" in again.stderr

    final = _lion_local(config, "iteration")  # only the final imitation is left
    assert final.returncode == 0, final.stderr[-3000:]
    assert _completed(run_dir)[-1] == "final/imitation"
    assert (run_dir / "final/student/model.safetensors").exists()
    assert json.loads((run_dir / "final/report.json").read_text())["pools"]["train"] == len(
        (run_dir / "iter_1/generated.jsonl").read_text().splitlines()
    )

    status = _lion_local(config, "status").stdout.splitlines()
    assert "complete (4 stages)" in status[0]
    assert all(" done " in line for line in status[1:])
    done = _lion_local(config, "iteration")
    assert done.returncode == 0 and "is complete: nothing to do" in done.stdout

    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert len(files) > 20 and any(path.name == "config.yaml" for path in files)
    assert "LION_TEST_TEACHER_KEY" in (run_dir / "config.yaml").read_text()  # the variable's name, not its value
    leaking = [str(path) for path in files if secret.encode() in path.read_bytes()]
    assert not leaking, f"the API key was written to {leaking}"
