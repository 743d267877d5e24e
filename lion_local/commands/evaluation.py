"""The paper's relative-score evaluation: each student checkpoint against the teacher.

    lion-local evaluate --config X [--iteration K] [--questions FILE]

The teacher and each student checkpoint (iter_<k>/student and final/student: every one that
exists, or only that of --iteration K) answer a question set: --questions FILE, else
evaluation.questions, else the built-in lion_local/data/eval_questions.jsonl. A judge
(evaluation.judge_server, by default the referee's server) reviews each teacher/student pair with
the referee's mode, prompt and sampling parameters, in both orders, through discrimination's own
pipeline (lion_local/stages/judging.py: retries, up to evaluation.parse_retries, default the referee's;
a question's two scores).

The arithmetic (the student's total score as a percentage of the teacher's) is in
lion_local/commands/evaluation_results.py.

Beside the judged score, each checkpoint gets a judge-free one, and so does the initial student
(servers.<student>.model, eval/initial/): its NLL per token of the teacher's answers to the
questions and to evaluation.held_out_seeds unused seed instructions, with the teacher's own figure
beside it (lion_local/commands/evaluation_likelihood.py), in result.json under "likelihood".

Files, all under <run_dir>/eval/ (the run itself is never modified; server logs go to logs/):
    teacher_answers.jsonl               the teacher's answers, shared by every checkpoint
    teacher_likelihood.jsonl            the teacher's NLL of each of its answers
    <checkpoint>/student_answers.jsonl  the answers of iter_<k>/student or final/student
    <checkpoint>/judgements.jsonl       every judge reply: {"id", "order", "attempt", "raw", "scores", ...}
    <checkpoint>/likelihood.jsonl       the checkpoint's NLL of each teacher answer
    <checkpoint>/result.json            the totals, relative scores and likelihood, written whole at the end
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
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from lion_local.commands.evaluation_results import relative_scores, summary_line
from lion_local.commands.evaluation_likelihood import checkpoint_likelihood, held_out_seeds, teacher_likelihood
from lion_local.config import Config
from lion_local.endpoints.access import check_access, check_models_exist
from lion_local.endpoints.client import EndpointClient
from lion_local.endpoints.journaled import ask_missing, call_all, call_fields, journal_key, journaled_by_key
from lion_local.stages.decontamination import question_files
from lion_local.stages.judging import AnswerPair, pending_reviews, referee_fingerprint, review_call
from lion_local.run.questions import default_questions, load_questions
from lion_local.run.records import request_seed
from lion_local.roles import ask_student, ask_teacher
from lion_local.errors import StageOrderError
from lion_local.run.layout import FINAL, INITIAL, EvaluationDir, Iteration, RunDir, is_checkpoint
from lion_local.run.log import run_log
from lion_local.run.record_types import EvalJudgement, EvalStudentAnswer, EvalTeacherAnswer, EvaluationResult, NllFigures, Question
from lion_local.run.state import Journal, run_lock, write_atomic
from lion_local.stages.run_identity import role_fingerprint
from lion_local.stages.teacher_answers import answer_fields, teacher_fingerprint
from lion_local.endpoints.servers import ServerSet
from lion_local.smoke.tiny_models import ensure_tiny_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    iteration: Iteration | None  # None: the initial student, measured by its likelihood only
    path: Path

    @property
    def name(self) -> str:
        """"initial", "iter_1", ..., "final": also its directory under <run_dir>/eval/."""
        return INITIAL if self.iteration is None else self.iteration.dirname


# ----------------------------------------------------------------------------------------------
# The command: check every input, then evaluate under the run's writer lock
# ----------------------------------------------------------------------------------------------


def evaluate(config: Config, iteration: Iteration | None = None, questions_path: str | None = None) -> list[EvaluationResult]:
    """`lion-local evaluate`: the result of each checkpoint evaluated (see the module docstring)."""

    run = RunDir(config.run_dir)
    path = Path(questions_path or config.evaluation.questions or default_questions())
    questions = load_questions(path)
    warn_if_not_decontaminated(config, path)
    checkpoints = select_checkpoints(run, iteration)
    if iteration is None and config.evaluation.likelihood:
        checkpoints.insert(0, Checkpoint(None, Path(str(config.server_for("student").model))))
    # The student's own model is needed only for the initial student's likelihood.
    initial = [config.roles.student.server] if iteration is None and config.evaluation.likelihood else []
    check_models_exist(config, [config.roles.teacher.server, judge_server(config), *initial])
    for name in {config.roles.teacher.server, config.roles.student.server, judge_server(config)}:
        check_access(config, name)
    held_out = held_out_seeds(config, run) if config.evaluation.likelihood else []
    with run_lock(run):
        ensure_tiny_models(config)
        with run_log(run):
            return asyncio.run(_evaluate_with_servers(config, run, checkpoints, questions, held_out))


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


async def _evaluate_with_servers(
    config: Config, run: RunDir, checkpoints: list[Checkpoint], questions: list[Question], held_out: list[Question]
) -> list[EvaluationResult]:
    """run_evaluation in the command's one event loop, with the servers kept across checkpoints."""
    async with ServerSet(config, run.logs) as servers:
        return await run_evaluation(config, run, checkpoints, questions, servers, held_out)


