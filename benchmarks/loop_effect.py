"""Does the loop pay? The three discrimination signals side by side on the real model, at equal budget.

    .venv/bin/python benchmarks/loop_effect.py [--out runs/loop-effect] [--seeds 0 1 2] [--new 32]

Arms (discrimination.signal): none (imitation with generation, seeds drawn uniformly from the Cache
Pool), referee (the paper's) and likelihood (the student's NLL of the teacher's answer), each with
the run seeds given. Every run is configs/smollm2-cpu.yaml (SmolLM2-135M-Instruct teacher, its
6-layer student, one iteration then the final imitation) with generation.new_per_iteration = --new,
so every arm asks the teacher for the same number of answers (the seeds', then the generated
instructions'); only how the generator's seeds are chosen differs. The teacher is served once
(`lion-local serve teacher`) and reached by every run as an external endpoint; per run seed, the
first imitation (the same in every arm) runs once and each arm continues from a copy of it
(`--accept-change discrimination.signal`).

The figure: the mean NLL per token (lion_local.stages.likelihood, with transformers) of the
teacher's greedy, complete answers to instructions no run saw: the 40 evaluation questions and
--held-out instructions of ../shared/data/real_instructions.jsonl (when present), for the initial
student, each seed's first checkpoint and each arm's final checkpoint. Printed: per arm the final
NLL (mean and spread over seeds), each arm's gap to `none` paired by seed with a 95% t interval,
and each arm's cost (calls and tokens per role, wall seconds); then `lion-local compare` of the runs.
Everything is written to --out (loop_effect.json, compare/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from lion_local.config import TeacherRole
from lion_local.endpoints.client import EndpointClient
from lion_local.roles import ask_teacher
from lion_local.run.questions import default_questions, load_questions
from lion_local.stages.likelihood import local_nll, mean_nll, student_scored
from serving.process import free_port

ROOT = Path(__file__).resolve().parents[1]
LION = [str(ROOT / ".venv/bin/lion-local")]
ARMS = ("none", "referee", "likelihood")
ROLES = ("teacher", "student", "referee", "generator")
REAL_INSTRUCTIONS = ROOT.parent / "shared/data/real_instructions.jsonl"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def base_config(out: Path, url: str | None) -> dict:
    data = yaml.safe_load((ROOT / "configs/smollm2-cpu.yaml").read_text())
    for name in ("teacher", "student"):
        data["servers"][name]["model"] = str(ROOT / data["servers"][name]["model"])
        data["servers"][name]["vllm"]["launcher"][0] = str(ROOT / data["servers"][name]["vllm"]["launcher"][0])
    data["seed_data"] = str(ROOT / data["seed_data"])
    if url is not None:  # every run reaches the one served teacher
        data["servers"]["teacher"] = {"engine": "external", "base_urls": [f"{url}/v1"], "served_model_name": "teacher",
                                      "model": data["servers"]["teacher"]["model"], "max_concurrency": 32,
                                      "request_timeout_s": 600, "failure_budget_s": 120}
    data["run_dir"] = str(out / "serve")
    return data


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def lion(*args: str, log: Path) -> tuple[int, float]:
    started = time.monotonic()
    with open(log, "a") as handle:
        code = subprocess.run([*LION, *args], stdout=handle, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - started


def serve_teacher(out: Path) -> tuple[subprocess.Popen, str]:
    data = base_config(out, None)
    port = free_port()
    data["servers"]["teacher"]["port"] = port
    config = write_config(out / "serve.yaml", data)
    log = open(out / "serve.log", "w")
    process = subprocess.Popen([*LION, "serve", "teacher", "--config", str(config)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the teacher's server exited: see {out / 'serve.log'}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("the teacher's server did not start in 15 minutes")


def held_out_items(count: int) -> list[dict]:
    items = [{"instruction": q["question"], "input": ""} for q in load_questions(default_questions())]
    if REAL_INSTRUCTIONS.exists() and count:
        real = [json.loads(line) for line in REAL_INSTRUCTIONS.read_text().splitlines() if line.strip()]
        real = [r for r in real if len(r["instruction"]) + len(r.get("input", "")) < 400]
        items += [{"instruction": r["instruction"], "input": r.get("input", "")} for r in random.Random(0).sample(real, count)]
    return items


def teacher_answers(url: str, items: list[dict], path: Path) -> list[tuple[dict, str]]:
    """The teacher's greedy answer to each held-out instruction, complete ones only (cached in `path`)."""
    if not path.exists():
        role = TeacherRole(temperature=0.0, max_tokens=256)

        async def ask_all() -> list[dict]:
            async with EndpointClient("teacher", [f"{url}/v1"], "teacher", max_concurrency=32) as client:
                replies = await asyncio.gather(*(ask_teacher(client, role, i["instruction"], i["input"]) for i in items))
            return [{**i, "answer": r.text, "finish_reason": r.finish_reason} for i, r in zip(items, replies)]

        path.write_text("".join(json.dumps(r) + "\n" for r in asyncio.run(ask_all())))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r, r["answer"]) for r in records if r["finish_reason"] == "stop" and r["answer"].strip()]


