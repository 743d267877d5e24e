"""Control-plane scaling benchmark: the parts of lion-local whose cost grows with the Cache Pool.

    python benchmarks/control_plane.py [--base 70000] [--factors 1,3,10] [--parts a,b,...]
                                       [--candidates 300] [--generated 6000] [--json PATH]
                                       [--no-memory] [--fail-superlinear]

For each size N = base x factor (default 70K = the paper's 52K seeds + 3 x 6K generated; so 70K,
210K and 700K) it synthesizes, in a temporary directory removed afterwards, the run directory of
one finished iteration whose Cache Pool holds N instructions, in the formats a real run writes:
iter_1/{cache,train}_pool.jsonl, student_answers.jsonl (N), reviews.jsonl (2N, plus 1% retried
unreadable replies), judgements.jsonl, generated.jsonl and generator_calls.jsonl (--generated),
rejected.jsonl, the stage summaries and report.json, teacher_answers.jsonl (N), state.json,
servers.jsonl and config.yaml. Everything is drawn from random.Random(0): instructions are 8-20
words over a Zipf-weighted vocabulary of about 4,000 made-up words and a few common ones, so the
novelty index's inverted lists have realistic shapes. Synthesis is never timed.

Then it times, with the package's own functions (one row each, N in brackets):
  journal_replay    Journal() on reviews (2N), student answers (N) and teacher_answers (N)
  pending_scan      pending_reviews over half of the reviews, teacher_answers.uncached, by_id
  pools             pools_from for iteration 2 (N + generated), write_jsonl_atomic, read_jsonl
  novelty_build     NoveltyIndex(0.7).add for the N pool instructions
  novelty_check     per candidate: index.check, adding the novel ones (as _Decisions.decide);
                    a third of the candidates are pool texts with a word or two changed
  judge             discrimination.judge(tau=1.0) and summarize over all the reviews
  iteration_report  iteration_report(RunDir, Iteration(1)) on the synthesized run
  plan              build_plan for configs/paper-scale-cpu.yaml (3 iterations) on the run
  plan_fresh        the same config on an empty run directory, --seeds N
  report            write_report (report.md and the plots); not expected to grow with N

Each figure is the median over repetitions (as many as make 0.2 s), each run after 64 MiB of
other data has gone through the CPU caches (a stage calls these functions once, cold), with
tracemalloc off; the memory column is the peak of tracemalloc over one further
run of the part (--no-memory skips it). The synthesized objects are frozen out of the cyclic
garbage collector (gc.freeze) so a part pays only for the objects it makes itself. Per part, b
is the least-squares slope of log(time) against log(N); b <= 1.15 reads "linear or better".
The default run takes several minutes on 2 cores (synthesizing and tracing 700K dominate).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from lion_local.commands.plan import build_plan  # noqa: E402
from lion_local.commands.report import write_report  # noqa: E402
from lion_local.commands.report_plots import make_plots  # noqa: E402
from lion_local.config import Config, config_to_yaml, load_config  # noqa: E402
from lion_local.run.layout import Iteration, RunDir  # noqa: E402
from lion_local.run.records import by_id, instruction_record, pools_from  # noqa: E402
from lion_local.run.state import Journal, mark_completed, read_jsonl, write_atomic, write_jsonl_atomic  # noqa: E402
from lion_local.stages.teacher_answers import uncached  # noqa: E402
from lion_local.stages.discrimination import judge, summarize  # noqa: E402
from lion_local.stages.iteration_report import iteration_report, write_iteration_report  # noqa: E402
from lion_local.stages.judging import pending_reviews  # noqa: E402
from lion_local.stages.novelty import NoveltyIndex  # noqa: E402

PARTS = ("journal_replay", "pending_scan", "pools", "novelty", "judge", "iteration_report", "plan", "report")
ROWS = {"novelty": ("novelty_build", "novelty_check"), "plan": ("plan", "plan_fresh")}
LINEAR = 1.15
COMMON = "the a of to and in for is on that with as by this be are from or an it at your".split()
VERBS = "Write Explain Describe List Summarize Compare Give Suggest Classify Rewrite Create Outline".split()
_EVICT = np.zeros(64 * 2**20 // 8)  # twice a 32 MiB L3 cache, written before each timed run
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "er", "in", "or", "ul", "ex"]


# ----------------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------------


class Words:
    """A Zipf-weighted vocabulary: a few common words first, then made-up ones."""

    def __init__(self, rng: random.Random, size: int = 4000) -> None:
        made_up: set[str] = set()
        while len(made_up) < size:
            made_up.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
        ordered = sorted(made_up)
        rng.shuffle(ordered)
        self.words = COMMON + ordered
        self.cumulative = list(_cumulative(1.0 / (rank + 1) for rank in range(len(self.words))))

    def some(self, rng: random.Random, low: int, high: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cumulative, k=rng.randint(low, high))

    def instruction(self, rng: random.Random) -> str:
        return " ".join([rng.choice(VERBS), *self.some(rng, 7, 19)]) + "."


def _cumulative(weights):
    total = 0.0
    for weight in weights:
        total += weight
        yield total


@dataclass
class Synthetic:
    """One synthesized run directory and the records written into it, kept for the parts."""

    root: Path
    cache: list[dict]
    generated: list[dict]
    student: list[dict]
    teacher: list[dict]
    reviews: list[dict]
    candidates: list[str]


def _fresh_records(rng, words, count, known, origin, parents) -> list[dict]:
    """`count` instruction records with ids not in `known` (which they join); 30% have an input."""
    records = []
    while len(records) < count:
        extra = " ".join(words.some(rng, 3, 10)) if rng.random() < 0.3 else ""
        parent = rng.choice(parents) if parents else None
        iteration = 0 if origin == "seed" else 1
        side = origin if origin != "any" else rng.choice(("hard", "easy"))
        record = instruction_record(words.instruction(rng), extra, side, iteration, parent)
        if record["id"] not in known:
            known.add(record["id"])
            records.append(record)
    return records


def _answers(rng: random.Random, words: Words, cache: list[dict]) -> tuple[list[dict], list[dict]]:
    """The student's answers and the teacher's (run-wide cache) answers of every pool instruction."""
    student_texts = [" ".join(words.some(rng, 5, 25)) for _ in range(2048)]
    teacher_texts = [" ".join(words.some(rng, 30, 60)).capitalize() + "." for _ in range(2048)]
    student, teacher = [], []
    for record in cache:
        student.append({
            "id": record["id"], "answer": rng.choice(student_texts), "finish_reason": rng.choice(("stop", "length")),
            "seed": rng.getrandbits(31), "prompt_tokens": rng.randint(80, 160), "completion_tokens": rng.randint(4, 32),
            "seconds": round(rng.uniform(0.1, 0.9), 4),
        })
        teacher.append({
            "id": record["id"], "answer": rng.choice(teacher_texts), "empty": False, "fingerprint": "5ef8b2a9cbd96df5",
            "stage": "1/imitation", "finish_reason": "stop", "seed": rng.getrandbits(31),
            "prompt_tokens": rng.randint(12, 40), "completion_tokens": rng.randint(20, 64), "seconds": round(rng.uniform(0.05, 0.3), 4),
        })
    return student, teacher


def _reviews(rng: random.Random, words: Words, cache: list[dict]) -> list[dict]:
    """Both orders' referee replies per instruction; 1% of them unreadable at first, then asked again."""
    topics = [" ".join(words.some(rng, 2, 5)) for _ in range(1024)]
    reviews, retried = [], []

    def reply(pair_id: str, order: str, attempt: int, readable: bool) -> dict:
        first, second = float(rng.randint(1, 10)), float(rng.randint(1, 10))
        scores = f"Score of Assistant 1: {first:g}\nScore of Assistant 2: {second:g}" if readable else "Score: unclear"
        return {
            "id": pair_id, "order": order, "attempt": attempt,
            "raw": f"Both answers address {rng.choice(topics)}. Assistant 1 is more helpful.\n{scores}",
            "scores": [first, second] if readable else None, "finish_reason": "stop", "seed": rng.getrandbits(31),
            "prompt_tokens": rng.randint(150, 260), "completion_tokens": rng.randint(15, 25), "seconds": round(rng.uniform(0.1, 0.5), 4),
        }

    for record in cache:
        for order in ("teacher_first", "student_first"):
            readable = rng.random() >= 0.01
            reviews.append(reply(record["id"], order, 0, readable))
            if not readable:
                retried.append(reply(record["id"], order, 1, True))
    return reviews + retried


