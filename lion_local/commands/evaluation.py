"""The paper's relative-score evaluation: each student checkpoint against the teacher.

    lion-local evaluate --config X [--iteration K] [--questions FILE]

The teacher and each student checkpoint (iter_<k>/student and final/student: every one that
exists, or only that of --iteration K) answer a question set: --questions FILE, else
evaluation.questions, else the built-in lion_local/data/eval_questions.jsonl. A judge
(evaluation.judge_server, by default the referee's server) reviews each teacher/student pair with
the referee's mode, prompt and sampling parameters, in both orders, through discrimination's own
pipeline (lion_local/stages/judging.py: retries, up to evaluation.parse_retries, default the referee's;
a question's two scores).

The arithmetic, per checkpoint:
- A question left without a readable review in either order is excluded from both totals and
  counted in excluded_questions; every unreadable reply (a retried one too) is counted in
  unparseable_judgements. Unreadable replies never count as scores.
- relative_score = 100 * sum(student_score) / sum(teacher_score) over the judged questions: the
  student's total score as a percentage of the teacher's, rounded to 2 decimals; null when no
  question is judged. The same for each category, over the questions that carry it.

Files, all under <run_dir>/eval/ (the run itself is never modified; server logs go to logs/):
    teacher_answers.jsonl               the teacher's answers, shared by every checkpoint
    <checkpoint>/student_answers.jsonl  the answers of iter_<k>/student or final/student
    <checkpoint>/judgements.jsonl       every judge reply: {"id", "order", "attempt", "raw", "scores", ...}
    <checkpoint>/result.json            the totals and relative scores, written whole at the end
Each call is journaled as it returns, so a killed evaluation resumes without repeating one.
A question set that the run's generation did not decontaminate against (generation.decontamination
off, or the file neither the built-in set with include_builtin_questions nor among its
question_files; compared by resolved path) is evaluated all the same, with a one-line warning.
Every journal line carries a `key`, a hash of what its result depends on (the question text,
the model and its parameters; for a judgement both answers too): a line whose key no longer
matches (a question edited, another teacher or judge configured) is ignored and asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from lion_local.config import Config, check_access, check_models_exist
from lion_local.endpoints.client import EndpointClient
from lion_local.stages.imitation import is_checkpoint
from lion_local.run.journaled_calls import call_all, call_fields
from lion_local.stages.decontamination import question_files
from lion_local.stages.judging import AnswerPair, inconsistent_share, judged_pairs, pending_reviews, review_call
from lion_local.run.questions import default_questions, load_questions
from lion_local.run.records import request_seed
from lion_local.roles import ask_student, ask_teacher, referee_identity
from lion_local.roles.teacher import parse_teacher_answer
from lion_local.errors import StageOrderError
from lion_local.run.identity import identity_digest, run_identity
from lion_local.run.layout import FINAL, Iteration, RunDir
from lion_local.run.state import Journal, run_lock, write_atomic
from lion_local.run.teacher_cache import teacher_fingerprint
from lion_local.endpoints.servers import ServerSet
from lion_local.smoke.tiny_models import ensure_tiny_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    iteration: Iteration
    path: Path

    @property
    def name(self) -> str:
        """"iter_1", ..., "final": also its directory under <run_dir>/eval/."""
        return self.iteration.dirname


# ----------------------------------------------------------------------------------------------
# The command: check every input, then evaluate under the run's writer lock
# ----------------------------------------------------------------------------------------------


def evaluate(config: Config, iteration: Iteration | None = None, questions_path: str | None = None) -> list[dict]:
    """`lion-local evaluate`: the result of each checkpoint evaluated (see the module docstring)."""
    from lion_local.stages.loop import run_log  # the run commands' copy of the log in logs/lion-local.log

    run = RunDir(config.run_dir)
    path = Path(questions_path or config.evaluation.questions or default_questions())
    questions = load_questions(path)
    warn_if_not_decontaminated(config, path)
    checkpoints = select_checkpoints(run, iteration)
    check_models_exist(config, [config.roles.teacher.server, judge_server(config)])
    for name in {config.roles.teacher.server, config.roles.student.server, judge_server(config)}:
        check_access(config, name)
    with run_lock(run):
        ensure_tiny_models(config)
        with run_log(run), ServerSet(config, run.logs) as servers:
            return run_evaluation(config, run, checkpoints, questions, servers)


def warn_if_not_decontaminated(config: Config, path: Path) -> bool:
    """Warn (one line) when the run's generation did not decontaminate against this question file
    (compared by resolved path); True when it warned."""
    if path.expanduser().resolve() in question_files(config):
        return False
    why = "is off" if not config.generation.decontamination.enabled else "did not include this file"
    logger.warning(
        "evaluation: the questions of %s were not part of the run's decontamination (generation.decontamination "
        "%s): generated instructions may paraphrase them and inflate the scores", path, why,
    )
    return True


def judge_server(config: Config) -> str:
    return config.evaluation.judge_server or config.roles.referee.server


def judge_retries(config: Config) -> int:
    retries = config.evaluation.parse_retries
    return config.roles.referee.parse_retries if retries is None else retries


def summary_line(result: dict) -> str:
    """One line per result, e.g.
    iter_1: student at 87.5% of the teacher (40 of 40 questions judged, 0 unparseable judgements)"""
    counts = f"{result['judged']} of {result['questions']} questions judged, {result['unparseable_judgements']} unparseable judgements"
    if result["relative_score"] is None:
        return f"{result['checkpoint']}: no relative score ({counts})"
    return f"{result['checkpoint']}: student at {result['relative_score']:g}% of the teacher ({counts})"


# ----------------------------------------------------------------------------------------------
# Inputs: the checkpoints (the questions: lion_local.run.questions)
# ----------------------------------------------------------------------------------------------


def select_checkpoints(run: RunDir, iteration: Iteration | None = None) -> list[Checkpoint]:
    """The checkpoint of `iteration`, or every finished one in order (iter_1, ..., final)."""
    if iteration is not None:
        checkpoint = _checkpoint(run, iteration)
        if not is_checkpoint(checkpoint.path):
            raise StageOrderError(
                f"{checkpoint.path}: no student checkpoint of iteration {iteration} to evaluate; run its "
                "imitation first (lion-local status shows where the run stands)"
            )
        return [checkpoint]
    found = [c for c in map(lambda k: _checkpoint(run, k), [*run.numbered_iterations(), FINAL]) if is_checkpoint(c.path)]
    if not found:
        raise StageOrderError(
            f"{run.root}: no student checkpoint to evaluate yet; run imitation first (lion-local run or "
            "lion-local stage imitation)"
        )
    return found


def _checkpoint(run: RunDir, iteration: Iteration) -> Checkpoint:
    return Checkpoint(iteration, run.at(iteration).student)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def run_evaluation(
    config: Config, run: RunDir, checkpoints: list[Checkpoint], questions: list[dict], servers: ServerSet
) -> list[dict]:
    """Evaluate each checkpoint in turn, write its result.json, and return the results."""
    return asyncio.run(_evaluate_all(config, run, checkpoints, questions, servers))


async def _evaluate_all(
    config: Config, run: RunDir, checkpoints: list[Checkpoint], questions: list[dict], servers: ServerSet
) -> list[dict]:
    results = []
    async with AsyncExitStack() as stack:
        clients: dict[str, EndpointClient] = {}
        connecting = asyncio.Lock()

        async def client(name: str) -> EndpointClient:
            """The teacher's or the judge's client, opened on first use (a shared server: one client)."""
            async with connecting:
                if name not in clients:
                    clients[name] = await stack.enter_async_context(await servers.open_client(name))
                return clients[name]

        with Journal(run.eval_teacher_answers) as journal:
            # The teacher answers while the first checkpoint's student does.
            teacher = asyncio.ensure_future(
                _teacher_answers(config, questions, journal, lambda: client(config.roles.teacher.server))
            )
            try:
                for checkpoint in checkpoints:
                    result = await _evaluate_checkpoint(config, run, checkpoint, questions, teacher, client, servers)
                    logger.info("evaluation: %s", summary_line(result))
                    results.append(result)
            finally:
                teacher.cancel()
                await asyncio.gather(teacher, return_exceptions=True)
    return results


async def _evaluate_checkpoint(
    config: Config,
    run: RunDir,
    checkpoint: Checkpoint,
    questions: list[dict],
    teacher: Awaitable[dict[str, dict]],
    client: Callable[[str], Awaitable[EndpointClient]],
    servers: ServerSet,
) -> dict:
    directory = run.evaluation(checkpoint.iteration)
    judge = judge_server(config)
    with Journal(directory.student_answers) as student_journal:
        student_answers = await _student_answers(config, checkpoint, questions, student_journal, servers)
    teacher_answers = await teacher
    pairs = {q["id"]: (teacher_answers[q["id"]]["answer"], student_answers[q["id"]]["answer"]) for q in questions}
    identity = _judge_identity(config)
    keys = {q["id"]: _digest(identity, q["question"], *pairs[q["id"]]) for q in questions}
    with Journal(directory.judgements) as journal:
        pending = pending_reviews([q["id"] for q in questions], _current(journal, keys), judge_retries(config))
        logger.info("evaluation %s: %d judgements to request (%s)", checkpoint.name, len(pending), judge)
        judge_client = await client(judge) if pending else None
        by_id = {q["id"]: q for q in questions}

        def judge_call(qid: str, order: str, first_attempt: int):
            pair = AnswerPair(qid, by_id[qid]["question"], "", *pairs[qid])
            return review_call(
                judge_client, config.roles.referee, pair, order, first_attempt, judge_retries(config),
                lambda *key: request_seed(config.seed, "evaluation-judge", checkpoint.name, *key),
                journal, extra={"key": keys[qid]},
            )

        calls = [judge_call(qid, order, attempt) for qid, order, attempt in pending]
        await call_all(calls, journal, f"evaluation {checkpoint.name}: judgements")
        result = {"checkpoint": checkpoint.name, "iteration": checkpoint.iteration.json_value, "judge": judge}
        result.update(relative_scores(questions, _current(journal, keys)))
    write_atomic(directory.result, json.dumps(result, indent=2) + "\n")
    return result


async def _teacher_answers(
    config: Config, questions: list[dict], journal: Journal, connect: Callable[[], Awaitable[EndpointClient]]
) -> dict[str, dict]:
    """The teacher's answer to every question by id, asking only for those not journaled."""
    fingerprint = teacher_fingerprint(config)
    keys = {q["id"]: _digest(fingerprint, q["question"]) for q in questions}
    answers = {r["id"]: r for r in _current(journal, keys)}
    missing = [q for q in questions if q["id"] not in answers]
    logger.info("evaluation: teacher answers: %d of %d journaled", len(questions) - len(missing), len(questions))
    if not missing:
        return answers
    teacher = await connect()

    def call(question: dict):
        async def ask() -> dict:
            seed = request_seed(config.seed, "evaluation-teacher", question["id"])
            completion = await ask_teacher(teacher, config.roles.teacher, question["question"], seed=seed)
            answer = parse_teacher_answer(completion.text)
            return {
                "id": question["id"],
                "answer": answer if answer is not None else "",
                "empty": answer is None,
                "key": keys[question["id"]],
                **call_fields(completion, seed),
            }

        return ask

    await call_all(
        [call(q) for q in missing],
        journal,
        "evaluation: teacher answers",
        on_record=lambda record: answers.__setitem__(record["id"], record),
    )
    return answers


