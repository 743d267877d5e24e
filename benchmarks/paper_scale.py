"""The whole loop at the paper's sizes on this machine: 52,000 seeds, 3 iterations of 6,000.

    .venv/bin/python benchmarks/paper_scale.py [--seeds 52000] [--iterations 3] [--new-per-iteration 6000]
                                               [--out runs/paper-scale-bench] [--results FILE.json]

Seeds: the real instructions in ../shared/data/real_instructions.jsonl (those of at most 1,000
characters with their input, so the prompt fits the tiny student's 1,024-token context: 16,560 of
16,575), then deterministic variants of them (the same instruction behind a fixed lead-in such as
"In plain words, ") until there are --seeds distinct ones. Roles: benchmarks/role_server.py (a real HTTP server with varied,
well-formed replies) plays the teacher, the referee and the generator, so the run measures
lion-local rather than a tiny teacher; the student is the tiny student, trained by the imitation
stage and served by vLLM's CPU build (configs/paper-scale-cpu.yaml).

The run is `lion-local run` in a child process, watched from here every 0.2 s through /proc: its
own CPU time (not its children's: the trainer and the vLLM servers are other processes), its
peak RSS, and the stage it is in (from its log). Half-way through the largest journal that the
plan predicts (the referee's, in the last discrimination) it is SIGKILLed and started again; the
resume figure is the time from that second `lion-local run` to the first new line in a journal.
Then the run is checked with the loop's invariant checks (tests/loop_checks.py, novelty checked
against rouge-score on a sample), and `lion-local plan`'s prediction, made before the run, is
compared with the calls made.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from loop_checks import check_invariants  # noqa: E402

CONFIG = ROOT / "configs/paper-scale-cpu.yaml"
LION_LOCAL = [str(ROOT / ".venv/bin/lion-local")]
TICKS = os.sysconf("SC_CLK_TCK")
LEAD_INS = ("", "In plain words, ", "Briefly, ", "For a beginner: ", "Step by step, ", "As an expert would: ",
            "In one paragraph, ", "Carefully, ", "For a student: ", "Concisely, ")
ROLES = ("teacher", "student", "referee", "generator")
MAX_SEED_CHARS = 1000  # instruction and input: the prompt then fits the tiny student's context


def write_seeds(data: Path, wanted: int, path: Path) -> tuple[int, int]:
    """`wanted` distinct seeds: the real instructions, then lead-in variants of them, in a fixed order.
    Returns (real, variants)."""
    real = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    real = [r for r in real if len(r["instruction"]) + len(r.get("input", "")) <= MAX_SEED_CHARS]
    seen: set[tuple[str, str]] = set()
    rows: list[str] = []
    counts = [0, 0]
    for lead_in in LEAD_INS:
        for record in real:
            instruction = lead_in + (record["instruction"][0].lower() + record["instruction"][1:] if lead_in else record["instruction"])
            key = (instruction, record.get("input", ""))
            if len(rows) == wanted or key in seen or not instruction.strip():
                continue
            seen.add(key)
            rows.append(json.dumps({"instruction": key[0], "input": key[1]}, ensure_ascii=False))
            counts[bool(lead_in)] += 1
    if len(rows) < wanted:
        raise SystemExit(f"{data}: only {len(rows)} distinct seeds can be made; ask for fewer (--seeds)")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return counts[0], counts[1]


@contextmanager
def role_server(out: Path, words_from: Path):
    """benchmarks/role_server.py on a free loopback port; yields (base URL, process)."""
    port_file = out / "role_server.port"
    port_file.unlink(missing_ok=True)
    log = open(out / "role_server.log", "w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks/role_server.py"), "--port-file", str(port_file), "--words-from", str(words_from)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the role server did not start; see {out / 'role_server.log'}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(port_file.read_text())}/v1", process
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def proc_cpu_rss(pid: int) -> tuple[float, int] | None:
    """(own CPU seconds, peak RSS in bytes) of a live process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError):
        return None
    peak = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return (int(fields[11]) + int(fields[12])) / TICKS, peak


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


