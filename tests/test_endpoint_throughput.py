"""The client keeps 256 requests in flight: the throughput benchmark, shortened, as a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_client_sustains_ninety_percent_of_concurrency_over_delay():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/endpoint_throughput.py"), "--concurrency", "256", "--delay", "0.5",
         "--requests", "2560"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert "peak in flight: client 256, server 256" in completed.stdout
    ratio = float(re.match(r"throughput ratio: ([0-9.]+) ", lines[-1]).group(1))
    assert ratio >= 0.9, completed.stdout
