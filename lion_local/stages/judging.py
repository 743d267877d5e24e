"""Judging a teacher answer against a student answer: the one pipeline of discrimination and evaluate.

Each pair is reviewed twice by the referee, teacher first and student first, to cancel the
referee's position bias. A reply the parser cannot read (or one cut at the length limit right
after a number, which may be a score cut short) is asked again, up to `retries` more times per
order; every reply is journaled the moment it arrives, readable or not, so a killed run resumes
without asking anything twice.

The arithmetic, per pair, from the first readable reply of each order:
    teacher_score = (teacher_first[0] + student_first[1]) / 2
    student_score = (teacher_first[1] + student_first[0]) / 2
    gap = teacher_score - student_score
A pair without a readable reply in either order is not judged. A judged pair is position
consistent when both orders name the same better answer (or both a tie); the share of pairs that
are not shows how much the referee's verdicts depend on where an answer stands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lion_local.config import Config, RefereeRole
from lion_local.endpoints.client import EndpointClient
from lion_local.run.identity import identity_digest
from lion_local.run.record_types import Judgement, PairScores, ReviewOrder, ReviewReply
from lion_local.stages.run_identity import run_identity
from lion_local.endpoints.journaled import call_fields, journal_key
from lion_local.roles import ask_referee, read_review, referee_identity

ORDERS: tuple[ReviewOrder, ...] = ("teacher_first", "student_first")


@dataclass(frozen=True)
class AnswerPair:
    """What one judgement compares: a question and the teacher's and the student's answers."""

    id: str
    instruction: str
    input: str
    teacher: str
    student: str


def referee_fingerprint(config: Config, server: str) -> str:
    """What a review depends on besides its pair: the judging server's model and how it is served, the
    referee's prompts, mode and request fields, and the run seed. Every journaled review carries it,
    so a review asked under other settings (a mode changed on resume) is asked again, not reused."""
    served = identity_digest(run_identity(config), (f"servers.{server}.",))
    return journal_key(served, referee_identity(config.roles.referee), config.seed)


# ----------------------------------------------------------------------------------------------
# Decisions (pure)
# ----------------------------------------------------------------------------------------------


def current_reviews(reviews: list[ReviewReply], field: str, fingerprint: str) -> list[ReviewReply]:
    """The journaled replies asked under `fingerprint` (their `field`); the others are kept but not read."""
    return [review for review in reviews if review.get(field) == fingerprint]


def pending_reviews(ids: list[str], reviews: list[ReviewReply], retries: int) -> list[tuple[str, ReviewOrder, int]]:
    """(id, order, next attempt) for each review of `ids` not yet read nor given up on."""
    attempts: Counter[tuple[str, str]] = Counter((review["id"], review["order"]) for review in reviews)
    readable = {(review["id"], review["order"]) for review in reviews if review["scores"] is not None}
    return [
        (pair_id, order, attempts[(pair_id, order)])
        for pair_id in ids
        for order in ORDERS
        if (pair_id, order) not in readable and attempts[(pair_id, order)] <= retries
    ]


def first_readable(reviews: list[ReviewReply]) -> dict[tuple[str, str], list[float]]:
    """(id, order) -> the scores of its first readable reply."""
    found: dict[tuple[str, str], list[float]] = {}
    for review in reviews:
        if review["scores"] is not None:
            found.setdefault((review["id"], review["order"]), review["scores"])
    return found


def _better(first: float, second: float) -> int:
    return (first > second) - (first < second)


def pair_scores(teacher_first: list[float], student_first: list[float]) -> PairScores:
    """Each model's mean over both orders, the gap, and whether the orders agree on the winner."""
    teacher_score = (teacher_first[0] + student_first[1]) / 2
    student_score = (teacher_first[1] + student_first[0]) / 2
    return {
        "teacher_score": teacher_score,
        "student_score": student_score,
        "gap": teacher_score - student_score,
        "position_consistent": _better(*teacher_first) == _better(student_first[1], student_first[0]),
        "teacher_first": teacher_first,
        "student_first": student_first,
    }


def judged_pairs(ids: list[str], reviews: list[ReviewReply]) -> dict[str, PairScores]:
    """id -> pair_scores for every id with a readable reply in both orders."""
    readable = first_readable(reviews)
    judged: dict[str, PairScores] = {}
    for pair_id in ids:
        teacher_first = readable.get((pair_id, "teacher_first"))
        student_first = readable.get((pair_id, "student_first"))
        if teacher_first is not None and student_first is not None:
            judged[pair_id] = pair_scores(teacher_first, student_first)
    return judged


def label_counts(judgements: list[Judgement]) -> dict:
    """The hard, easy and unjudged counts of a discrimination's judgements (any signal), and the unjudged share."""
    labels = Counter(j["label"] for j in judgements)
    return {
        "hard": labels.get("hard", 0),
        "easy": labels.get("easy", 0),
        "unjudged": labels.get("unjudged", 0),
        "unjudged_share": round(labels.get("unjudged", 0) / len(judgements), 4) if judgements else None,
    }


def inconsistent_share(judged: list[PairScores]) -> float | None:
    """The share of judged pairs whose two orders disagree on the better answer (None: none judged)."""
    if not judged:
        return None
    return round(sum(1 for scores in judged if not scores["position_consistent"]) / len(judged), 4)


# ----------------------------------------------------------------------------------------------
# The calls
# ----------------------------------------------------------------------------------------------


def review_call(
    client: EndpointClient,
    role: RefereeRole,
    pair: AnswerPair,
    order: ReviewOrder,
    first_attempt: int,
    retries: int,
    seed_of: Callable[[str, str, int], int],
    record: Callable[[ReviewReply], None],
    extra: dict | None = None,
) -> Callable[[], Awaitable[None]]:
    """One order's review of `pair`, asked again while unreadable; every reply goes to `record` (a
    journal's append) with `extra`, e.g. the key of what it depends on. seed_of(id, order, attempt)
    gives each seed."""

    async def ask() -> None:
        first, second = (pair.teacher, pair.student) if order == "teacher_first" else (pair.student, pair.teacher)
        for attempt in range(first_attempt, retries + 1):
            seed = seed_of(pair.id, order, attempt)
            completion = await ask_referee(client, role, pair.instruction, pair.input, first, second, seed=seed)
            scores = read_review(completion, role)
            record(
                {
                    "id": pair.id,
                    "order": order,
                    "attempt": attempt,
                    "raw": completion.text,
                    "scores": list(scores) if scores is not None else None,
                    **(extra or {}),
                    **call_fields(completion, seed),
                }
            )
            if scores is not None:
                return

    return ask