def _generation(rng, generated: list[dict], labels: dict) -> tuple[list[dict], list[dict], dict]:
    """The generator's journal, the rejected replies and generation.json for `generated`."""
    calls, rejected = [], []
    reasons = ("too_short", "banned_word", "too_similar", "quota_reached")
    for attempt, record in enumerate(generated):
        calls.append({"side": record["origin"], "attempt": attempt, "parent": record["parent"], "raw": record["instruction"],
                      "finish_reason": "stop", "seed": rng.getrandbits(31), "prompt_tokens": rng.randint(80, 110),
                      "completion_tokens": rng.randint(5, 30), "seconds": round(rng.uniform(0.01, 0.05), 4)})
        if rng.random() < 0.1:
            raw = record["instruction"].split()[0] + " it."
            rejected.append({"instruction": raw, "reason": rng.choice(reasons), "side": record["origin"],
                             "attempt": attempt, "parent": record["parent"], "raw": raw})
    accepted = {side: sum(r["origin"] == side for r in generated) for side in ("hard", "easy")}
    by_reason = {reason: sum(r["reason"] == reason for r in rejected) for reason in reasons}
    summary = {
        "wanted": len(generated), "quota": accepted, "accepted": {**accepted, "total": len(generated)},
        "rejected": by_reason, "rejected_total": len(rejected), "calls": {s: len(generated) for s in accepted},
        "budget": {s: 2 * len(generated) for s in accepted}, "shortfall": {"hard": 0, "easy": 0, "total": 0},
        "seeds": {"hard": labels.get("hard", 0), "easy": labels.get("easy", 0)}, "notes": [],
    }
    return calls, rejected, summary


