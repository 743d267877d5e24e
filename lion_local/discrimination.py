"""Stage 2, discrimination: find the Cache Pool instructions where the student trails the teacher.

    lion-local stage discrimination --config X

The new student checkpoint is served; it answers every Cache Pool instruction; the teacher's
answers come from the run-wide cache (only missing ones are requested). The referee reviews
each pair twice, teacher first and student first, to cancel position bias; each model's score
is the mean of its two scores, the gap is teacher minus student, and an instruction is hard
when the gap is at least tau. A review the parser cannot read (or one cut at the length limit
right after a number, which may be a score cut short) is asked again up to
roles.referee.parse_retries times; after that the instruction is unjudged: never hard, never
easy, and counted.

Journals: student_answers.jsonl (one line per answer) and reviews.jsonl (one line per referee
reply, readable or not). judgements.jsonl is derived from them and written whole at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from contextlib import AsyncExitStack
from statistics import fmean

from lion_local.config import Config
from lion_local.endpoint import EndpointClient
from lion_local.imitation import is_checkpoint
from lion_local.journaled_calls import call_all, call_fields
from lion_local.records import pools_for, request_seed
from lion_local.roles import ask_referee, ask_student, read_review
from lion_local.run_state import Journal, RunDir, StageOrderError, write_atomic, write_jsonl_atomic
from lion_local.teacher_cache import ensure_teacher_answers
from lion_local.servers import ServerSet

logger = logging.getLogger(__name__)

ORDERS = ("teacher_first", "student_first")


def run_discrimination(config: Config, run: RunDir, k: int, servers: ServerSet) -> dict:
    """Run (or finish) discrimination k, write judgements.jsonl, and return the stage summary."""
    directory = run.iteration(k)
    _, cache_pool = pools_for(config, run, k)
    student_dir = run.student(k)
    if not is_checkpoint(student_dir):
        raise StageOrderError(f"{k}/discrimination needs the student of {k}/imitation at {student_dir}; run imitation first")

    teacher_answers, student_answers, reviews = asyncio.run(_collect(config, run, k, cache_pool, servers))
    servers.stop(config.roles.student.server)  # the next iteration serves a new checkpoint

    judgements = judge(cache_pool, reviews, config.discrimination.tau)
    write_jsonl_atomic(directory / "judgements.jsonl", judgements)

    summary = summarize(judgements, reviews)
    summary["cache_pool"] = len(cache_pool)
    summary["empty_student_answers"] = sum(1 for r in cache_pool if not student_answers[r["id"]]["answer"].strip())
    summary["truncated_student_answers"] = sum(
        1 for r in cache_pool if student_answers[r["id"]]["finish_reason"] == "length"
    )
    summary["empty_teacher_answers"] = sum(1 for r in cache_pool if teacher_answers[r["id"]]["empty"])
    summary["truncated_teacher_answers"] = sum(
        1 for r in cache_pool if teacher_answers[r["id"]]["finish_reason"] == "length"
    )
    write_atomic(directory / "discrimination.json", json.dumps(summary, indent=2) + "\n")
    return summary


async def _collect(
    config: Config, run: RunDir, k: int, cache_pool: list[dict], servers: ServerSet
) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """Teacher answers and student answers by id, and every review, for the whole Cache Pool."""
    directory = run.iteration(k)
    marker = f"{k}/discrimination"
    roles = config.roles
    with Journal(directory / "student_answers.jsonl") as student_journal, Journal(directory / "reviews.jsonl") as reviews:
        answered = {record["id"] for record in student_journal.records}
        need_student = [record for record in cache_pool if record["id"] not in answered]
        pending_reviews = _pending_reviews(cache_pool, reviews.records, roles.referee.parse_retries)

        async with AsyncExitStack() as stack:
            clients: dict[str, EndpointClient] = {}

            async def client(role: str) -> EndpointClient:
                name = getattr(roles, role).server
                if name not in clients:
                    model = str(run.student(k)) if role == "student" else None
                    clients[name] = await stack.enter_async_context(await servers.open_client(name, model))
                return clients[name]

            # The student's new checkpoint and the referee load side by side.
            wanted = {roles.student.server: str(run.student(k))} if need_student else {}
            if pending_reviews:
                wanted.setdefault(roles.referee.server, None)
            await servers.start_async(wanted)
            student_client = await client("student") if need_student else None
            referee_client = await client("referee") if pending_reviews else None

            def student_call(record: dict):
                async def ask() -> dict:
                    seed = request_seed(config.seed, "student", k, record["id"])
                    completion = await ask_student(
                        student_client, roles.student, record["instruction"], record["input"], seed=seed
                    )
                    return {
                        "id": record["id"],
                        "answer": completion.text,
                        **call_fields(completion, seed),
                    }

                return ask

            _, teacher_answers = await asyncio.gather(
                call_all([student_call(r) for r in need_student], student_journal, f"{marker}: student answers"),
                ensure_teacher_answers(run, config, cache_pool, lambda: client("teacher"), marker),
            )
            student_answers = {record["id"]: record for record in student_journal.records}

            def review_call(record: dict, order: str, first_attempt: int):
                async def ask() -> None:
                    teacher = teacher_answers[record["id"]]["answer"]
                    student = student_answers[record["id"]]["answer"]
                    first, second = (teacher, student) if order == "teacher_first" else (student, teacher)
                    for attempt in range(first_attempt, roles.referee.parse_retries + 1):
                        seed = request_seed(config.seed, "referee", k, record["id"], order, attempt)
                        completion = await ask_referee(
                            referee_client, roles.referee, record["instruction"], record["input"], first, second, seed=seed
                        )
                        scores = read_review(completion.text, completion.finish_reason)
                        reviews.append(
                            {
                                "id": record["id"],
                                "order": order,
                                "attempt": attempt,
                                "raw": completion.text,
                                "scores": list(scores) if scores is not None else None,
                                **call_fields(completion, seed),
                            }
                        )
                        if scores is not None:
                            return None
                    return None

                return ask

            calls = [review_call(record, order, attempt) for record, order, attempt in pending_reviews]
            await call_all(calls, reviews, f"{marker}: reviews")
    return teacher_answers, student_answers, reviews.records


def _pending_reviews(cache_pool: list[dict], reviews: list[dict], parse_retries: int) -> list[tuple[dict, str, int]]:
    """(record, order, next attempt) for each review not yet read nor given up on."""
    attempts: Counter[tuple[str, str]] = Counter()
    readable: set[tuple[str, str]] = set()
    for review in reviews:
        key = (review["id"], review["order"])
        attempts[key] += 1
        if review["scores"] is not None:
            readable.add(key)
    pending = []
    for record in cache_pool:
        for order in ORDERS:
            key = (record["id"], order)
            if key not in readable and attempts[key] <= parse_retries:
                pending.append((record, order, attempts[key]))
    return pending


def judge(cache_pool: list[dict], reviews: list[dict], tau: float) -> list[dict]:
    """One judgement per Cache Pool instruction from its two readable reviews (or unjudged)."""
    scores: dict[tuple[str, str], list[float]] = {}
    for review in reviews:
        if review["scores"] is not None:
            scores.setdefault((review["id"], review["order"]), review["scores"])
    judgements = []
    for record in cache_pool:
        teacher_first = scores.get((record["id"], "teacher_first"))
        student_first = scores.get((record["id"], "student_first"))
        if teacher_first is None or student_first is None:
            judgements.append(
                {"id": record["id"], "teacher_score": None, "student_score": None, "gap": None, "label": "unjudged"}
            )
            continue
        teacher_score = (teacher_first[0] + student_first[1]) / 2
        student_score = (teacher_first[1] + student_first[0]) / 2
        gap = teacher_score - student_score
        judgements.append(
            {
                "id": record["id"],
                "teacher_score": teacher_score,
                "student_score": student_score,
                "gap": gap,
                "label": "hard" if gap >= tau else "easy",
                "teacher_first": teacher_first,
                "student_first": student_first,
            }
        )
    return judgements


def gap_histogram(gaps: list[float]) -> list[dict]:
    """Counts of gaps in unit-wide bins [i, i+1) from -9 to 9 (a gap of 9 goes in the last bin)."""
    counts = Counter(min(8, max(-9, math.floor(gap))) for gap in gaps)
    return [{"from": low, "to": low + 1, "count": counts.get(low, 0)} for low in range(-9, 9)]


def summarize(judgements: list[dict], reviews: list[dict]) -> dict:
    judged = [j for j in judgements if j["label"] != "unjudged"]
    labels = Counter(j["label"] for j in judgements)
    return {
        "hard": labels.get("hard", 0),
        "easy": labels.get("easy", 0),
        "unjudged": labels.get("unjudged", 0),
        "mean_teacher_score": round(fmean(j["teacher_score"] for j in judged), 4) if judged else None,
        "mean_student_score": round(fmean(j["student_score"] for j in judged), 4) if judged else None,
        "mean_gap": round(fmean(j["gap"] for j in judged), 4) if judged else None,
        "gap_histogram": gap_histogram([j["gap"] for j in judged]),
        "referee_replies": len(reviews),
        "unreadable_referee_replies": sum(1 for r in reviews if r["scores"] is None),
    }
