"""Instruction records, their stable ids, and the Train and Cache Pools of each iteration.

An instruction record is {"id", "instruction", "input", "origin": "seed"|"hard"|"easy",
"iteration", "parent"}. Its id is a content hash of (instruction, input), so the same text has
the same id in every run and every file.

Pools follow the method: iteration 1 trains on and discriminates the seeds; iteration k+1 trains
on the instructions generated in iteration k (the Train Pool is replaced) and discriminates the
Cache Pool of k plus them (the Cache Pool is extended). The final imitation trains on the
instructions generated in the last iteration.
"""

from __future__ import annotations

import hashlib
import json

from lion_local.config import Config
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.record_types import InstructionRecord, Origin
from lion_local.run.state import read_jsonl, write_jsonl_atomic
from lion_local.run.seed_data import load_seed_instructions


def instruction_id(instruction: str, input_text: str = "") -> str:
    payload = json.dumps([instruction, input_text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def request_seed(*parts: object) -> int:
    """A sampling seed fixed by its parts (run seed, role, id, ...), so a re-run asks the same."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def instruction_record(
    instruction: str, input_text: str, origin: Origin, iteration: int, parent: str | None
) -> InstructionRecord:
    return {
        "id": instruction_id(instruction, input_text),
        "instruction": instruction,
        "input": input_text,
        "origin": origin,
        "iteration": iteration,
        "parent": parent,
    }


def seed_records(config: Config) -> list[InstructionRecord]:
    seeds = load_seed_instructions(config.seed_data, limit=config.seed_limit)
    return [instruction_record(seed.instruction, seed.input, "seed", 0, None) for seed in seeds]


def pools_for(config: Config, run: RunDir, iteration: Iteration) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """(Train Pool, Cache Pool) of an iteration, written to its directory the first time they are built.

    Once written they are read back, so a seed file edited mid-run cannot change a started run.
    For the final imitation the Cache Pool is not used and is returned empty.
    """
    directory = run.at(iteration)
    if directory.train_pool.exists() and (iteration.is_final or directory.cache_pool.exists()):
        return read_jsonl(directory.train_pool), [] if iteration.is_final else read_jsonl(directory.cache_pool)
    if iteration.is_final:
        train, cache = pools_from(iteration, [], [], read_jsonl(run.iteration(config.iterations).generated))
    elif iteration.number == 1:
        train, cache = pools_from(iteration, seed_records(config), [], [])
    else:
        previous = run.iteration(iteration.number - 1)
        train, cache = pools_from(iteration, [], read_jsonl(previous.cache_pool), read_jsonl(previous.generated))
    if not iteration.is_final:
        write_jsonl_atomic(directory.cache_pool, cache)
    write_jsonl_atomic(directory.train_pool, train)
    return train, cache


def pools_from(iteration: Iteration, seeds: list, previous_cache: list, previous_generated: list) -> tuple[list, list]:
    """The method's rule, for records or bare ids alike (`lion-local plan` predicts with it):
    Train_1 = Cache_1 = the seeds; Train_k = the instructions generated in k-1 and
    Cache_k = Cache_(k-1) + Train_k; the final imitation trains on those generated last."""
    if iteration.is_final:
        return list(previous_generated), []
    if iteration.number == 1:
        return list(seeds), list(seeds)
    return list(previous_generated), previous_cache + previous_generated


def by_id(records: list[dict]) -> dict[str, dict]:
    return {record["id"]: record for record in records}
