"""The short paper-scale run of tests/test_paper_scale.py, with the timings the test does not assert.

    .venv/bin/python benchmarks/paper_scale_short.py [--seeds 1000] [--new-per-iteration 300]
                                                     [--tiny-models models/tiny] [--out DIR]
    .venv/bin/python benchmarks/paper_scale_short.py --from-results FILE.json

Runs benchmarks/paper_scale.py with one iteration at the test's sizes (killed half-way through its
reviews and resumed, as there), or reads the --results JSON of an earlier run, and prints what
depends on the host's speed, each beside a figure measured in the same run:

- lion-local's own CPU per model call in the discrimination and the generation, and as a ratio to
  the role server's CPU per call it served (the same host's price of one HTTP exchange; the old
  bar was the larger of 1 ms and ten of those);
- the resume: seconds from the second `lion-local run` to the student server's launch and to the
  first new journal line, and the first as a share of the second;
- wall time and calls per second of each stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="paper-scale-short-") as temporary:
        out = args.out or Path(temporary) / "bench"
        results = Path(temporary) / "results.json"
        command = [sys.executable, str(ROOT / "benchmarks/paper_scale.py"), "--seeds", str(args.seeds), "--iterations", "1",
                   "--new-per-iteration", str(args.new_per_iteration), "--out", str(out), "--results", str(results),
                   "--tiny-models", str(args.tiny_models)]
        print("$ " + " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        return json.loads(results.read_text())


def report(figures: dict) -> None:
    role_ms = figures["role_server_ms_per_call"]
    print()
    print(f"{'stage':<18}{'wall s':>8}{'calls':>8}{'calls/s':>9}{'CPU ms/call':>13}{'/ role server':>15}")
    for row in figures["stages"]:
        ms = row["cpu_ms_per_call"]
        ratio = f"{ms / role_ms:.1f}x" if ms is not None and role_ms else "-"
        shown = f"{ms:.3f}" if ms is not None else "-"
        rate = f"{row['calls_per_s']:.1f}" if row["calls_per_s"] is not None else "-"
        print(f"{row['stage']:<18}{row['wall_s']:>8.1f}{row['calls']:>8}{rate:>9}{shown:>13}{ratio:>15}")
    print(f"role server: {role_ms} ms of CPU per call it served (the same run)")
    print(f"lion-local: {figures['cpu_ms_per_call']} ms of CPU per call over the whole run; peak RSS {figures['peak_rss_mib']} MiB")
    resume = figures["resume"]
    launch, first = resume["to_student_server_launch_s"], resume["to_first_new_call_s"]
    share = f" (launch / first new call: {launch / first:.2f})" if launch is not None and first else ""
    print(f"resume after a kill at {resume['killed_at']['lines']} lines of {resume['killed_at']['journal']}: "
          f"student server launched {launch} s, first new call {first} s after the second `lion-local run`{share}")
    print(f"whole run {figures['wall_s']} s; calls off the plan by {figures['calls']['error_pct']} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--new-per-iteration", type=int, default=300)
    parser.add_argument("--tiny-models", type=Path, default=ROOT / "models/tiny")
    parser.add_argument("--out", type=Path, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--from-results", type=Path, help="report on this --results JSON of paper_scale.py instead of running")
    args = parser.parse_args()
    figures = json.loads(args.from_results.read_text()) if args.from_results else run(args)
    report(figures)


if __name__ == "__main__":
    main()
