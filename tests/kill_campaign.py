"""A SIGKILL campaign on vLLM while other vLLM processes start and stop on the same machine.

    .venv/bin/python tests/kill_campaign.py [--kills 6] [--seed 0] [--out DIR]

Runs configs/tiny-cpu.yaml (both servers on vLLM's CPU build, tiny models from tiny_models.dir,
built when missing; three iterations and the final imitation, about 6 minutes uninterrupted), and
meanwhile keeps "neighbour" vLLM servers of the tiny teacher starting and stopping on fresh ports,
as on a shared node. `lion-local run` is killed with SIGKILL at seeded random moments (--kills
times), each time checked to leave none of its processes behind within 30 s, then run to the end.
The finished run must pass every invariant of the method (tests/loop_checks.check_invariants) and
leave no process of its own behind.
Figures (kills, where each landed, port retries in the run's log, seconds) go to stdout and
DIR/campaign.json. Not part of `make test` (about 15 minutes on 2 cores): docs/reliability.md
records a run of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from loop_checks import check_invariants, lion_local  # noqa: E402
from lion_local.config import load_config  # noqa: E402
from lion_local.smoke.tiny_models import ensure_tiny_models  # noqa: E402
from serving.process import free_port  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


class Neighbours(threading.Thread):
    """vLLM servers of someone else: one at a time, up for a random while, then stopped."""

    def __init__(self, model: Path, rng: random.Random, log: Path) -> None:
        super().__init__(daemon=True)
        self.model, self.rng, self.log = model, rng, log
        self.done = threading.Event()
        self.started = 0

    def run(self) -> None:
        with open(self.log, "a") as log:
            while not self.done.is_set():
                command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                           "--port", str(free_port()), "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"]
                environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
                process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=environment)
                self.started += 1
                self.done.wait(self.rng.uniform(10, 40))
                _stop_group(process)
                self.done.wait(self.rng.uniform(1, 5))


def _stop_group(process: subprocess.Popen) -> None:
    for signum, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def campaign_config(directory: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(directory / "run")
    data["seed_data"] = str(ROOT / data["seed_data"])
    data["tiny_models"]["dir"] = str(ROOT / data["tiny_models"]["dir"])
    data["iterations"] = 3  # long enough for the kills to land in every kind of moment
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(ROOT / data["servers"][name]["model"])
        launcher = data["servers"][name]["vllm"]["launcher"]
        launcher[0] = str(VLLM_PYTHON)
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_processes(pid: int) -> dict[int, str]:
    try:
        return {child.pid: " ".join(child.cmdline()[:4]) for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _left_behind(processes: dict[int, str], timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {pid: command for pid, command in processes.items() if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        if not alive:
            return {}
        time.sleep(0.2)
    return alive


def kill_once(config: Path, after_s: float, log: Path) -> dict:
    """Start `lion-local run`, SIGKILL it after `after_s` (unless it ended), and see what it left."""
    with open(log, "a") as output:
        process = subprocess.Popen(lion_local("run", "--config", str(config)), stdout=output, stderr=output, cwd=ROOT)
        seen: dict[int, str] = {}
        deadline = time.monotonic() + after_s
        while time.monotonic() < deadline and process.poll() is None:
            seen.update(_run_processes(process.pid))
            time.sleep(0.2)
        if process.poll() is not None:
            return {"after_s": after_s, "ended_first": process.returncode}
        seen.update(_run_processes(process.pid))
        process.send_signal(signal.SIGKILL)
        process.wait()
    state = config.parent / "run/state.json"
    completed = json.loads(state.read_text())["completed"] if state.exists() else []
    return {"after_s": round(after_s, 1), "completed": completed, "left_behind": _left_behind(seen, 30)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    directory = args.out or Path(tempfile.mkdtemp(prefix="kill-campaign-"))
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    config = campaign_config(directory)
    started = time.monotonic()
    ensure_tiny_models(load_config(config))  # the neighbours serve the tiny teacher
    prepared = subprocess.run(lion_local("doctor", "--config", str(config)), capture_output=True, text=True, cwd=ROOT)
    neighbours = Neighbours(ROOT / "models/tiny/teacher", random.Random(args.seed + 1), directory / "neighbours.log")
    neighbours.start()
    kills: list[dict] = []
    while len(kills) < args.kills:  # every kill must land while the run still runs
        outcome = kill_once(config, rng.uniform(5, 50), directory / "runs.log")
        if "ended_first" in outcome:
            break
        kills.append(outcome)
    final = subprocess.run(lion_local("run", "--config", str(config)), capture_output=True, text=True, cwd=ROOT)
    neighbours.done.set()
    neighbours.join()
    retries = (directory / "run/logs/lion-local.log").read_text(errors="replace").count("address already in use")
    outcome = {
        "doctor_exit": prepared.returncode, "kills": kills, "final_exit": final.returncode,
        "final_tail": final.stderr[-2000:], "neighbour_starts": neighbours.started,
        "address_in_use_lines": retries, "seconds": round(time.monotonic() - started),
    }
    if final.returncode == 0:
        check_invariants(directory / "run", ROOT / "models/tiny")
        outcome["invariants"] = "passed"
    this = psutil.Process()
    own = {this.pid, *(parent.pid for parent in this.parents())}  # the campaign and whatever started it
    leftovers = [pid for pid in psutil.pids() if pid not in own and _is_ours(pid, directory)]
    outcome["processes_left"] = leftovers
    (directory / "campaign.json").write_text(json.dumps(outcome, indent=2) + "\n")
    print(json.dumps(outcome, indent=2))
    ok = len(kills) >= args.kills and final.returncode == 0 and not leftovers
    ok = ok and not any(k.get("left_behind") for k in kills)
    return 0 if ok else 1


def _is_ours(pid: int, directory: Path) -> bool:
    """A process still running with the campaign's run directory or config on its command line."""
    try:
        return any(str(directory) in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


if __name__ == "__main__":
    sys.exit(main())
