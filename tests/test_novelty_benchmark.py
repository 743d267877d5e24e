"""The novelty benchmark, shortened, as tests: speed ratio, agreement, 70K timing and memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks/novelty_filter.py"


def _run(*arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), *arguments], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_index_is_over_a_thousand_times_faster_with_the_same_decisions():
    output = _run("--only", "head-to-head", "--pool", "5000", "--candidates", "300", "--sample", "3")
    assert "decisions agree 3/3, max ROUGE-L F equal (1e-12) 3/3" in output, output
    ratio = float(re.search(r"per-candidate speed ratio .*: ([0-9,]+)x", output).group(1).replace(",", ""))
    assert ratio >= 1000, output


def test_seventy_thousand_pool_fits_time_and_memory_budgets():
    output = _run("--only", "scaling", "--pool-sizes", "70000")  # the smaller pools' rows are not checked
    seconds = float(re.search(r"6,000 candidates against a 70,000 pool, one process: ([0-9.]+) s", output).group(1))
    assert seconds <= 60, output
    row = next(line for line in output.splitlines() if line.split()[:1] == ["70000"])
    assert float(row.split()[-1]) <= 1024, output  # index MiB