def nll(checkpoint: Path, pairs: list[tuple[dict, str]]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    scored = [student_scored(tokenizer, "alpaca", r["instruction"], r["input"], answer) for r, answer in pairs]
    return mean_nll(local_nll(str(checkpoint), scored))["mean_nll"]


def run_arms(out: Path, url: str, seeds: list[int], arms: list[str], new: int) -> dict:
    """Every arm of every seed; returns {seed: {arm or "base": {"dir", "code", "seconds"}}}."""
    runs: dict = {}
    for seed in seeds:
        data = base_config(out, url)
        data.update(seed=seed)
        data["generation"]["new_per_iteration"] = new
        data["discrimination"]["signal"] = "none"
        base = out / f"seed-{seed}" / "base"
        data["run_dir"] = str(base)
        config = write_config(out / f"seed-{seed}" / "base.yaml", data)
        state = base / "state.json"
        if state.exists() and "1/imitation" in json.loads(state.read_text())["completed"]:
            code, seconds = 0, 0.0  # made by an earlier invocation
        else:
            code, seconds = lion("stage", "imitation", "--config", str(config), log=out / f"seed-{seed}" / "base.log")
        runs[seed] = {"base": {"dir": str(base), "code": code, "seconds": seconds}}
        print(f"seed {seed}: first imitation exit {code} in {seconds:.0f} s", flush=True)
        for arm in arms if code == 0 else []:
            directory = out / f"seed-{seed}" / arm
            if not (directory / "state.json").exists():
                shutil.copytree(base, directory)
            data.update(run_dir=str(directory))
            data["discrimination"]["signal"] = arm
            config = write_config(out / f"seed-{seed}" / f"{arm}.yaml", data)
            code, seconds = lion("run", "--config", str(config), "--accept-change", "discrimination.signal",
                                 log=out / f"seed-{seed}" / f"{arm}.log")
            runs[seed][arm] = {"dir": str(directory), "code": code, "seconds": seconds}
            print(f"seed {seed}: arm {arm} exit {code} in {seconds:.0f} s", flush=True)
    return runs


def cost(run_dir: Path) -> dict:
    totals = {role: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0} for role in ROLES}
    for path in run_dir.glob("*/report.json"):
        roles = json.loads(path.read_text()).get("roles", {})
        for role in ROLES:
            for key in totals[role]:
                totals[role][key] += roles.get(role, {}).get(key, 0)
    return totals


