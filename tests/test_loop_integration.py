"""The whole adversarial loop on the tiny models, for real: `lion-local run` as a user runs it.

The teacher is a real `transformers serve` process (started with `lion-local serve teacher`)
behind a recording proxy, configured as an external endpoint, so that the requests that reached
the teacher are counted from the server's side, not from lion-local's own journal. The student
is served by the run itself and trained with TRL under `accelerate launch`.

- test_run_end_to_end: an uninterrupted run; every invariant of the method and the run-directory
  contract; `status` and a second `run` on the complete run.
- test_run_survives_sigkill_in_every_stage: the same run killed with SIGKILL during teacher
  answering, during training (after a trainer checkpoint), during reviews and during
  generation, re-run after each kill; it completes with the same invariants, resumes training
  from the checkpoint, and never asks the teacher again for an instruction already answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loop_checks import (
    check_invariants,
    jsonl,
    lion_local,
    run_config,
    start_proxy,
    stop,
    teacher_deliveries,
)

pytestmark = pytest.mark.integration

def test_run_end_to_end(tiny_models: Path, teacher_url: str, tmp_path: Path) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = start_proxy(teacher_url, proxy_log)
    try:
        config = run_config(tiny_models, tmp_path, proxy_url)
        started = time.monotonic()
        result = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert time.monotonic() - started < 400
    finally:
        stop(proxy)
    run_dir = tmp_path / "run"
    everything = check_invariants(run_dir, tiny_models)

    # Every distinct instruction reached the teacher exactly once, as the server side saw it.
    deliveries = teacher_deliveries(proxy_log, everything)
    assert set(deliveries) == {r["id"] for r in everything}
    assert {len(times) for times in deliveries.values()} == {1}

    status = subprocess.run(lion_local("status", "--config", str(config)), capture_output=True, text=True)
    assert status.returncode == 0
    assert "complete" in status.stdout.splitlines()[0]
    assert status.stdout.count(" done ") == 7

    started = time.monotonic()
    again = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
    assert again.returncode == 0
    assert "is complete: nothing to do" in again.stdout
    assert time.monotonic() - started < 30
    assert "server" not in again.stderr  # nothing was started


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_run_survives_sigkill_in_every_stage(tiny_models: Path, teacher_url: str, tmp_path: Path) -> None:
    proxy_log = tmp_path / "teacher-requests.jsonl"
    proxy, proxy_url = start_proxy(teacher_url, proxy_log, delay_generator_s=0.4)
    run_dir = tmp_path / "run"
    kill_points = [
        ("imitation: teacher answers", lambda: _lines(run_dir / "teacher_answers.jsonl") >= 12),
        ("imitation: training", lambda: any((run_dir / "iter_1/sft_checkpoints").glob("checkpoint-*/trainer_state.json"))),
        ("discrimination: reviews", lambda: _lines(run_dir / "iter_1/reviews.jsonl") >= 20),
        ("generation", lambda: _lines(run_dir / "iter_1/generator_calls.jsonl") >= 2),
    ]
    kill_times: list[float] = []
    try:
        config = run_config(tiny_models, tmp_path, proxy_url)
        for number, (name, reached) in enumerate(kill_points):
            output = tmp_path / f"run-{number}.log"
            with open(output, "w") as log:
                process = subprocess.Popen(lion_local("run", "--config", str(config)), stdout=log, stderr=log)
            deadline = time.monotonic() + 300
            while not reached():
                if process.poll() is not None:
                    tail = output.read_text()[-3000:]
                    raise AssertionError(f"run ended (code {process.returncode}) before kill point {name!r}: {tail}")
                assert time.monotonic() < deadline, f"kill point {name!r} not reached"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            kill_times.append(time.time())
            process.wait()
            state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
            assert "2/imitation" not in state.get("completed", []), f"kill point {name!r} came too late"
            time.sleep(1.0)  # servers the killed run started get SIGTERM from the kernel
        result = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop(proxy)

    everything = check_invariants(run_dir, tiny_models)
    assert json.loads((run_dir / "iter_1/sft_result.json").read_text())["resumed"] is True

    # No instruction was asked of the teacher again once its answer had come back, except an
    # answer delivered in the instant before a kill, which the killed run could not journal.
    deliveries = teacher_deliveries(proxy_log, everything)
    assert set(deliveries) == {r["id"] for r in everything}
    for instruction_id, times in deliveries.items():
        for earlier in sorted(times)[:-1]:
            assert any(0 <= kill - earlier < 0.5 for kill in kill_times), (
                f"instruction {instruction_id} was answered at {earlier} and asked again later"
            )
    # The journal has one answer per instruction although requests in flight were repeated.
    answers = jsonl(run_dir / "teacher_answers.jsonl")
    assert len(answers) == len(everything)
    assert os.path.isdir(run_dir / "final/student")
