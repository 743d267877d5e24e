"""How long the endpoint client takes over failures, as ratios to the waits that are its own.

    .venv/bin/python benchmarks/endpoint_failures.py [--repeat 5]

tests/test_endpoint.py checks these behaviours without timing them (the waits the client asks
for, counts of attempts, the errors); this script measures the wall time they take on this host,
each against the wait that bounds it from below, measured in the same run, median of --repeat:

  outage          5 requests to two refusing URLs, failure budget 0.5 s: elapsed / budget
  dead server     the server process reported gone at the 3rd failed attempt, budget 60 s:
                  elapsed / budget (the client must not wait the budget out)
  fail-over       20 requests over a refusing URL and a live one, backoff 5 s: elapsed / the same
                  20 requests to the live URL alone
  request timeout a reply held for 60 s, request timeout 0.5 s, retried: elapsed / timeout
  Retry-After     429 with Retry-After: 1: elapsed / 1 s
  fail fast       a request hanging on a 30 s request timeout while another gives up (budget
                  0.3 s): elapsed / budget

The scripted loopback server is tests/test_endpoint.py's FakeServer (in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lion_local.endpoints.client import EndpointError  # noqa: E402
from test_endpoint import MESSAGES, FakeServer, Reply, client_for, dead_url  # noqa: E402

HANG = [{"role": "user", "content": "hang"}]


async def outage() -> tuple[float, float]:
    budget = 0.5
    async with client_for(dead_url(), dead_url(), failure_budget_s=budget) as client:
        started = time.monotonic()
        await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(5)), return_exceptions=True)
        return time.monotonic() - started, budget


async def dead_server() -> tuple[float, float]:
    budget, checks = 60.0, []

    def server_check() -> str | None:
        checks.append(1)
        return None if len(checks) < 3 else "the teacher server (pid 7) was killed by SIGKILL while in use"

    async with client_for(dead_url(), failure_budget_s=budget, server_check=server_check) as client:
        started = time.monotonic()
        await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(3)), return_exceptions=True)
        return time.monotonic() - started, budget


async def fail_over() -> tuple[float, float]:
    async def twenty(*urls: str) -> float:
        async with client_for(*urls, max_concurrency=4, backoff_initial_s=5.0, backoff_max_s=5.0) as client:
            started = time.monotonic()
            await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(20)))
            return time.monotonic() - started

    async with FakeServer(delay=0.01) as server:
        alone = await twenty(server.base_url)
        with_dead = await twenty(dead_url(), server.base_url)
    return with_dead, alone


async def request_timeout() -> tuple[float, float]:
    timeout = 0.5
    async with FakeServer(script=[Reply(delay=60.0)]) as server:
        async with client_for(server.base_url, request_timeout_s=timeout) as client:
            started = time.monotonic()
            await client.chat("teacher", MESSAGES)
            return time.monotonic() - started, timeout


async def retry_after() -> tuple[float, float]:
    async with FakeServer(script=[Reply(429, b"wait", headers={"Retry-After": "1"})]) as server:
        async with client_for(server.base_url, backoff_max_s=5.0) as client:
            started = time.monotonic()
            await client.chat("teacher", MESSAGES)
            return time.monotonic() - started, 1.0


async def fail_fast() -> tuple[float, float]:
    budget = 0.3
    async with FakeServer(hang_on="hang", script=[Reply(503, b"down")] * 1000) as server:
        async with client_for(server.base_url, request_timeout_s=30.0, failure_budget_s=budget) as client:
            hanging = asyncio.ensure_future(client.chat("teacher", HANG))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            failing = asyncio.ensure_future(client.chat("teacher", MESSAGES))
            outcomes = await asyncio.gather(hanging, failing, return_exceptions=True)
            assert all(isinstance(outcome, EndpointError) for outcome in outcomes), outcomes
            return time.monotonic() - started, budget


SCENARIOS = {
    "outage": (outage, "budget"),
    "dead server": (dead_server, "budget"),
    "fail-over": (fail_over, "live URL alone"),
    "request timeout": (request_timeout, "timeout"),
    "Retry-After": (retry_after, "Retry-After"),
    "fail fast": (fail_fast, "budget"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the client's retry warnings are expected here
    print(f"median of {args.repeat} runs each")
    print(f"{'scenario':<16} {'elapsed s':>10} {'against':>16} {'s':>8} {'ratio':>8}")
    for name, (scenario, against) in SCENARIOS.items():
        runs = [asyncio.run(scenario()) for _ in range(args.repeat)]
        elapsed = statistics.median(run[0] for run in runs)
        reference = statistics.median(run[1] for run in runs)
        print(f"{name:<16} {elapsed:>10.3f} {against:>16} {reference:>8.3f} {elapsed / reference:>8.4f}")


if __name__ == "__main__":
    main()