def _candidates(rng: random.Random, words: Words, cache: list[dict], count: int) -> list[str]:
    """Generator replies to check: two thirds new instructions, one third pool texts lightly edited."""
    texts = []
    for index in range(count):
        if index % 3 == 2:
            tokens = rng.choice(cache)["instruction"].split()
            for _ in range(rng.randint(1, 2)):
                tokens[rng.randrange(1, len(tokens))] = rng.choice(words.words)
            texts.append(" ".join(tokens))
        else:
            texts.append(words.instruction(rng))
    return texts


def synthesize(root: Path, config: Config, size: int, generated_count: int, candidates: int) -> Synthetic:
    """Write a finished iteration 1 with a Cache Pool of `size` under `root`; return its records."""
    rng = random.Random(0)
    words = Words(rng)
    known: set[str] = set()
    cache = _fresh_records(rng, words, size, known, "seed", None)
    generated = _fresh_records(rng, words, generated_count, known, "any", [r["id"] for r in cache])
    student, teacher = _answers(rng, words, cache)
    reviews = _reviews(rng, words, cache)
    data = Synthetic(root, cache, generated, student, teacher, reviews, _candidates(rng, words, cache, candidates))
    _write_run(rng, data, config)
    return data


def _write_run(rng: random.Random, data: Synthetic, config: Config) -> None:
    run = RunDir(data.root)
    directory = run.iteration(1)
    write_atomic(run.config_yaml, config_to_yaml(config))
    for path, records in ((directory.cache_pool, data.cache), (directory.train_pool, data.cache),
                          (directory.student_answers, data.student), (directory.reviews, data.reviews),
                          (run.teacher_answers, data.teacher), (directory.generated, data.generated)):
        write_jsonl_atomic(path, records)
    judgements = judge(data.cache, data.reviews, config.discrimination.tau)
    write_jsonl_atomic(directory.judgements, judgements)
    summary = summarize(judgements, data.reviews)
    truncated = sum(r["finish_reason"] == "length" for r in data.student)
    summary.update(cache_pool=len(data.cache), empty_student_answers=0, truncated_student_answers=truncated,
                   empty_teacher_answers=0, truncated_teacher_answers=0)
    write_atomic(directory.discrimination_summary, json.dumps(summary, indent=2) + "\n")
    calls, rejected, generation = _generation(rng, data.generated, summary)
    write_jsonl_atomic(directory.generator_calls, calls)
    write_jsonl_atomic(directory.rejected, rejected)
    write_atomic(directory.generation_summary, json.dumps(generation, indent=2) + "\n")
    training = {"examples": len(data.cache), "steps": math.ceil(len(data.cache) / 64), "train_loss": 2.5, "device": "cpu"}
    imitation = {"train_pool": len(data.cache), "empty_teacher_answers": 0, "truncated_teacher_answers": 0,
                 "base_checkpoint": "models/tiny/student", "examples": len(data.cache), "training": training}
    write_atomic(directory.imitation_summary, json.dumps(imitation, indent=2) + "\n")
    with Journal(run.servers_journal) as servers:
        for name, engine in (("student", "vllm 0.32.0"), ("teacher", "external")):
            servers.append({"server": name, "engine": engine, "model": None, "base_url": "http://127.0.0.1:1/v1",
                            "started_at": "2026-01-01T00:00:00+0000"})
    for stage in ("imitation", "discrimination", "generation"):
        mark_completed(run, Iteration(1).stage(stage), round(rng.uniform(10, 1000), 3))
    write_iteration_report(run, Iteration(1))


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def timed(part: Callable[[], object], minimum_s: float = 0.2, cap: int = 25) -> float:
    """Median seconds of one run of `part`, repeated until the runs add up to `minimum_s`.

    Before each run the CPU caches are filled with other data, as they are when a stage calls
    the function once: otherwise a small size would run from a warm cache and a large one not,
    and the fitted exponent would measure the cache, not the code."""
    times: list[float] = []
    while sum(times) < minimum_s and len(times) < cap:
        evict_caches()
        start = time.perf_counter()
        part()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evict_caches() -> None:
    np.add(_EVICT, 1.0, out=_EVICT)


