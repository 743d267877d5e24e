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

Before any Cache Pool pair is reviewed, the referee reviews discrimination.referee_check.control_pairs
control pairs, whose better side is known (lion_local/stages/referee_health.py); when it leaves too
many unjudged or prefers the real answer too rarely, the stage stops with one line saying so (exit
1), its journals kept. After the last review the same holds for the Cache Pool's unjudged share.
Every review carries the referee's fingerprint (judging.referee_fingerprint): a stage resumed with
another referee mode, prompt or model asks its reviews again, and reuses every other answer.

That is discrimination.signal `referee` (the paper's). With `likelihood` an instruction's gap is the
student's mean NLL per token of the teacher's answer, hard above a quantile of the pool's gaps
(lion_local.stages.likelihood_gaps); with `none` nothing is judged and every instruction is labelled
`any`, a seed of either side of generation (the baseline). Neither asks the student for an answer
or the referee for a review.

Journals: student_answers.jsonl (one line per answer), reviews.jsonl (one line per referee reply,
readable or not) and controls.jsonl (the control pairs' replies). judgements.jsonl is derived
from them and written whole at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from statistics import fmean

from lion_local.config import Config
from lion_local.endpoints.client import EndpointClient
from lion_local.stages.likelihood_gaps import likelihood_gaps, likelihood_judgements, likelihood_summary
from lion_local.endpoints.journaled import call_all, call_fields
from lion_local.stages.judging import (
    AnswerPair, current_reviews, inconsistent_share, judged_pairs, label_counts, pending_reviews, referee_fingerprint,
    review_call,
)
from lion_local.stages.truncation import truncated, warn_truncated
from lion_local.stages.referee_health import (
    ControlPair, RefereeCheckError, control_figures, control_pairs, pool_problem, referee_problem,
)
from lion_local.run.records import pools_for, request_seed
from lion_local.roles import ask_student
from lion_local.errors import StageOrderError
from lion_local.run.layout import Iteration, IterationDir, RunDir, is_checkpoint
from lion_local.run.record_types import (
    DiscriminationSummary, HistogramBin, InstructionRecord, Judgement, RefereeFigures, ReviewReply, StudentAnswer, TeacherAnswer,
)
from lion_local.run.state import Journal, write_atomic, write_jsonl_atomic
from lion_local.stages.teacher_answers import ensure_teacher_answers
from lion_local.endpoints.servers import ServerSet

logger = logging.getLogger(__name__)


async def run_discrimination(config: Config, run: RunDir, iteration: Iteration, servers: ServerSet) -> DiscriminationSummary:
    """Run (or finish) an iteration's discrimination, write judgements.jsonl, and return the stage summary."""
    directory = run.at(iteration)
    _, cache_pool = pools_for(config, run, iteration)
    if not is_checkpoint(directory.student):
        raise StageOrderError(
            f"{iteration.stage('discrimination')} needs the student of {iteration.stage('imitation')} at "
            f"{directory.student}; run imitation first"
        )

    if config.discrimination.signal != "referee":
        return await _without_referee(config, run, iteration, cache_pool, servers)
    teacher_answers, student_answers, reviews, controls = await _collect(config, run, iteration, cache_pool, servers)
    await servers.stop(config.roles.student.server)  # the next iteration serves a new checkpoint

    judgements = judge(cache_pool, reviews, config.discrimination.tau)
    summary = summarize(judgements, reviews)
    problem = pool_problem(summary["unjudged"], len(cache_pool), config.discrimination.referee_check,
                           config.roles.referee.mode, str(iteration.stage("discrimination")))
    if problem is not None:
        raise RefereeCheckError(problem)
    write_jsonl_atomic(directory.judgements, judgements)

    summary["referee_check"] = controls
    summary["empty_student_answers"] = sum(1 for r in cache_pool if not student_answers[r["id"]]["answer"].strip())
    # A student that never stops is a student still learning, not a budget to raise: counted only.
    summary["truncated_student_answers"] = truncated([student_answers[r["id"]] for r in cache_pool])
    return _finish(config, iteration, directory, cache_pool, teacher_answers, summary)


async def _without_referee(
    config: Config, run: RunDir, iteration: Iteration, cache_pool: list[InstructionRecord], servers: ServerSet
) -> DiscriminationSummary:
    """signal likelihood (lion_local.stages.likelihood_gaps) or none: no student answer, no review.
    With none, every Cache Pool instruction is labelled `any`: a seed of either side (generation)."""
    directory = run.at(iteration)
    if config.discrimination.signal == "none":
        judgements = [{"id": r["id"], "teacher_score": None, "student_score": None, "gap": None, "label": "any"} for r in cache_pool]
        write_jsonl_atomic(directory.judgements, judgements)
        return _finish(config, iteration, directory, cache_pool, None,
                       {"signal": "none", "hard": 0, "easy": 0, "unjudged": 0, "any": len(cache_pool), "referee_check": None})
    teacher_answers, gaps, method = await likelihood_gaps(config, run, iteration, cache_pool, servers)
    q = config.discrimination.likelihood_quantile
    judgements, threshold = likelihood_judgements(cache_pool, {i: r["gap"] for i, r in gaps.items()}, q)
    write_jsonl_atomic(directory.judgements, judgements)
    summary = likelihood_summary(judgements, threshold, q, method)
    logger.info("%s: likelihood gaps: %d hard above %s (quantile %s), %d easy, %d unjudged", iteration.stage("discrimination"),
                summary["hard"], threshold, q, summary["easy"], summary["unjudged"])
    return _finish(config, iteration, directory, cache_pool, teacher_answers, summary)


def _finish(config: Config, iteration: Iteration, directory: IterationDir, cache_pool: list[InstructionRecord],
            teacher_answers: dict[str, TeacherAnswer] | None, summary: dict) -> DiscriminationSummary:
    """The teacher answers' counts, then discrimination.json (the judgements are written)."""
    summary["cache_pool"] = len(cache_pool)
    if teacher_answers is not None:
        summary["empty_teacher_answers"] = sum(1 for r in cache_pool if teacher_answers[r["id"]]["empty"])
        summary["truncated_teacher_answers"] = warn_truncated(
            str(iteration.stage("discrimination")), "teacher", [teacher_answers[r["id"]] for r in cache_pool],
            config.roles.teacher.warn_truncated_share, "roles.teacher.max_tokens",
        )
    write_atomic(directory.discrimination_summary, json.dumps(summary, indent=2) + "\n")
    return summary


async def _collect(
    config: Config, run: RunDir, iteration: Iteration, cache_pool: list[InstructionRecord], servers: ServerSet
) -> tuple[dict[str, TeacherAnswer], dict[str, StudentAnswer], list[ReviewReply], RefereeFigures]:
    """Teacher answers and student answers by id, the current reviews of the whole Cache Pool, and
    the control pairs' figures."""
    directory = run.at(iteration)
    with Journal(directory.student_answers) as student_journal, Journal(directory.controls) as control_journal:
        calls = _Calls(config, run, iteration, servers, student_journal, control_journal)
        need_student = [record for record in cache_pool if record["id"] not in calls.student_answers]
        async with AsyncExitStack() as stack:
            # A checkpoint takes tens of seconds to load, so the student's server is launched before
            # the longest journal (the reviews) is read; the referee's loads beside it, and the
            # reviews of instructions already answered (a resumed stage) go out while it loads.
            student = calls.client(stack, "student") if need_student else None
            await asyncio.sleep(0)  # the student's start runs up to its wait: its process is launched
            try:
                with Journal(directory.reviews) as reviews:
                    calls.reviews = reviews
                    ids = [record["id"] for record in cache_pool]
                    current = current_reviews(reviews.records, "referee", calls.fingerprint)
                    for pair_id, order, attempt in pending_reviews(ids, current, config.roles.referee.parse_retries):
                        calls.pending.setdefault(pair_id, []).append((order, attempt))
                    referee = calls.client(stack, "referee") if calls.pending else None
                    calls.unanswered = len(need_student)
                    calls.teacher = asyncio.ensure_future(
                        ensure_teacher_answers(run, config, cache_pool, lambda: calls.client(stack, "teacher"), calls.marker)
                    )
                    calls.check = lambda: calls.check_referee(cache_pool, lambda: calls.client(stack, "referee"))
                    await calls.run_all(cache_pool, need_student, student, referee)
                    teacher_answers, figures = await calls.teacher, await calls.start_gate()
            finally:
                pending = [*calls.clients.values(), *(task for task in (calls.teacher, calls.gate) if task is not None)]
                for each in pending:
                    each.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
    return teacher_answers, calls.student_answers, current_reviews(reviews.records, "referee", calls.fingerprint), figures


class _Calls:
    """The model calls of one discrimination, each journaled as it returns."""

    def __init__(
        self,
        config: Config,
        run: RunDir,
        iteration: Iteration,
        servers: ServerSet,
        student_journal: Journal,
        control_journal: Journal,
    ) -> None:
        self.config, self.servers = config, servers
        self.k = iteration.number  # in the request seeds
        self.student_dir = run.at(iteration).student
        self.marker = iteration.stage("discrimination")
        self.student_journal, self.control_journal = student_journal, control_journal
        self.fingerprint = referee_fingerprint(config, config.roles.referee.server)
        self.reviews: Journal  # opened once the student's server is launching
        self.check: Callable[[], Awaitable[RefereeFigures]]  # reviews the control pairs (set once the reviews journal is open)
        self.gate: asyncio.Future[RefereeFigures] | None = None  # the control pairs' figures, once they pass
        self.student_answers: dict[str, StudentAnswer] = {record["id"]: record for record in student_journal.records}
        self.pending: dict[str, list[tuple[str, int]]] = {}  # id -> (order, next attempt) of each review due
        self.clients: dict[str, asyncio.Future[EndpointClient]] = {}  # by server name, opened once
        self.unanswered = 0
        self.teacher: asyncio.Future[dict[str, TeacherAnswer]] | None = None

    def client(self, stack: AsyncExitStack, role: str) -> asyncio.Future[EndpointClient]:
        """The client of a role's server, opened (its server started) at the first ask, in the background."""
        name = getattr(self.config.roles, role).server
        if name not in self.clients:
            model = str(self.student_dir) if role == "student" else None

            async def open_client() -> EndpointClient:
                return await stack.enter_async_context(await self.servers.open_client(name, model))

            self.clients[name] = asyncio.ensure_future(open_client())
        return self.clients[name]

    async def run_all(
        self,
        cache_pool: list[InstructionRecord],
        need_student: list[InstructionRecord],
        student: asyncio.Future[EndpointClient] | None,
        referee: asyncio.Future[EndpointClient] | None,
    ) -> None:
        self.student_client, self.referee_client = student, referee
        if self.config.discrimination.stream_reviews:
            # The control pairs go first, beside the student's answers; an instruction's two reviews are
            # sent as soon as its student answer is in and the referee has passed its check.
            self.start_gate()
            work = [r for r in cache_pool if r["id"] not in self.student_answers or r["id"] in self.pending]
            await call_all([lambda r=r: self.answer_then_review(r) for r in work], self.reviews,
                           f"{self.marker}: student answers and reviews", unit="instruction")
        else:
            await call_all([lambda r=r: self.student_answer(r) for r in need_student], self.student_journal,
                           f"{self.marker}: student answers")
            await call_all([lambda r=r: self.review(r) for r in cache_pool if r["id"] in self.pending], self.reviews,
                           f"{self.marker}: reviews", unit="instruction")

    def start_gate(self) -> asyncio.Future[RefereeFigures]:
        """The referee's check on its control pairs, started at the first call."""
        if self.gate is None:
            self.gate = asyncio.ensure_future(self.check())
        return self.gate

    async def answer_then_review(self, record: InstructionRecord) -> None:
        if record["id"] not in self.student_answers:
            await self.student_answer(record)
        await self.review(record)

    async def student_answer(self, record: InstructionRecord) -> None:
        role = self.config.roles.student
        seed = request_seed(self.config.seed, "student", self.k, record["id"])
        completion = await ask_student(await self.student_client, role, record["instruction"], record["input"], seed=seed)
        answer = {"id": record["id"], "answer": completion.text, **call_fields(completion, seed)}
        self.student_journal.append(answer)
        self.student_answers[record["id"]] = answer
        self.unanswered -= 1
        if self.unanswered == 0:  # the last answer is in: its server (its GPUs) is not needed any more
            await self.servers.stop(role.server)

    async def review(self, record: InstructionRecord) -> None:
        """Both orders' reviews of one instruction that are still due, once the referee passed its check."""
        role = self.config.roles.referee
        pair = AnswerPair(
            record["id"], record["instruction"], record["input"],
            (await self.teacher)[record["id"]]["answer"], self.student_answers[record["id"]]["answer"],
        )
        seed_of = lambda *key: request_seed(self.config.seed, "referee", self.k, *key)  # noqa: E731
        await self.start_gate()  # after every student answer when they come first (stream_reviews off)
        client = await self.referee_client
        await asyncio.gather(*(
            review_call(client, role, pair, order, attempt, role.parse_retries, seed_of, self.reviews.append,
                        extra={"referee": self.fingerprint})()
            for order, attempt in self.pending.get(record["id"], [])
        ))

    async def check_referee(self, cache_pool: list[InstructionRecord], connect) -> RefereeFigures:
        """Review the control pairs still due and return their figures; raise when they cross a bound."""
        role, check = self.config.roles.referee, self.config.discrimination.referee_check
        teacher = await self.teacher
        answers = {pair_id: answer["answer"] for pair_id, answer in teacher.items() if not answer["empty"]}
        controls = control_pairs(cache_pool, answers, check.control_pairs, self.config.seed)
        due = pending_reviews(
            [c.pair.id for c in controls], current_reviews(self.control_journal.records, "referee", self.fingerprint),
            role.parse_retries,
        )
        if due:
            client = await connect()
            by_id = {c.pair.id: c for c in controls}
            seed_of = lambda *key: request_seed(self.config.seed, "referee-control", self.k, *key)  # noqa: E731

            def call(control: ControlPair, order: str, attempt: int):
                extra = {"kind": control.kind, "referee": self.fingerprint}
                return review_call(client, role, control.pair, order, attempt, role.parse_retries, seed_of,
                                   self.control_journal.append, extra)

            await call_all([call(by_id[i], order, attempt) for i, order, attempt in due], self.control_journal,
                           f"{self.marker}: control pairs")
        figures = control_figures(controls, current_reviews(self.control_journal.records, "referee", self.fingerprint))
        problem = referee_problem(figures, check, role.mode, str(self.marker))
        if problem is not None:
            raise RefereeCheckError(problem)
        logger.info("%s: referee on %d control pairs: accuracy %s, position consistent %s, unjudged %s",
                    self.marker, figures["pairs"], figures["accuracy"], figures["position_consistent_share"],
                    figures["unjudged_share"])
        return figures


def judge(cache_pool: list[InstructionRecord], reviews: list[ReviewReply], tau: float) -> list[Judgement]:
    """One judgement per Cache Pool instruction from its two readable reviews (or unjudged)."""
    judged = judged_pairs([record["id"] for record in cache_pool], reviews)
    judgements = []
    for record in cache_pool:
        scores = judged.get(record["id"])
        if scores is None:
            judgements.append(
                {"id": record["id"], "teacher_score": None, "student_score": None, "gap": None, "label": "unjudged"}
            )
            continue
        label = "hard" if scores["gap"] >= tau else "easy"
        judgements.append({"id": record["id"], **scores, "label": label})
    return judgements


def gap_histogram(gaps: list[float]) -> list[HistogramBin]:
    """Counts of gaps in unit-wide bins [i, i+1) from -9 to 9 (a gap of 9 goes in the last bin)."""
    counts = Counter(min(8, max(-9, math.floor(gap))) for gap in gaps)
    return [{"from": low, "to": low + 1, "count": counts.get(low, 0)} for low in range(-9, 9)]


def summarize(judgements: list[Judgement], reviews: list[ReviewReply]) -> dict:
    judged = [j for j in judgements if j["label"] != "unjudged"]
    return {
        "signal": "referee",
        **label_counts(judgements),
        "mean_teacher_score": round(fmean(j["teacher_score"] for j in judged), 4) if judged else None,
        "mean_student_score": round(fmean(j["student_score"] for j in judged), 4) if judged else None,
        "mean_gap": round(fmean(j["gap"] for j in judged), 4) if judged else None,
        "gap_histogram": gap_histogram([j["gap"] for j in judged]),
        "position_inconsistent_share": inconsistent_share(judged),
        "referee_replies": len(reviews),
        "unreadable_referee_replies": sum(1 for r in reviews if r["scores"] is None),
    }