async def run_evaluation(
    config: Config,
    run: RunDir,
    checkpoints: list[Checkpoint],
    questions: list[Question],
    servers: ServerSet,
    held_out: list[Question] = (),
) -> list[EvaluationResult]:
    """Evaluate each checkpoint in turn, write its result.json, and return the results."""
    held_out = list(held_out)
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

        items = questions + held_out
        teacher_client = lambda: client(config.roles.teacher.server)  # noqa: E731
        with Journal(run.eval_teacher_answers) as journal, Journal(run.eval_teacher_likelihood) as teacher_nll:
            # The teacher answers (then scores its own answers) while the first checkpoint's student works.
            teacher = asyncio.ensure_future(_teacher_answers(config, items, journal, teacher_client))

            async def own_likelihood() -> NllFigures | None:
                if not config.evaluation.likelihood:
                    return None
                return await teacher_likelihood(config, items, await teacher, teacher_nll, teacher_client)

            figure = asyncio.ensure_future(own_likelihood())
            # Each checkpoint's student works on its own server, stopped when done; the judge then
            # reviews its answers while the next checkpoint's server starts and answers.
            finishing: list[asyncio.Future[EvaluationResult]] = []
            try:
                for checkpoint in checkpoints:
                    directory = run.evaluation(checkpoint.iteration)
                    with Journal(directory.student_answers) as answers, Journal(directory.likelihood) as nll:
                        asked = [] if checkpoint.iteration is None else questions  # the initial student: NLL only
                        work = await _student_work(config, checkpoint, asked, items, teacher, answers, nll, servers)
                    finishing.append(asyncio.ensure_future(
                        _finish(config, run, checkpoint, questions, teacher, figure, work, client)
                    ))
                for each in finishing:
                    results.append(await each)
            finally:
                for task in (teacher, figure, *finishing):
                    task.cancel()
                await asyncio.gather(teacher, figure, *finishing, return_exceptions=True)
    return results


async def _finish(
    config: Config,
    run: RunDir,
    checkpoint: Checkpoint,
    questions: list[Question],
    teacher: Awaitable[dict[str, EvalTeacherAnswer]],
    figure: Awaitable[NllFigures | None],
    work: tuple[dict[str, EvalStudentAnswer], NllFigures | None],
    client: Callable[[str], Awaitable[EndpointClient]],
) -> EvaluationResult:
    """One checkpoint's judgements (none for the initial student) and its result.json."""
    directory = run.evaluation(checkpoint.iteration)
    student_answers, likelihood = work
    initial = checkpoint.iteration is None
    result = {"checkpoint": checkpoint.name, "iteration": INITIAL if initial else checkpoint.iteration.json_value}
    if not initial:
        result.update(await _judged(config, directory, checkpoint, questions, await teacher, student_answers, client))
    if likelihood is not None:
        result["likelihood"] = {**likelihood, "teacher": await figure}
    write_atomic(directory.result, json.dumps(result, indent=2) + "\n")
    logger.info("evaluation: %s", summary_line(result))
    return result


async def _judged(
    config: Config,
    directory: EvaluationDir,
    checkpoint: Checkpoint,
    questions: list[Question],
    teacher_answers: dict[str, EvalTeacherAnswer],
    student_answers: dict[str, EvalStudentAnswer],
    client: Callable[[str], Awaitable[EndpointClient]],
) -> dict:
    """The judge's reviews of each question's pair in both orders, and the relative scores."""
    judge = judge_server(config)
    pairs = {q["id"]: (teacher_answers[q["id"]]["answer"], student_answers[q["id"]]["answer"]) for q in questions}
    identity = referee_fingerprint(config, judge)
    keys = {q["id"]: journal_key(identity, q["question"], *pairs[q["id"]]) for q in questions}
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
                journal.append, extra={"key": keys[qid]},
            )

        calls = [judge_call(qid, order, attempt) for qid, order, attempt in pending]
        await call_all(calls, journal, f"evaluation {checkpoint.name}: judgements")
        return {"judge": judge, **relative_scores(questions, _current(journal, keys))}


