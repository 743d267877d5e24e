"""Discrimination by likelihood (discrimination.signal: likelihood): no student answer, no referee.

An instruction's gap is the new student checkpoint's mean negative log-likelihood per token of the
teacher's answer to it, as imitation trains on it (lion_local.stages.likelihood: the tokens TRL
builds, cut at imitation.trainer.max_length; one prefill with prompt logprobs on the
student's vLLM server; with transformers in this process where the student's engine returns none).
It is what imitation minimises, so a high gap marks an instruction whose teacher answer the
student is far from. The threshold is the discrimination.likelihood_quantile quantile of the
Cache Pool's gaps, so the hard share is chosen (about 1 - quantile), not an accident of the gaps'
scale; an instruction is hard when its gap is above it, easy otherwise. An instruction whose
teacher answer is empty has no gap: unjudged.

Journal: likelihoods.jsonl, one line per instruction the moment its gap is computed, keyed by the
teacher answer it scores, the student's prompt format and the cut: a resumed stage scores only what is
missing, and starts the student's server only when something is.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from contextlib import AsyncExitStack
from statistics import fmean

from lion_local.config import Config
from lion_local.endpoints.servers import ServerSet
from lion_local.endpoints.client import EndpointClient
from lion_local.endpoints.journaled import ask_missing, journal_key, journaled_by_key, progress_bar
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.record_types import HistogramBin, InstructionRecord, Judgement, LikelihoodGap, TeacherAnswer
from lion_local.run.state import Journal
from lion_local.stages.teacher_answers import ensure_teacher_answers
from lion_local.stages.judging import label_counts
from lion_local.stages.likelihood import LOCAL_METHOD, SERVER_METHOD, Scored, local_nll_each, server_nll, student_scored

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 16


# ----------------------------------------------------------------------------------------------
# Decisions (pure)
# ----------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def likelihood_judgements(
    cache_pool: list[InstructionRecord], gaps: dict[str, float | None], q: float
) -> tuple[list[Judgement], float | None]:
    """One judgement per Cache Pool instruction, and the threshold: hard when its gap is above the
    q-quantile of the pool's gaps, unjudged without a gap."""
    known = [gap for gap in (gaps.get(r["id"]) for r in cache_pool) if gap is not None]
    threshold = round(quantile(known, q), 6) if known else None
    judgements = []
    for record in cache_pool:
        gap = gaps.get(record["id"])
        if gap is None:
            label = "unjudged"
        else:
            label = "hard" if gap > threshold else "easy"
        judgements.append({"id": record["id"], "teacher_score": None, "student_score": None, "gap": gap, "label": label})
    return judgements, threshold


def nll_histogram(gaps: list[float], bins: int = HISTOGRAM_BINS) -> list[HistogramBin]:
    """Counts of gaps in `bins` equal-width bins from the lowest to the highest (the highest in the last)."""
    if not gaps:
        return []
    low, high = min(gaps), max(gaps)
    width = (high - low) / bins or 1.0
    counts = Counter(min(bins - 1, int((gap - low) / width)) for gap in gaps)
    return [{"from": round(low + i * width, 4), "to": round(low + (i + 1) * width, 4), "count": counts.get(i, 0)}
            for i in range(bins)]


def likelihood_summary(judgements: list[Judgement], threshold: float | None, q: float, method: str) -> dict:
    """discrimination.json of a likelihood discrimination (the referee's fields absent or None)."""
    gaps = [j["gap"] for j in judgements if j["gap"] is not None]
    return {
        "signal": "likelihood",
        **label_counts(judgements),
        "likelihood_quantile": q,
        "threshold": threshold,
        "mean_gap": round(fmean(gaps), 4) if gaps else None,
        "nll_histogram": nll_histogram(gaps),
        "method": method,
        "referee_check": None,
    }


def as_trained(scored: Scored, max_length: int | None) -> Scored:
    """The example as imitation trains on it: TRL cuts it at imitation.trainer.max_length tokens (an
    answer that starts beyond the cut keeps no token: no gap, unjudged)."""
    if not max_length or len(scored.ids) <= max_length:
        return scored
    return Scored(scored.ids[:max_length], min(scored.start, max_length))


