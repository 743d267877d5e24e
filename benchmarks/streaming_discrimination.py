"""Streaming discrimination against the sequential order, on a fake endpoint with fixed latencies.

    .venv/bin/python benchmarks/streaming_discrimination.py [--instructions 64] [--student-s 0.2] [--referee-s 0.2]

Runs the real discrimination stage twice on the same Cache Pool: with discrimination.stream_reviews
(an instruction's reviews go out as soon as its student answer is in) and without (every student
answer first, then the reviews). The endpoint is tests/fake_endpoint.py: each student and referee
reply is held back a fixed time, four requests in flight per server, so the difference is the
overlap of the two servers' work alone. Prints both wall times, their ratio, and whether the two
runs' judgements are identical.
"""

from __future__ import annotations

import asyncio
import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_endpoint import FakeEndpoint, FakeServers  # noqa: E402

from lion_local.config import load_config  # noqa: E402
from lion_local.stages.discrimination import run_discrimination  # noqa: E402
from lion_local.run.records import instruction_record  # noqa: E402
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.state import read_jsonl, write_jsonl_atomic  # noqa: E402

_QUESTION = re.compile(r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n", re.DOTALL)


def referee(body: dict) -> tuple[str, str]:
    """Scores that depend only on the question and which answer comes first."""
    match = _QUESTION.search(body["messages"][-1]["content"])
    teacher, student = 5 + len(match["question"]) % 5, 3 + len(match["question"]) % 4
    first, second = (teacher, student) if match["first"].startswith("TEACHER:") else (student, teacher)
    return f"A short review.\nScore of Assistant 1: {first}\nScore of Assistant 2: {second}", "stop"


def one_run(fake: FakeEndpoint, directory: Path, pool: list[dict], stream: bool) -> tuple[float, list[dict]]:
    config = load_config(ROOT / "configs/tiny-cpu.yaml", [f"run_dir={directory}", f"discrimination.stream_reviews={str(stream).lower()}"])
    run = RunDir(config.run_dir)
    write_jsonl_atomic(run.iteration(1) / "train_pool.jsonl", pool)
    write_jsonl_atomic(run.iteration(1) / "cache_pool.jsonl", pool)
    run.iteration(1).student.mkdir(parents=True)
    (run.iteration(1).student / "config.json").write_text("{}")
    (run.iteration(1).student / "model.safetensors").write_bytes(b"")
    started = time.monotonic()
    asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))
    return time.monotonic() - started, read_jsonl(run.iteration(1) / "judgements.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=64)
    parser.add_argument("--student-s", type=float, default=0.2, help="latency of each student reply")
    parser.add_argument("--referee-s", type=float, default=0.2, help="latency of each referee reply")
    args = parser.parse_args()
    pool = [instruction_record(f"Explain idea number {n} to a curious child.", "", "seed", 0, None) for n in range(args.instructions)]
    fake = FakeEndpoint()
    fake.start()
    fake.handlers["teacher"] = lambda body: ("TEACHER: " + body["messages"][-1]["content"], "stop")
    fake.handlers["student"] = lambda body: ("STUDENT: an answer", "stop")
    fake.handlers["referee"] = referee
    fake.latency_s.update(student=args.student_s, referee=args.referee_s)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            one_run(fake, Path(scratch) / "warm-up", pool[:4], stream=True)  # imports and first connections
            sequential_s, sequential = one_run(fake, Path(scratch) / "sequential", pool, stream=False)
            streamed_s, streamed = one_run(fake, Path(scratch) / "streamed", pool, stream=True)
    finally:
        fake.stop()
    print(f"{args.instructions} instructions, {2 * args.instructions} reviews; student {args.student_s} s and "
          f"referee {args.referee_s} s per reply, 4 in flight per server")
    print(f"sequential (answers, then reviews): {sequential_s:.2f} s")
    print(f"streamed (reviews as answers come in): {streamed_s:.2f} s")
    print(f"sequential / streamed wall time: {sequential_s / streamed_s:.2f}x")
    print(f"judgements identical: {streamed == sequential}")


if __name__ == "__main__":
    main()
