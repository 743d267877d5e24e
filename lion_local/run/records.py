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
from lion_local.run.state import FINAL, RunDir, read_jsonl, write_jsonl_atomic
from lion_local.run.seed_data import load_seed_instructions


def instruction_id(instruction: str, input_text: str = "") -> str:
    payload = json.dumps([instruction, input_text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def request_seed(*parts: object) -> int:
    """A sampling seed fixed by its parts (run seed, role, id, ...), so a re-run asks the same."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def instruction_record(
    instruction: str, input_text: str, origin: str, iteration: int, parent: str | None
) -> dict:
    return {
        "id": instruction_id(instruction, input_text),
        "instruction": instruction,
        "input": input_text,
        "origin": origin,
        "iteration": iteration,
        "parent": parent,
    }


def seed_records(config: Config) -> list[dict]:
    seeds = load_seed_instructions(config.seed_data, limit=config.seed_limit)
    return [instruction_record(seed.instruction, seed.input, "seed", 0, None) for seed in seeds]


def pools_for(config: Config, run: RunDir, k: int | str) -> tuple[list[dict], list[dict]]:
    """(Train Pool, Cache Pool) of iteration k, written to iter_<k>/ the first time they are built.

    Once written they are read back, so a seed file edited mid-run cannot change a started run.
    For the final imitation the Cache Pool is not used and is returned empty.
    """
    directory = run.iteration(k)
    train_path, cache_path = directory / "train_pool.jsonl", directory / "cache_pool.jsonl"
    if train_path.exists() and (k == FINAL or cache_path.exists()):
        return read_jsonl(train_path), [] if k == FINAL else read_jsonl(cache_path)

    if k == FINAL:
        train = read_jsonl(run.iteration(config.iterations) / "generated.jsonl")
        write_jsonl_atomic(train_path, train)
        return train, []
    if k == 1:
        train = seed_records(config)
        cache = list(train)
    else:
        previous = run.iteration(k - 1)
        train = read_jsonl(previous / "generated.jsonl")
        cache = read_jsonl(previous / "cache_pool.jsonl") + train
    write_jsonl_atomic(cache_path, cache)
    write_jsonl_atomic(train_path, train)
    return train, cache


def by_id(records: list[dict]) -> dict[str, dict]:
    return {record["id"]: record for record in records}