class Watch:
    """One `lion-local run` process watched until it exits: CPU per stage, peak RSS, an optional kill."""

    def __init__(self, process: subprocess.Popen, log: Path, stage_cpu: dict[str, float], stage_wall: dict[str, float]) -> None:
        self.process, self.log, self.stage_cpu, self.stage_wall = process, log, stage_cpu, stage_wall
        self.log_offset = log.stat().st_size if log.exists() else 0
        self.cpu = self.peak_rss = 0.0
        self.stage: str | None = None
        self.stage_started_cpu = self.stage_started_at = 0.0
        self.student_launched_at: float | None = None  # monotonic time of the first student server start

    def sample(self) -> None:
        reading = proc_cpu_rss(self.process.pid)
        if reading is not None:
            self.cpu, self.peak_rss = reading[0], max(self.peak_rss, reading[1])
        for line in self._new_log_lines():
            if "started student server" in line and self.student_launched_at is None:
                self.student_launched_at = time.monotonic()
            if " ==== " not in line:
                continue
            marker = line.split(" ==== ", 1)[1].split()[0]
            self._end_stage()
            self.stage = None if " done in " in line else marker
            self.stage_started_cpu, self.stage_started_at = self.cpu, time.monotonic()

    def _end_stage(self) -> None:
        if self.stage is not None:
            self.stage_cpu[self.stage] = self.stage_cpu.get(self.stage, 0.0) + self.cpu - self.stage_started_cpu
            self.stage_wall[self.stage] = self.stage_wall.get(self.stage, 0.0) + time.monotonic() - self.stage_started_at

    def _new_log_lines(self) -> list[str]:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.log_offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data.rsplit(b"\n", 1)[0] + b"\n" if b"\n" in data else b""
        self.log_offset += len(complete)
        return complete.decode("utf-8", "replace").splitlines()

    def until_exit(self, kill_when=None) -> bool:
        """Sample until the process exits; SIGKILL it when kill_when() turns true. True if killed."""
        killed = False
        while self.process.poll() is None:
            self.sample()
            if kill_when is not None and not killed and kill_when():
                self.sample()
                self.process.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        self._end_stage()  # killed mid-stage: its time so far still counts
        return killed


def start_run(args: list[str], out: Path, attempt: int) -> subprocess.Popen:
    output = open(out / f"lion-local-run-{attempt}.log", "w", encoding="utf-8")
    return subprocess.Popen(LION_LOCAL + ["run", *args], stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)


def first_new_line_after(watch: Watch, journals: list[Path], started: float) -> float | None:
    """Seconds from `started` until any of `journals` gains a line (None: the process ended first)."""
    before = {path: count_lines(path) for path in journals}
    while watch.process.poll() is None:
        for path in journals:
            if count_lines(path) > before[path]:
                return time.monotonic() - started
        watch.sample()
        time.sleep(0.02)
    return None


def made_calls(run_dir: Path) -> dict[str, dict[str, int]]:
    """Calls per stage and role, counted in the journals the run wrote."""
    made: dict[str, dict[str, int]] = {}
    for line in (run_dir / "teacher_answers.jsonl").read_text(encoding="utf-8").splitlines():
        stage = json.loads(line)["stage"]
        made.setdefault(stage, {}).setdefault("teacher", 0)
        made[stage]["teacher"] += 1
    for directory in sorted(run_dir.glob("iter_*")):
        k = directory.name.removeprefix("iter_")
        made.setdefault(f"{k}/discrimination", {}).update(
            student=count_lines(directory / "student_answers.jsonl"),
            referee=count_lines(directory / "reviews.jsonl") + count_lines(directory / "controls.jsonl"),
        )
        made.setdefault(f"{k}/generation", {})["generator"] = count_lines(directory / "generator_calls.jsonl")
    return made