async def _student_answers(
    config: Config, checkpoint: Checkpoint, questions: list[dict], journal: Journal, servers: ServerSet
) -> dict[str, dict]:
    """One checkpoint's answer to every question by id; its server runs only while answers are missing."""
    role = config.roles.student
    identity = _digest(role.prompt_format, role.request_params(), config.seed)
    keys = {q["id"]: _digest(identity, q["question"]) for q in questions}
    answers = {r["id"]: r for r in _current(journal, keys)}
    missing = [q for q in questions if q["id"] not in answers]
    logger.info("evaluation %s: student answers: %d of %d journaled", checkpoint.name,
                len(questions) - len(missing), len(questions))
    if not missing:
        return answers
    try:
        async with await servers.open_client(role.server, str(checkpoint.path)) as student:

            def call(question: dict):
                async def ask() -> dict:
                    seed = request_seed(config.seed, "evaluation-student", checkpoint.name, question["id"])
                    completion = await ask_student(student, role, question["question"], seed=seed)
                    return {
                        "id": question["id"],
                        "answer": completion.text,
                        "key": keys[question["id"]],
                        **call_fields(completion, seed),
                    }

                return ask

            await call_all(
                [call(q) for q in missing],
                journal,
                f"evaluation {checkpoint.name}: student answers",
                on_record=lambda record: answers.__setitem__(record["id"], record),
            )
    finally:
        servers.stop(role.server)  # the next checkpoint is served anew; a local judge may need the GPUs
    return answers