def traced(part: Callable[[], object]) -> tuple[float, object]:
    """(peak MiB that tracemalloc saw during one run of `part`, what it returned)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = part()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / 2**20, result


def simple_parts(data: Synthetic, fresh: Config, run_config: Config, scratch: Path) -> dict[str, Callable[[], object]]:
    """The parts measured as one call each, by row name, their inputs prepared here (not timed)."""
    run = RunDir(data.root)
    directory = run.iteration(1)
    half = {r["id"] for r in data.cache[: len(data.cache) // 2]}
    half_reviews = [r for r in data.reviews if r["id"] in half]
    cached = {r["id"]: r for r in data.teacher if r["id"] in half}

    def journal_replay() -> int:
        with Journal(directory.reviews) as a, Journal(directory.student_answers) as b, Journal(run.teacher_answers) as c:
            return len(a.records) + len(b.records) + len(c.records)

    def pending_scan() -> int:
        ids = [record["id"] for record in data.cache]
        return len(pending_reviews(ids, half_reviews, retries=3)) + len(uncached(data.cache, cached)) + len(by_id(data.student))

    def pools() -> int:
        _, cache = pools_from(Iteration(2), [], data.cache, data.generated)
        write_jsonl_atomic(scratch / "cache_pool.jsonl", cache)
        return len(read_jsonl(scratch / "cache_pool.jsonl"))

    return {
        "journal_replay": journal_replay,
        "pending_scan": pending_scan,
        "pools": pools,
        "judge": lambda: summarize(judge(data.cache, data.reviews, tau=1.0), data.reviews),
        "iteration_report": lambda: iteration_report(run, Iteration(1)),
        "plan": lambda: build_plan(run_config, seeds=len(data.cache)),
        "plan_fresh": lambda: build_plan(fresh, seeds=len(data.cache)),
        "report": lambda: write_report(run, make_plots),
    }


def novelty_rows(data: Synthetic, memory: bool) -> dict[str, tuple[float, float | None]]:
    """novelty_build (seconds for N adds) and novelty_check (seconds per candidate)."""

    def build() -> NoveltyIndex:
        index = NoveltyIndex(0.7)
        for record in data.cache:
            index.add(record["instruction"])
        return index

    def check(index: NoveltyIndex) -> int:
        accepted = 0
        for text in data.candidates:
            if index.check(text)[0]:
                index.add(text)
                accepted += 1
        return accepted

    evict_caches()
    start = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - start
    evict_caches()
    start = time.perf_counter()
    check(index)
    check_s = (time.perf_counter() - start) / max(1, len(data.candidates))
    del index
    build_mib = check_mib = None
    if memory:
        build_mib, index = traced(build)
        check_mib, _ = traced(lambda: check(index))
        del index
    return {"novelty_build": (build_s, build_mib), "novelty_check": (check_s, check_mib)}


def load_configs(root: Path, empty: Path) -> tuple[Config, Config]:
    """The paper-scale config on the synthesized run and on an empty run directory."""
    path = REPO / "configs/paper-scale-cpu.yaml"
    absent_seeds = f"seed_data={empty / 'absent-seeds.jsonl'}"
    run_config = load_config(path, [f"run_dir={root}", absent_seeds])
    fresh = load_config(path, [f"run_dir={empty / 'run'}", absent_seeds])
    return run_config, fresh


def measure_size(size: int, args: argparse.Namespace, rows: list[str]) -> dict[str, tuple[float, float | None]]:
    """Synthesize a run of `size`, measure every selected row, remove the run."""
    results: dict[str, tuple[float, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="lion-control-plane-") as temporary:
        root, empty, scratch = (Path(temporary) / name for name in ("run", "empty", "scratch"))
        scratch.mkdir()
        run_config, fresh = load_configs(root, empty)
        start = time.perf_counter()
        data = synthesize(root, run_config, size, args.generated, args.candidates)
        print(f"N = {size:,}: synthesized in {time.perf_counter() - start:.1f} s", flush=True)
        gc.collect()
        gc.freeze()  # the synthesized records are not the parts' garbage to scan
        try:
            parts = simple_parts(data, fresh, run_config, scratch)
            for row in rows:
                if row in parts:
                    seconds = timed(parts[row])
                    results[row] = (seconds, traced(parts[row])[0] if args.memory else None)
                elif row == "novelty_build":
                    results.update(novelty_rows(data, args.memory))
        finally:
            del data
            gc.unfreeze()
            gc.collect()
    return results


# ----------------------------------------------------------------------------------------------
# Fitting and the table
# ----------------------------------------------------------------------------------------------


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope b of log(seconds) = a + b log(N); None with fewer than two sizes."""
    if len(set(sizes)) < 2:
        return None
    xs = [math.log(n) for n in sizes]
    ys = [math.log(max(s, 1e-12)) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def verdict(exponent: float | None) -> str:
    if exponent is None:
        return "n/a"
    return "linear or better" if exponent <= LINEAR else "superlinear"


def _short(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 10**6 and n % 10**5 == 0 else f"{n / 1e3:g}K" if n >= 1000 else str(n)


def table(sizes: list[int], figures: dict[str, dict]) -> list[str]:
    """One line per row: time at each size (ms per candidate for novelty_check), MiB, b, verdict."""
    labels = [_short(n) for n in sizes]
    header = [f"{'part':<27}", *(f"{'t@' + s:>10}" for s in labels), *(f"{'MiB@' + s:>10}" for s in labels), f"{'b':>6}", "  verdict"]
    lines = ["".join(header), "-" * len("".join(header))]
    for name, figure in figures.items():
        scale, unit = (1e3, "ms/candidate") if name == "novelty_check" else (1.0, "s")
        times = [f"{s * scale:>10.4g}" for s in figure["seconds"]]
        mib = [f"{m:>10.1f}" if m is not None else f"{'-':>10}" for m in figure["mib"]]
        b = f"{figure['exponent']:>6.2f}" if figure["exponent"] is not None else f"{'-':>6}"
        lines.append(f"{name + ' (' + unit + ')':<27}" + "".join(times + mib) + b + "  " + figure["verdict"])
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=70_000, help="Cache Pool size at factor 1 (default 70000)")
    parser.add_argument("--factors", default="1,3,10", help="comma-separated multiples of --base (default 1,3,10)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--candidates", type=int, default=300, help="novelty candidates checked per size (default 300)")
    parser.add_argument("--generated", type=int, default=6000, help="instructions generated in iteration 1 (default 6000)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the tracemalloc runs")
    parser.add_argument("--fail-superlinear", action="store_true", help="exit 1 when any part is superlinear")
    args = parser.parse_args(argv)
    args.factors = [int(f) if f.is_integer() else f for f in (float(f) for f in args.factors.split(",") if f.strip())]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts or not args.factors or args.base < 1 or min(args.factors) <= 0:
        parser.error(f"--parts takes {','.join(PARTS)} (unknown: {','.join(unknown)}); --base and --factors must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [max(1, round(args.base * factor)) for factor in args.factors]
    rows = [row for part in PARTS if part in args.parts for row in ROWS.get(part, (part,))]
    if "report" in rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  (its first import is not the report's cost)
    measured = [measure_size(size, args, rows) for size in sizes]
    figures = {}
    for row in rows:
        seconds = [each[row][0] for each in measured]
        exponent = growth_exponent(sizes, seconds)
        figures[row] = {"seconds": seconds, "mib": [each[row][1] for each in measured],
                        "exponent": exponent, "verdict": verdict(exponent)}
    print()
    print("\n".join(table(sizes, figures)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmachine: {cores} cores, python {sys.version.split()[0]}")
    print(f"process peak RSS: {rss_mib:,.0f} MiB")
    if args.json:
        document = {"base": args.base, "factors": args.factors, "sizes": sizes, "candidates": args.candidates,
                    "generated": args.generated, "parts": figures, "peak_rss_mib": round(rss_mib, 1),
                    "machine": {"cores": cores, "python": sys.version.split()[0]}}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    superlinear = [row for row, figure in figures.items() if figure["verdict"] == "superlinear"]
    if superlinear:
        print(f"superlinear: {', '.join(superlinear)}")
    return 1 if superlinear and args.fail_superlinear else 0


if __name__ == "__main__":
    sys.exit(main())
