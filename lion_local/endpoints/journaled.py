"""Many model calls in flight at once, each result journaled the moment it arrives.

The endpoint client bounds how many requests are really in flight; here every call is a task,
results are appended to the journal in completion order (one line each, so a kill loses only
calls still in flight), and a progress bar counts them. The first call that fails for good
cancels the rest and propagates, after everything that completed has been journaled.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

from tqdm import tqdm

from lion_local.endpoints.client import Completion
from lion_local.run.state import Journal


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
