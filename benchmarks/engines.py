"""The same smoke loop on both engines, one after the other in one invocation: vLLM's CPU build
(configs/tiny-cpu.yaml) and `transformers serve` (configs/tiny-cpu-transformers.yaml).

    .venv/bin/python benchmarks/engines.py [--out DIR]

Each engine gets a fresh run directory under DIR (default: a temporary directory) and the same
tiny models (models/tiny/, built on first use); each `lion-local run` is timed as a whole. From
each run's report.json files it prints, per stage, the model calls made, the stage's seconds
and calls per second, then the whole wall times and their ratio (transformers / vLLM). A
stage's seconds include starting the servers it needs, as a user's run does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"vllm": "configs/tiny-cpu.yaml", "transformers": "configs/tiny-cpu-transformers.yaml"}
STAGES = ("imitation", "discrimination", "generation")


def stage_calls(report: dict, stage: str) -> int:
    roles = report.get("roles", {})
    if stage == "imitation":
        return roles.get("teacher", {}).get("by_stage", {}).get("imitation", {}).get("calls", 0)
    if stage == "discrimination":
        teacher = roles.get("teacher", {}).get("by_stage", {}).get("discrimination", {}).get("calls", 0)
        return teacher + roles.get("student", {}).get("calls", 0) + roles.get("referee", {}).get("calls", 0)
    return roles.get("generator", {}).get("calls", 0)


def per_stage(run_dir: Path) -> dict[str, tuple[int, float]]:
    """Stage -> (calls, seconds), summed over iterations (the final imitation counts as imitation)."""
    totals = {stage: [0, 0.0] for stage in STAGES}
    for path in sorted(run_dir.glob("*/report.json")):
        report = json.loads(path.read_text())
        for marker, seconds in report.get("stage_seconds", {}).items():
            stage = marker.split("/")[1]
            totals[stage][0] += stage_calls(report, stage)
            totals[stage][1] += seconds
    return {stage: (calls, seconds) for stage, (calls, seconds) in totals.items()}


def run_engine(config: str, run_dir: Path) -> float:
    command = [sys.executable, "-m", "lion_local", "run", "--config", config, "--set", f"run_dir={run_dir}"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{config}: lion-local run failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Directory for the two run directories (default: temporary).")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lion-engines-"))
    walls, stages = {}, {}
    for engine, config in ENGINES.items():
        run_dir = out / engine
        walls[engine] = run_engine(config, run_dir)
        stages[engine] = per_stage(run_dir)

    print(f"{'stage':<16}" + "".join(f"{engine + ' calls':>20}{'s':>8}{'calls/s':>9}" for engine in ENGINES))
    for stage in STAGES:
        cells = ""
        for engine in ENGINES:
            calls, seconds = stages[engine][stage]
            cells += f"{calls:>20}{seconds:>8.1f}{calls / seconds if seconds else 0:>9.2f}"
        print(f"{stage:<16}{cells}")
    print("whole run: " + ", ".join(f"{engine} {walls[engine]:.1f} s" for engine in ENGINES))
    print(f"wall-time ratio transformers / vllm: {walls['transformers'] / walls['vllm']:.2f}")


if __name__ == "__main__":
    main()
