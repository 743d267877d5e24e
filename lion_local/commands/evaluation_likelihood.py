"""The judge-free figure of `lion-local evaluate`: each checkpoint's NLL of the teacher's answers.

Two sets of questions, each answered once by the teacher (eval/teacher_answers.jsonl):
    questions  the evaluation questions
    held_out   evaluation.held_out_seeds seed instructions the run never used: those that follow
               the first seed_limit of seed_data, less any the run's pools hold
For every checkpoint, the initial student (servers.<student>.model) included, the figure is the
mean NLL per answer token (lion_local.stages.likelihood) on each set, next to the teacher's own
figure on the same answers. It needs no judge, so it means the same whatever the referee's quality.
Each answer's figure is journaled the moment it is computed (eval/<checkpoint>/likelihood.jsonl,
eval/teacher_likelihood.jsonl), keyed by the teacher answer it scores and the prompt format, so a
resumed evaluation computes only what is missing and a server starts only when something is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from lion_local.config import Config
from lion_local.endpoints.client import EndpointClient
from lion_local.endpoints.journaled import journal_key, journaled_by_key
from lion_local.run.layout import RunDir
from lion_local.run.record_types import EvalLikelihood, EvalTeacherAnswer, NllFigures, Question
from lion_local.run.records import instruction_id
from lion_local.run.seed_data import load_seed_instructions
from lion_local.run.state import Journal, read_jsonl
from lion_local.stages.likelihood import LOCAL_METHOD, SERVER_METHOD, mean_nll, score_all, student_scored, teacher_scored

logger = logging.getLogger(__name__)

SETS = ("questions", "held_out")


def held_out_seeds(config: Config, run: RunDir) -> list[Question]:
    """Question entries for the held-out seed instructions (see the module docstring); [] when none."""
    wanted = config.evaluation.held_out_seeds
    if not wanted or config.seed_limit is None:
        return []
    seen = {r["id"] for path in _pool_files(run) for r in read_jsonl(path)}
    held = []
    for seed in load_seed_instructions(config.seed_data)[config.seed_limit :]:
        seed_id = instruction_id(seed.instruction, seed.input)
        if seed_id not in seen and len(held) < wanted:
            seen.add(seed_id)
            held.append({"id": seed_id, "question": seed.instruction, "input": seed.input, "category": None, "set": "held_out"})
    if len(held) < wanted:
        logger.warning("evaluation: only %d held-out seed instructions follow the first seed_limit (%d) of %s",
                       len(held), config.seed_limit, config.seed_data)
    return held


def _pool_files(run: RunDir) -> list:
    files = [run.final.train_pool]
    for iteration in run.numbered_iterations():
        directory = run.at(iteration)
        files += [directory.cache_pool, directory.train_pool, directory.generated]
    return files


def _scorable(items: list[Question], answers: dict[str, EvalTeacherAnswer]) -> list[Question]:
    return [item for item in items if item["id"] in answers and not answers[item["id"]]["empty"]]


def _result(items: list[Question], records: dict[str, EvalLikelihood], method: str) -> NllFigures:
    result = {"method": method}
    for name in SETS:
        members = [records[item["id"]] for item in items if item.get("set", "questions") == name and item["id"] in records]
        result[name] = mean_nll(members)
    return result


async def _journaled(
    items: list[Question],
    keys: dict[str, str],
    journal: Journal,
    score: Callable[[list[Question]], Awaitable[list[dict]]],
) -> dict[str, EvalLikelihood]:
    """Each item's {"nll", "tokens"} by id: journaled ones reused, the rest scored and journaled."""
    done = journaled_by_key(journal.records, keys)
    missing = [item for item in items if item["id"] not in done]
    if missing:
        for item, value in zip(missing, await score(missing)):
            record = {"id": item["id"], "set": item.get("set", "questions"), "key": keys[item["id"]], **value}
            journal.append(record)
            done[item["id"]] = record
    return done


async def checkpoint_likelihood(
    config: Config,
    model_dir: str,
    items: list[Question],
    answers: dict[str, EvalTeacherAnswer],
    journal: Journal,
    connect: Callable[[], Awaitable[EndpointClient]],
) -> NllFigures:
    """The student at `model_dir` on both sets; `connect` opens its server (called only when needed)."""
    role = config.roles.student
    return await _likelihood(
        "student", model_dir, config.servers[role.server].engine, role.prompt_format,
        lambda tokenizer, q, i, a: student_scored(tokenizer, role.prompt_format, q, i, a),
        items, answers, journal, connect,
    )


async def teacher_likelihood(
    config: Config,
    items: list[Question],
    answers: dict[str, EvalTeacherAnswer],
    journal: Journal,
    connect: Callable[[], Awaitable[EndpointClient]],
) -> NllFigures:
    """The teacher's own figure on its answers. An external teacher is scored on its endpoint's prompt
    logprobs with the tokenizer of its local copy (servers.<name>.model); without one, None figures
    with the reason."""
    role = config.roles.teacher
    server = config.servers[role.server]
    if server.engine == "external" and server.model is None:
        return {"method": f"not measured: an external teacher's tokenizer and chat template are not here "
                          f"(set servers.{role.server}.model to a local copy of the served model)",
                **{name: None for name in SETS}}
    return await _likelihood(
        "teacher", str(server.model), server.engine, "teacher",
        lambda tokenizer, q, i, a: teacher_scored(tokenizer, role.system_prompt, q, i, a),
        items, answers, journal, connect,
    )


async def _likelihood(
    role: str,
    model_dir: str,
    engine: str,
    form: str,
    scored_of: Callable,
    items: list[Question],
    answers: dict[str, EvalTeacherAnswer],
    journal: Journal,
    connect: Callable[[], Awaitable[EndpointClient]],
) -> NllFigures:
    """One model's figure on both sets: on its vLLM (or external) server, else here with transformers.
    `form` (the prompt format) keys each answer's figure with the answer's own key."""
    from transformers import AutoTokenizer

    items = _scorable(items, answers)
    keys = {item["id"]: journal_key(answers[item["id"]]["key"], form) for item in items}
    on_server = engine in ("vllm", "external")  # transformers serve returns no prompt logprobs

    async def score(missing: list[Question]) -> list[dict]:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        scored = [scored_of(tokenizer, i["question"], i.get("input", ""), answers[i["id"]]["answer"]) for i in missing]
        return await score_all(await connect() if on_server else None, role, model_dir, scored)

    records = await _journaled(items, keys, journal, score)
    return _result(items, records, SERVER_METHOD if on_server else LOCAL_METHOD)
