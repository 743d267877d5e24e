"""The paper-scale benchmark, shortened, as tests: 3,000 seeds and one iteration end to end, and
the control plane at three sizes, so a superlinear cost or a slow call path fails the suite.

The short run is the real loop (the tiny student trained and served by vLLM's CPU build; the
teacher-side roles served by benchmarks/role_server.py), killed half-way through its reviews and
resumed; the benchmark itself runs the loop's invariant checks and fails when they do not hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_paper_scale_run_is_predicted_cheap_small_and_quick_to_resume(tiny_models, tmp_path):
    results = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/paper_scale.py"), "--seeds", "3000", "--iterations", "1",
         "--new-per-iteration", "1000", "--out", str(tmp_path / "bench"), "--results", str(results),
         "--tiny-models", str(tiny_models)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    print(completed.stdout)
    figures = json.loads(results.read_text())
    assert figures["invariants"] == "passed"
    for role, error in figures["calls"]["error_pct"].items():
        assert abs(error) <= 2.0, (role, figures["calls"])
    stages = {row["stage"]: row for row in figures["stages"]}
    assert list(stages) == ["1/imitation", "1/discrimination", "1/generation", "final/imitation"]
    # lion-local's own CPU per model call where calls dominate (the whole run's figure also
    # carries a fixed cost: imports, and reading the tokenizer for training). The goal is 1 ms on
    # the development host, where the role server spends 0.08 ms per call; hosts differ up to 3.5x
    # in what an HTTP exchange over loopback costs (docs/benchmarks.md), so on a host where it
    # costs more the bar is ten of the role server's calls, measured beside lion-local in this run.
    bar_ms = max(1.0, 10 * figures["role_server_ms_per_call"])
    assert stages["1/discrimination"]["cpu_ms_per_call"] < bar_ms, (bar_ms, stages)
    assert stages["1/generation"]["cpu_ms_per_call"] < bar_ms, (bar_ms, stages)
    assert figures["peak_rss_mib"] < 4096, figures
    # From the second `lion-local run` to the launch of the student's server: lion-local's own
    # part of the resume; the first new call then waits for vLLM to load the checkpoint.
    resume = figures["resume"]
    assert resume["to_student_server_launch_s"] is not None and resume["to_student_server_launch_s"] < 10, resume
    assert resume["to_first_new_call_s"] < 60, resume


def test_control_plane_shows_no_quadratic_growth_from_1x_to_10x(tmp_path):
    # At these small sizes (3K to 30K) CPython's garbage collector adds a mild growth to the
    # parts that build many objects (judge: b = 1.31 measured, flat with the collector off), so
    # the suite catches what a regression looks like, b near 2, rather than the 1.15 verdict.
    results = tmp_path / "control_plane.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/control_plane.py"), "--base", "3000", "--no-memory", "--json", str(results)],
        capture_output=True, text=True, timeout=600,
    )
    print(completed.stdout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    parts = json.loads(results.read_text())["parts"]
    assert {"journal_replay", "pending_scan", "pools", "novelty_build", "novelty_check", "judge", "plan"} <= set(parts)
    for name, part in parts.items():
        assert part["exponent"] is not None and part["exponent"] < 1.5, (name, part)