def journal_bytes(run_dir: Path, stages: list[str]) -> dict[str, int]:
    """Bytes on disk of the journals each stage appends to (its share of teacher_answers.jsonl included)."""
    sizes = dict.fromkeys(stages, 0)
    for line in (run_dir / "teacher_answers.jsonl").read_bytes().splitlines(keepends=True):
        stage = json.loads(line)["stage"]
        sizes[stage] = sizes.get(stage, 0) + len(line)
    files = {"discrimination": ["student_answers.jsonl", "reviews.jsonl", "controls.jsonl"],
             "generation": ["generator_calls.jsonl"]}
    for stage in stages:
        k, name = stage.split("/")
        directory = run_dir / (f"iter_{k}" if k != "final" else "final")
        sizes[stage] += sum((directory / f).stat().st_size for f in files.get(name, []) if (directory / f).exists())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=52000)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--new-per-iteration", type=int, default=6000)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/real_instructions.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/paper-scale-bench")
    parser.add_argument("--tiny-models", type=Path, default=ROOT / "models/tiny",
                        help="the tiny models' directory (built there on first use)")
    parser.add_argument("--novelty-sample", type=int, default=4, help="generated instructions per iteration checked with rouge-score")
    parser.add_argument("--results", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_dir, seeds_path = out / "run", out / "seeds.jsonl"
    real, variants = write_seeds(args.data, args.seeds, seeds_path)
    print(f"seeds: {real + variants} ({real} real instructions from {args.data.name}, {variants} lead-in variants of them)")

    with role_server(out, args.data) as (base_url, server):
        tiny = args.tiny_models.resolve()
        overrides = [f"run_dir={run_dir}", f"seed_data={seeds_path}", f"iterations={args.iterations}",
                     f"generation.new_per_iteration={args.new_per_iteration}", f"tiny_models.dir={tiny}",
                     f"servers.student.model={tiny / 'student'}"]
        overrides += [f'servers.{name}.base_urls=["{base_url}"]' for name in ("teacher", "referee", "generator")]
        config_args = ["--config", str(CONFIG), *[item for o in overrides for item in ("--set", o)]]
        plan = json.loads(subprocess.run(LION_LOCAL + ["plan", *config_args, "--json"], capture_output=True, text=True,
                                         check=True, cwd=ROOT).stdout)
        largest = max(plan["rows"], key=lambda row: row["calls"])
        target = run_dir / f"iter_{largest['stage'].split('/')[0]}/reviews.jsonl"
        kill_at = largest["calls"] // 2
        print(f"roles: teacher, referee and generator: benchmarks/role_server.py at {base_url}; "
              f"student: the tiny student served by vLLM's CPU build")
        print(f"largest journal: {largest['stage']} {largest['role']} ({largest['calls']} calls); killed at {kill_at}")

        stage_cpu: dict[str, float] = {}
        stage_wall: dict[str, float] = {}
        server_cpu_before = proc_cpu_rss(server.pid)  # its start-up is not per-call work
        started = time.monotonic()
        first = Watch(start_run(config_args, out, 1), run_dir / "logs/lion-local.log", stage_cpu, stage_wall)
        killed = first.until_exit(kill_when=lambda: count_lines(target) >= kill_at)
        if not killed:
            raise SystemExit(f"lion-local run ended (exit {first.process.returncode}) before the kill; see {out}")
        answers_at_kill = count_lines(target.with_name("student_answers.jsonl"))  # nothing writes after the kill
        restarted = time.monotonic()
        second = Watch(start_run(config_args, out, 2), run_dir / "logs/lion-local.log", stage_cpu, stage_wall)
        journals = [target, target.with_name("student_answers.jsonl"), run_dir / "teacher_answers.jsonl"]
        resume_s = first_new_line_after(second, journals, restarted)
        second.until_exit()
        launch_s = second.student_launched_at - restarted if second.student_launched_at is not None else None
        wall = time.monotonic() - started
        if second.process.returncode != 0:
            raise SystemExit(f"the resumed lion-local run exited {second.process.returncode}; see {out}")
        server_cpu = proc_cpu_rss(server.pid)
        if server_cpu is not None and server_cpu_before is not None:
            server_cpu = (server_cpu[0] - server_cpu_before[0], server_cpu[1])

    results = summarize(plan, run_dir, stage_cpu, stage_wall, [first, second], wall, server_cpu)
    results["resume"] = {
        "killed_at": {"journal": str(target.relative_to(run_dir)), "lines": kill_at,
                      "student_answers": answers_at_kill},
        "to_first_new_call_s": round(resume_s, 2) if resume_s is not None else None,
        "to_student_server_launch_s": round(launch_s, 2) if launch_s is not None else None,
    }
    results["seeds"] = {"real": real, "variants": variants}
    check_invariants(run_dir, tiny, novelty_sample=args.novelty_sample)
    results["invariants"] = "passed"
    print_results(results)
    if args.results:
        args.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def summarize(plan: dict, run_dir: Path, stage_cpu: dict[str, float], stage_wall: dict[str, float], watches: list[Watch],
              wall: float, server_cpu: tuple[float, int] | None) -> dict:
    """Per-stage and whole-run figures; a stage's wall time is what the watch saw, over both runs."""
    state = json.loads((run_dir / "state.json").read_text())
    made = made_calls(run_dir)
    sizes = journal_bytes(run_dir, state["completed"])
    stages = []
    for stage in state["completed"]:
        calls = sum(made.get(stage, {}).values())
        seconds = round(stage_wall.get(stage, state["stage_seconds"][stage]), 1)
        cpu = stage_cpu.get(stage, 0.0)
        stages.append({
            "stage": stage, "wall_s": seconds, "recorded_s": state["stage_seconds"][stage], "calls": calls, "calls_per_s": round(calls / seconds, 1) if seconds else None,
            "cpu_s": round(cpu, 2), "cpu_ms_per_call": round(1000 * cpu / calls, 3) if calls else None,
            "journal_mib": round(sizes[stage] / 2**20, 2),
        })
    predicted = {role: plan["totals"][role]["calls"] for role in ROLES}
    actual = {role: sum(per_stage.get(role, 0) for per_stage in made.values()) for role in ROLES}
    total_calls = sum(actual.values())
    total_cpu = sum(watch.cpu for watch in watches)
    served = sum(actual[role] for role in ROLES if role != "student")
    return {
        "stages": stages,
        "calls": {"predicted": predicted, "made": actual,
                  "error_pct": {r: round(100 * (predicted[r] - actual[r]) / actual[r], 3) if actual[r] else None for r in ROLES}},
        "lion_local_cpu_s": round(total_cpu, 1),
        "cpu_ms_per_call": round(1000 * total_cpu / total_calls, 3),
        "peak_rss_mib": round(max(watch.peak_rss for watch in watches) / 2**20, 1),
        "wall_s": round(wall, 1),
        "role_server_cpu_s": round(server_cpu[0], 1) if server_cpu else None,
        # The same host's cost of one bare HTTP exchange, measured beside lion-local in this run:
        # what a host-independent reading of lion-local's own per-call CPU is compared against.
        "role_server_ms_per_call": round(1000 * server_cpu[0] / served, 4) if server_cpu and served else None,
        "engines": json.loads((run_dir / "iter_1/report.json").read_text()).get("engines"),
    }


def print_results(results: dict) -> None:
    print(f"{'stage':<18}{'wall s':>9}{'calls':>9}{'calls/s':>9}{'CPU s':>8}{'ms/call':>9}{'journal MiB':>13}")
    for row in results["stages"]:
        ms = f"{row['cpu_ms_per_call']:.3f}" if row["cpu_ms_per_call"] is not None else "-"
        rate = f"{row['calls_per_s']:.1f}" if row["calls_per_s"] is not None else "-"
        print(f"{row['stage']:<18}{row['wall_s']:>9.1f}{row['calls']:>9}{rate:>9}{row['cpu_s']:>8.1f}{ms:>9}{row['journal_mib']:>13.2f}")
    calls = results["calls"]
    for role in ROLES:
        print(f"{role:<10} predicted {calls['predicted'][role]:>8}  made {calls['made'][role]:>8}  error {calls['error_pct'][role]}%")
    print(f"lion-local CPU {results['lion_local_cpu_s']} s over {sum(calls['made'].values())} calls: "
          f"{results['cpu_ms_per_call']} ms per call; peak RSS {results['peak_rss_mib']} MiB")
    resume = results["resume"]
    print(f"resume ({resume['killed_at']['journal']} killed at {resume['killed_at']['lines']} lines): first new call "
          f"{resume['to_first_new_call_s']} s after the second `lion-local run` (student server launched at "
          f"{resume['to_student_server_launch_s']} s)")
    print(f"engines {results['engines']}; role server CPU {results['role_server_cpu_s']} s during the run "
          f"({results['role_server_ms_per_call']} ms per call it served); "
          f"whole run {results['wall_s']} s; invariants {results['invariants']}")


if __name__ == "__main__":
    main()