def _current(journal: Journal, keys: dict[str, str]) -> list[dict]:
    """The journal's records for the questions asked, less those whose key no longer matches."""
    return [r for r in journal.records if r.get("id") in keys and r.get("key") == keys[r["id"]]]


def _judge_identity(config: Config) -> str:
    """What a judgement depends on besides its question and answers: the judge model, prompts, mode and parameters."""
    server = identity_digest(run_identity(config), (f"servers.{judge_server(config)}.",))
    return _digest(server, referee_identity(config.roles.referee), config.seed)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------------------------


def relative_scores(questions: list[dict], judgements: list[dict]) -> dict:
    """Counts, totals and relative scores, overall and per category, from one checkpoint's judge
    replies (the arithmetic of the module docstring)."""
    judged = judged_pairs([q["id"] for q in questions], judgements)
    # question id -> (teacher_score, student_score)
    scores = {qid: (pair["teacher_score"], pair["student_score"]) for qid, pair in judged.items()}
    result = {
        "questions": len(questions),
        "judged": len(scores),
        "excluded_questions": len(questions) - len(scores),
        "unparseable_judgements": sum(1 for judgement in judgements if judgement["scores"] is None),
        "position_inconsistent_share": inconsistent_share(list(judged.values())),
        **_totals([scores[q["id"]] for q in questions if q["id"] in scores]),
        "by_category": {},
    }
    for category in dict.fromkeys(q["category"] for q in questions if q["category"]):
        members = [q["id"] for q in questions if q["category"] == category]
        judged = [scores[qid] for qid in members if qid in scores]
        result["by_category"][category] = {"questions": len(members), "judged": len(judged), **_totals(judged)}
    return result


def _totals(pairs: list[tuple[float, float]]) -> dict:
    teacher_total = sum(teacher for teacher, _ in pairs)
    student_total = sum(student for _, student in pairs)
    return {
        "teacher_total": round(teacher_total, 4),
        "student_total": round(student_total, 4),
        "relative_score": round(100 * student_total / teacher_total, 2) if pairs and teacher_total > 0 else None,
    }
