"""Waiting for started servers: until /health answers and the server answering is the one started.

Servers load side by side; every one is polled every POLL_S from one coroutine, so the wait is
cancelled at once by a signal (the command line turns SIGTERM and SIGINT into SystemExit in the
main thread, and asyncio cancels the waiting task): nothing blocks in a thread that would be
joined first. On such an interruption the servers get their SIGTERM at once (`begin_stop`), and
whoever holds them finishes the stop (a ServerSet, the doctor's exit stack, the sync wrapper).

Once /health answers, /v1/models must list the model name the requests will carry and, where
psutil sees the listening socket, it must belong to the server's process group; a server that
exits having lost its port to another process is started again on fresh ports
(serving/ports.py decides).
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from serving.ports import (
    MAX_PORT_ATTEMPTS,
    answering_is_ours,
    configured_port_problem,
    describe_holders,
    identity_problem,
    listeners,
    lost_its_port,
    port_is_free,
    retry_decision,
)
from serving.process import ServerError, ServerProcess, stop_processes

logger = logging.getLogger(__name__)

POLL_S = 0.2
HTTP_TIMEOUT_S = 5.0


def wait_until_healthy(processes: list[ServerProcess]) -> None:
    """`wait_until_healthy_async` from synchronous code (not from a running event loop); on any
    failure or interruption every process of the list is stopped before the exception goes on."""
    try:
        asyncio.run(wait_until_healthy_async(processes))
    except BaseException:
        stop_processes(processes)
        raise


async def wait_until_healthy_async(processes: list[ServerProcess]) -> None:
    """Poll every started process until each answers /health and is confirmed as the one started.

    The first to fail raises ServerError after every process of the list is stopped. Cancelled
    (a signal), every process gets SIGTERM and the caller stops them (their grace runs meanwhile).
    """
    deadlines = {id(process): time.monotonic() + process.startup_timeout_s for process in processes}
    pending = list(processes)
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
            while pending:
                still = []
                for process in pending:
                    if not await _poll(process, client, deadlines):
                        still.append(process)
                pending = still
                if pending:
                    await asyncio.sleep(POLL_S)
    except ServerError:
        stop_processes(processes)
        raise
    except BaseException:
        for process in processes:
            process.begin_stop()
        raise


async def _poll(process: ServerProcess, client: httpx.AsyncClient, deadlines: dict[int, float]) -> bool:
    """One look at a starting server: True once it is up and ours; False to look again; raises
    ServerError when it failed (it is then stopped)."""
    assert process.process is not None, "start() first"
    code = process.process.poll()
    if code is not None:
        _after_exit(process, code)
        deadlines[id(process)] = time.monotonic() + process.startup_timeout_s
        return False
    if await _status(client, process.health_url) == 200:
        problem = await _identity(process, client)
        if problem is None:
            process.answered = True
            process.server_pid()
            logger.info("%s server is healthy at %s", process.name, process.health_url)
            return True
        _foreign_server(process, problem)
        deadlines[id(process)] = time.monotonic() + process.startup_timeout_s
        return False
    if time.monotonic() > deadlines[id(process)]:
        process.stop()
        raise ServerError(
            f"{process.name} server not healthy after {process.startup_timeout_s:.0f} s "
            f"(servers.{process.name}.startup_timeout_s); log: {process.log_path}"
        )
    return False


def _after_exit(process: ServerProcess, code: int) -> None:
    """A server that exited while starting: start it again on fresh ports when it lost a picked
    port to another process, else raise (naming the configured port's holder when it lost that)."""
    expected = process.expected
    log = process.startup_log()
    port_key = expected.port_key if expected is not None else None
    taken = port_key is not None and not port_is_free(expected.host, expected.port)
    decision = retry_decision(
        lost_port=lost_its_port(log),
        may_restart=process.relaunch_with is not None,
        configured_port_taken=taken,
        attempt=process.attempt,
    )
    if decision == "refuse":
        process.stop()
        holder = describe_holders(listeners(expected.port))
        raise ServerError(configured_port_problem(process.name, expected.port, port_key, holder))
    if decision == "fail":
        process.stop()
        lost = "an address it binds was in use by another process; " if lost_its_port(log) else ""
        raise ServerError(
            f"{process.name} server exited with code {code} while starting; {lost}{process.failure_hint()}"
        )
    logger.warning(
        "%s server: a port it was given was taken by another process before it bound it (start %d of %d); "
        "starting it again on fresh ports",
        process.name, process.attempt, MAX_PORT_ATTEMPTS,
    )
    process.relaunch()


def _foreign_server(process: ServerProcess, problem: str) -> None:
    """Another server answers on the port: a picked port is given up for fresh ones, as a lost
    one is; otherwise the start fails in one line naming the port and what answered."""
    expected = process.expected
    may_move = expected is not None and expected.port_key is None and process.relaunch_with is not None
    if may_move and process.attempt < MAX_PORT_ATTEMPTS:
        logger.warning(
            "%s (start %d of %d); starting it again on fresh ports", problem, process.attempt, MAX_PORT_ATTEMPTS
        )
        process.relaunch()
        return
    process.stop()
    raise ServerError(problem if expected is None or expected.port_key is None else f"{problem} ({expected.port_key})")


async def _identity(process: ServerProcess, client: httpx.AsyncClient) -> str | None:
    """Why the server answering /health is not this one, or None (serving.ports.identity_problem)."""
    expected = process.expected
    if expected is None:
        return None
    holders, ours = answering_is_ours(expected.port, process.process.pid)
    served = None
    if expected.model is not None:
        models_url = process.health_url.removesuffix("/health") + "/v1/models"
        served = await _served_models(client, models_url, expected.api_key)
    return identity_problem(process.name, expected.port, expected.model, served, holders, ours)


async def _status(client: httpx.AsyncClient, url: str) -> int | None:
    try:
        return (await client.get(url)).status_code
    except httpx.HTTPError:
        return None


async def _served_models(client: httpx.AsyncClient, url: str, api_key: str | None) -> list[str] | None:
    """The ids /v1/models lists, or None when it gives no such list."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = await client.get(url, headers=headers)
        if reply.status_code != 200:
            return None
        return [str(entry["id"]) for entry in reply.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