def interval(differences: list[float]) -> str:
    if len(differences) < 2:
        return f"{differences[0]:+.3f} (one seed: no interval)" if differences else "-"
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = T_975[len(differences) - 1] * sd / len(differences) ** 0.5
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def report(out: Path, runs: dict, arms: list[str], held: list[tuple[dict, str]]) -> dict:
    figures: dict = {"held_out_answers": len(held), "initial": nll(ROOT / "models/smollm2-135m/student", held), "seeds": {}}
    for seed, by_arm in runs.items():
        base = Path(by_arm["base"]["dir"]) / "iter_1" / "student"
        row = {"iter_1": nll(base, held) if base.is_dir() else None}
        for arm in arms:
            final = Path(by_arm.get(arm, {}).get("dir", "/nonexistent")) / "final" / "student"
            row[arm] = nll(final, held) if final.is_dir() else None
            row[f"{arm}_cost"] = cost(final.parent.parent) if final.is_dir() else None
            row[f"{arm}_seconds"] = by_arm.get(arm, {}).get("seconds")
        figures["seeds"][seed] = row
    print(f"\nheld-out NLL per token of {len(held)} complete teacher answers; initial student {figures['initial']:.3f}")
    print(f"{'seed':<6}{'iter_1':>9}" + "".join(f"{arm:>12}" for arm in arms))
    for seed, row in figures["seeds"].items():
        print(f"{seed:<6}{_f(row['iter_1']):>9}" + "".join(f"{_f(row[arm]):>12}" for arm in arms))
    print(f"\n{'arm':<12}{'final NLL mean':>15}{'sd':>8}   gap to none, paired by seed [95% t interval]")
    for arm in arms:
        values = [row[arm] for row in figures["seeds"].values() if row[arm] is not None]
        paired = [row[arm] - row["none"] for row in figures["seeds"].values()
                  if row[arm] is not None and row.get("none") is not None]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        gap = interval(paired) if arm != "none" else ""
        print(f"{arm:<12}{_f(statistics.fmean(values) if values else None):>15}{sd:>8.3f}   {gap}")
        figures.setdefault("arms", {})[arm] = {"mean": statistics.fmean(values) if values else None, "sd": sd, "gap_to_none": gap}
    print(f"\n{'arm':<12}" + "".join(f"{role + ' calls':>17}" for role in ROLES) + f"{'tokens':>12}{'wall s':>9}  (mean per run)")
    for arm in arms:
        costs = [row[f"{arm}_cost"] for row in figures["seeds"].values() if row[f"{arm}_cost"]]
        seconds = [row[f"{arm}_seconds"] for row in figures["seeds"].values() if row[f"{arm}_seconds"]]
        calls = [statistics.fmean(c[role]["calls"] for c in costs) if costs else 0 for role in ROLES]
        tokens = statistics.fmean(sum(c[r]["prompt_tokens"] + c[r]["completion_tokens"] for r in ROLES) for c in costs) if costs else 0
        print(f"{arm:<12}" + "".join(f"{value:>17.1f}" for value in calls) + f"{tokens:>12.0f}{_f(statistics.fmean(seconds) if seconds else None, 0):>9}")
    return figures


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/loop-effect")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--new", type=int, default=32, help="generation.new_per_iteration of every run")
    parser.add_argument("--held-out", type=int, default=48, help="instructions from real_instructions.jsonl")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    process, url = serve_teacher(out)
    try:
        held = teacher_answers(url, held_out_items(args.held_out), out / "held_out_answers.jsonl")
        print(f"teacher up at {url}; {len(held)} complete held-out answers", flush=True)
        runs = run_arms(out, url, args.seeds, args.arms, args.new)
    finally:
        process.terminate()
        process.wait(timeout=120)
    figures = report(out, runs, args.arms, held)
    figures["runs"] = runs
    (out / "loop_effect.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    finished = [by_arm[arm]["dir"] for by_arm in runs.values() for arm in args.arms if by_arm.get(arm, {}).get("code") == 0]
    if len(finished) > 1:
        subprocess.run([*LION, "compare", *finished, "--out", str(out / "compare")], check=False)
    print(f"\nwhole benchmark: {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