def _key(teacher_answer: TeacherAnswer, prompt_format: str, max_length: int | None) -> str:
    return journal_key(teacher_answer["fingerprint"], teacher_answer["answer"], prompt_format, max_length)


# ----------------------------------------------------------------------------------------------
# The stage's calls
# ----------------------------------------------------------------------------------------------


async def likelihood_gaps(
    config: Config, run: RunDir, iteration: Iteration, cache_pool: list[InstructionRecord], servers: ServerSet
) -> tuple[dict[str, TeacherAnswer], dict[str, LikelihoodGap], str]:
    """(teacher answers by id, journaled gap records by id, how they were computed) for the whole Cache Pool."""
    try:
        return await _gaps(config, run, iteration, cache_pool, servers)
    finally:
        await servers.stop(config.roles.student.server)  # the next iteration serves a new checkpoint


async def _gaps(
    config: Config, run: RunDir, iteration: Iteration, cache_pool: list[InstructionRecord], servers: ServerSet
) -> tuple[dict[str, TeacherAnswer], dict[str, LikelihoodGap], str]:
    from transformers import AutoTokenizer

    marker, role = iteration.stage("discrimination"), config.roles.student
    student_dir = str(run.at(iteration).student)
    on_server = config.servers[role.server].engine == "vllm"  # transformers serve returns no prompt logprobs
    async with AsyncExitStack() as stack:

        async def connect(name: str, model: str | None = None):
            return await stack.enter_async_context(await servers.open_client(name, model))

        teacher = await ensure_teacher_answers(run, config, cache_pool, lambda: connect(config.roles.teacher.server), marker)
        cut = config.imitation.trainer.get("max_length")
        keys = {r["id"]: _key(teacher[r["id"]], role.prompt_format, cut) for r in cache_pool if not teacher[r["id"]]["empty"]}
        with Journal(run.at(iteration).likelihoods) as journal:
            done = journaled_by_key(journal.records, keys)
            missing = [r for r in cache_pool if r["id"] in keys and r["id"] not in done]
            logger.info("%s: likelihood gaps: %d of %d journaled, %d to compute", marker, len(done), len(keys), len(missing))
            if missing:
                def tokenized() -> dict[str, Scored]:
                    tokenizer = AutoTokenizer.from_pretrained(student_dir)
                    return {r["id"]: as_trained(student_scored(tokenizer, role.prompt_format, r["instruction"], r["input"],
                                                               teacher[r["id"]]["answer"]), cut) for r in missing}

                scored = await asyncio.to_thread(tokenized)

                def record(pair_id: str, value: dict) -> LikelihoodGap:
                    gap = round(value["nll"] / value["tokens"], 6) if value["tokens"] else None
                    return {"id": pair_id, "key": keys[pair_id], "gap": gap, **value}

                if on_server:

                    async def ask(client: EndpointClient, pair_id: str) -> LikelihoodGap:
                        return record(pair_id, await server_nll(client, "student", scored[pair_id]))

                    await ask_missing(list(scored), done, journal, lambda: connect(role.server, student_dir), ask,
                                      f"{marker}: likelihood gaps")
                else:
                    await asyncio.to_thread(_here, student_dir, scored, record, journal, done, str(marker))
    return teacher, done, SERVER_METHOD if on_server else LOCAL_METHOD


def _here(
    student_dir: str, scored: dict[str, Scored], record, journal: Journal, done: dict[str, LikelihoodGap], marker: str
) -> None:
    """Score with transformers in this process, each answer journaled as it is scored."""
    with progress_bar(len(scored), f"{marker}: likelihood gaps (here)") as bar:
        for pair_id, value in zip(scored, local_nll_each(student_dir, list(scored.values()))):
            done[pair_id] = record(pair_id, {**value, "prompt_tokens": len(scored[pair_id].ids), "completion_tokens": 0})
            journal.append(done[pair_id])
            bar.update()
