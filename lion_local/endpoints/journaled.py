"""Many model calls in flight at once, each result journaled the moment it arrives.

The endpoint client bounds how many requests are really in flight; here every call is a task,
results are appended to the journal in completion order (one line each, so a kill loses only
calls still in flight), and a progress bar counts them. The first call that fails for good
cancels the rest and propagates, after everything that completed has been journaled.

Answers that outlive a stage (the teacher's, evaluate's) are journaled under a key: the part of
the run's identity that shapes them. `journaled_by_key` reads back those whose key still holds;
`ask_missing` asks for the rest with one client, opened only when something is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from tqdm import tqdm

from lion_local.endpoints.client import Completion
from lion_local.run.state import Journal

Client = TypeVar("Client")


def call_fields(completion: Completion, seed: int) -> dict:
    """What every journal record keeps about its call: how it ended, its seed, tokens and time."""
    return {
        "finish_reason": completion.finish_reason,
        "seed": seed,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "seconds": round(completion.seconds, 4),
    }


def progress_bar(total: int, description: str, unit: str = "call", initial: int = 0) -> tqdm:
    """A tqdm bar on stderr that redraws often on a terminal and rarely in a batch log file."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=interactive,
        file=sys.stderr,
    )


async def call_all(
    calls: list[Callable[[], Awaitable[dict | None]]],
    journal: Journal,
    description: str,
    on_record: Callable[[dict], None] | None = None,
    unit: str = "call",
) -> None:
    """Run every call concurrently and append each returned record to `journal`.

    A call that journals several records itself (a review retried after an unreadable reply)
    returns None.
    """
    if not calls:
        return
    bar = progress_bar(len(calls), description, unit)
    tasks = [asyncio.ensure_future(call()) for call in calls]
    try:
        for finished in asyncio.as_completed(tasks):
            record = await finished
            if record is not None:
                journal.append(record)
                if on_record is not None:
                    on_record(record)
            bar.update()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()


def journal_key(*parts: object) -> str:
    """The key a journaled answer is filed under: a short hash of the values that shape it (a
    fingerprint, the question, the answer scored, ...), the same for the same values in every run."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def journaled_by_key(records: list[dict], keys: Mapping[str, str], field: str = "key") -> dict[str, dict]:
    """The records of the ids in `keys` whose `field` still equals their id's key, by id (the last
    one wins); records under another key are kept in the journal but not read."""
    return {r["id"]: r for r in records if r.get("id") in keys and r.get(field) == keys[r["id"]]}


async def ask_missing(
    missing: list[str],
    done: dict[str, dict],
    journal: Journal,
    connect: Callable[[], Awaitable[Client]],
    ask: Callable[[Client, str], Awaitable[dict[str, Any]]],
    description: str,
) -> None:
    """`ask(client, id)` for each id of `missing`, concurrently, with the one client `connect`
    gives (called only when something is missing, so a resumed stage with every answer journaled
    starts no server); each record is journaled as it returns and filed in `done` by id."""
    if not missing:
        return
    client = await connect()
    await call_all(
        [lambda each=each: ask(client, each) for each in missing],
        journal,
        description,
        on_record=lambda record: done.__setitem__(record["id"], record),
    )
