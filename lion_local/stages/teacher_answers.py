"""The run-wide cache of teacher answers (teacher_answers.jsonl).

An answer is keyed by (instruction id, teacher fingerprint): the fingerprint is the part of the
run's identity (lion_local.run.identity) that shapes a teacher reply (the model and how it is
served, the prompt template, the system prompt, the sampling parameters, the seed), so editing any
of them makes the teacher answer again, while moving the endpoint to another host does not.
Across the whole run each distinct instruction is sent to the teacher once; imitation and
discrimination both go through `ensure_teacher_answers`, which asks only for what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from contextlib import AsyncExitStack

from lion_local.config import Config
from lion_local.endpoints.client import Completion, EndpointClient
from lion_local.endpoints.journaled import ask_missing, call_fields, journaled_by_key
from lion_local.run.records import request_seed
from lion_local.roles import ask_teacher, parse_teacher_answer
from lion_local.stages.run_identity import role_fingerprint
from lion_local.run.layout import RunDir, Stage
from lion_local.run.record_types import InstructionRecord, TeacherAnswer
from lion_local.run.state import Journal
from lion_local.endpoints.servers import ServerSet

logger = logging.getLogger(__name__)


def teacher_fingerprint(config: Config) -> str:
    """The part of the run's identity that shapes a teacher answer: the teacher's server (model,
    engine, dtype, ...), its role (sampling, system prompt), its prompt template and the run seed."""
    return role_fingerprint(config, "teacher")


def uncached(records: list[dict], cached: Collection[str]) -> list[dict]:
    """The records whose instruction the teacher must still answer: each distinct id once, in
    order, unless `cached` holds it (`lion-local plan` counts the teacher's calls with it)."""
    return list({r["id"]: r for r in records if r["id"] not in cached}.values())


def answer_fields(completion: Completion) -> dict:
    """What a teacher answer record keeps of its reply: the answer, or "" and empty when it had none."""
    answer = parse_teacher_answer(completion.text)
    return {"answer": answer if answer is not None else "", "empty": answer is None}


async def ensure_teacher_answers(
    run: RunDir,
    config: Config,
    records: list[InstructionRecord],
    connect: Callable[[], Awaitable[EndpointClient]],
    stage: Stage,
) -> dict[str, TeacherAnswer]:
    """Teacher answers for `records` by id, asking the teacher only for those not cached yet.

    `connect` gives the teacher's client; it is called only when an answer is missing, so a
    stage whose answers are all cached never starts the teacher's server.
    """
    fingerprint = teacher_fingerprint(config)
    by_id = {record["id"]: record for record in records}
    with Journal(run.teacher_answers) as journal:
        cached = journaled_by_key(journal.records, dict.fromkeys(by_id, fingerprint), "fingerprint")
        missing = uncached(records, cached)
        if records:
            logger.info(
                "%s: teacher answers: %d of %d cached, %d to request",
                stage, len(records) - len(missing), len(records), len(missing),
            )

        async def ask(client: EndpointClient, record_id: str) -> TeacherAnswer:
            record = by_id[record_id]
            seed = request_seed(config.seed, "teacher", record_id)
            completion = await ask_teacher(client, config.roles.teacher, record["instruction"], record["input"], seed=seed)
            return {"id": record_id, **answer_fields(completion), "fingerprint": fingerprint, "stage": str(stage),
                    **call_fields(completion, seed)}

        await ask_missing([r["id"] for r in missing], cached, journal, connect, ask, f"{stage}: teacher answers")
    return {record["id"]: cached[record["id"]] for record in records}


async def teacher_answers_for(
    config: Config, run: RunDir, records: list[InstructionRecord], servers: ServerSet, stage: Stage
) -> dict[str, TeacherAnswer]:
    """ensure_teacher_answers with the teacher's server from `servers`, its client closed after."""
    async with AsyncExitStack() as stack:

        async def connect() -> EndpointClient:
            return await stack.enter_async_context(await servers.open_client(config.roles.teacher.server))

        return await ensure_teacher_answers(run, config, records, connect, stage)
