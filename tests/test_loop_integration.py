"""The whole adversarial loop on the tiny models, for real: `lion-local run` as a user runs it.

The teacher is a real `transformers serve` process (started with `lion-local serve teacher`)
behind a recording proxy, configured as an external endpoint, so that the requests that reached
the teacher are counted from the server's side, not from lion-local's own journal. The student
is served by the run itself and trained with TRL under `accelerate launch`.

test_run_end_to_end: an uninterrupted run at the roles' sampling temperatures; every invariant
of the method and the run-directory contract; `status` and a second `run` on the complete run.
Killed runs, endpoint faults and dead servers: tests/test_fault_tolerance.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loop_checks import (
    check_invariants,
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
        data = yaml.safe_load(config.read_text())
        data.update(seed_limit=24)  # two iterations and the final imitation, at a third less cost
        data["generation"]["new_per_iteration"] = 8
        config.write_text(yaml.safe_dump(data))
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