async def _teacher_answers(
    config: Config, questions: list[Question], journal: Journal, connect: Callable[[], Awaitable[EndpointClient]]
) -> dict[str, EvalTeacherAnswer]:
    """The teacher's answer to every question by id, asking only for those not journaled."""
    fingerprint = teacher_fingerprint(config)
    # A held-out seed instruction may carry an input; a question does not.
    keys = {q["id"]: journal_key(fingerprint, q["question"], *([q["input"]] if q.get("input") else [])) for q in questions}
    answers = journaled_by_key(journal.records, keys)
    missing = [q["id"] for q in questions if q["id"] not in answers]
    logger.info("evaluation: teacher answers: %d of %d journaled", len(questions) - len(missing), len(questions))
    by_id = {q["id"]: q for q in questions}

    async def ask(teacher: EndpointClient, question_id: str) -> EvalTeacherAnswer:
        question = by_id[question_id]
        seed = request_seed(config.seed, "evaluation-teacher", question_id)
        completion = await ask_teacher(teacher, config.roles.teacher, question["question"], question.get("input", ""), seed=seed)
        return {"id": question_id, **answer_fields(completion), "key": keys[question_id], **call_fields(completion, seed)}

    await ask_missing(missing, answers, journal, connect, ask, "evaluation: teacher answers")
    return answers


async def _student_work(
    config: Config,
    checkpoint: Checkpoint,
    questions: list[Question],
    items: list[Question],
    teacher: Awaitable[dict[str, EvalTeacherAnswer]],
    journal: Journal,
    nll_journal: Journal,
    servers: ServerSet,
) -> tuple[dict[str, EvalStudentAnswer], NllFigures | None]:
    """One checkpoint's answer to every question by id, and its likelihood of the teacher's answers;
    its server runs only while an answer or a likelihood is missing."""
    role = config.roles.student
    identity = role_fingerprint(config, "student")  # the checkpoint is this journal's own (eval/<checkpoint>/)
    keys = {q["id"]: journal_key(identity, q["question"]) for q in questions}
    answers = journaled_by_key(journal.records, keys)
    missing = [q["id"] for q in questions if q["id"] not in answers]
    by_id = {q["id"]: q for q in questions}
    logger.info("evaluation %s: student answers: %d of %d journaled", checkpoint.name,
                len(questions) - len(missing), len(questions))
    opened: list[asyncio.Future[EndpointClient]] = []
    async with AsyncExitStack() as stack:

        def start() -> asyncio.Future[EndpointClient]:
            """The checkpoint's server, started at the first need (or the first call)."""
            if not opened:
                opened.append(asyncio.ensure_future(_entered(stack, servers.open_client(role.server, str(checkpoint.path)))))
            return opened[0]

        async def connect() -> EndpointClient:
            return await start()

        if config.evaluation.likelihood and not nll_journal.records and config.servers[role.server].engine == "vllm":
            start()  # a checkpoint not yet measured: its server loads while the teacher may still be answering
        try:

            async def ask(student: EndpointClient, question_id: str) -> EvalStudentAnswer:
                seed = request_seed(config.seed, "evaluation-student", checkpoint.name, question_id)
                completion = await ask_student(student, role, by_id[question_id]["question"], seed=seed)
                return {"id": question_id, "answer": completion.text, "key": keys[question_id], **call_fields(completion, seed)}

            await ask_missing(missing, answers, journal, connect, ask, f"evaluation {checkpoint.name}: student answers")
            likelihood = None
            if config.evaluation.likelihood:
                likelihood = await checkpoint_likelihood(config, str(checkpoint.path), items, await teacher, nll_journal,
                                                         connect)
        finally:
            for opening in opened:
                opening.cancel()  # a server still loading when something failed
            await asyncio.gather(*opened, return_exceptions=True)
            await servers.stop(role.server)  # the next checkpoint is served anew; a local judge may need the GPUs
    return answers, likelihood


async def _entered(stack: AsyncExitStack, opening: Awaitable[EndpointClient]) -> EndpointClient:
    return await stack.enter_async_context(await opening)


def _current(journal: Journal, keys: dict[str, str]) -> list[EvalJudgement]:
    """The journal's records for the questions asked, less those whose key no longer matches."""
    return [r for r in journal.records if r.get("id") in keys and r.get("key") == keys[r["id"]]]

