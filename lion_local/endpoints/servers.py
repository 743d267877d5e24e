"""The servers of a run: which to start, with what key and environment, and when to stop them.

serving/ starts and stops servers from their specs; this module decides for the loop. A
`ServerSet` starts servers on first use (several at once when a stage needs several, such as
the student and the referee of a discrimination), keeps them across stages, restarts the
student for each new checkpoint, and stops before student training every server whose
`keep_running_during_training` is off. It lives in the command's one event loop (`async with`):
entered, it refuses a configured port already in use before anything runs; left on a signal
(SystemExit, KeyboardInterrupt, the loop's cancellation), it stops every server, loading or
running, side by side with a short grace (INTERRUPT_GRACE_S). `config_server` is the same for
synchronous scripts that want one server for a while (benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

from lion_local.config import Config, ConfigError, ServerSpec
from lion_local.endpoints.access import api_key_for, endpoint_dir, server_key_for
from lion_local.endpoints.client import EndpointClient
from lion_local.offline import offline_environ
from serving import (
    Endpoint,
    Launched,
    ServerError,
    ServerProcess,
    StartedServer,
    await_servers_async,
    check_configured_port,
    external_endpoint_async,
    launch_servers,
    running_server,
    stop_processes,
)
from serving.access import StartedFor

logger = logging.getLogger(__name__)

# The grace of every server stopped because lion-local was interrupted: the whole stop fits the
# 10 s a scheduler's SIGTERM (or Ctrl-C) gives before a SIGKILL.
INTERRUPT_GRACE_S = 5.0


def wanted_server(
    config: Config, name: str, log_path: Path, model: str | None = None, started_for: StartedFor = "run"
) -> StartedServer:
    """Server `name` of the config as serving/ starts it: offline, with the key it will require
    (serving/access.py), logging to log_path."""
    return StartedServer(
        name,
        config.servers[name],
        log_path,
        server_key_for(config, name, started_for),
        offline_environ(),
        model,
    )


def server_named(config: Config, name: str) -> str:
    """The server NAME of `lion-local serve NAME`: a server of the config, or the server of a role."""
    if name in config.servers:
        return name
    role = getattr(config.roles, name, None)
    if role is not None and hasattr(role, "server"):
        return role.server
    choices = ", ".join(sorted({*config.servers, "teacher", "referee", "generator", "student"}))
    raise ConfigError(f"serve {name}: no server or role of that name; choose one of: {choices}")


def server_log(log_dir: Path, name: str) -> Path:
    return Path(log_dir) / f"server-{name}.log"


@contextmanager
def config_server(config: Config, name: str, log_dir: Path, model: str | None = None) -> Iterator[Endpoint]:
    """Start (or reach) server `name` of the config, yield its Endpoint, stop it afterwards."""
    with running_server(wanted_server(config, name, server_log(log_dir, name), model), endpoint_dir(config, name)) as endpoint:
        yield endpoint


def client_for(endpoint: Endpoint, server: ServerSpec) -> EndpointClient:
    return EndpointClient(
        endpoint.name,
        endpoint.base_urls,
        endpoint.model,
        api_key=endpoint.api_key,
        api_keys=endpoint.api_keys,
        max_concurrency=server.max_concurrency,
        request_timeout_s=server.request_timeout_s,
        failure_budget_s=server.failure_budget_s,
        backoff_initial_s=server.backoff_initial_s,
        backoff_max_s=server.backoff_max_s,
        use_env_proxy=server.use_env_proxy,
        server_check=endpoint.server_check,
    )


class ServerSet:
    """Servers started on first use and kept running across stages until stopped; used from the
    one event loop of a command (`async with ServerSet(...) as servers`)."""

    def __init__(self, config: Config, log_dir: Path, on_start: Callable[[dict], None] | None = None) -> None:
        """`on_start` receives one record per server start (the loop journals them in servers.jsonl)."""
        self.config = config
        self.log_dir = Path(log_dir)
        self.on_start = on_start
        # One lock per server name: two coroutines never start the same server twice, while
        # different servers start side by side from separate coroutines.
        self._starting: dict[str, asyncio.Lock] = {}
        # Started and still loading: stop_all ends these too, so a cancelled start leaves nothing.
        self._loading: list[ServerProcess] = []
        self._running: dict[str, tuple[str | None, ServerProcess | None, Endpoint]] = {}

    async def _is_current(self, name: str, model: str | None) -> bool:
        if name not in self._running:
            return False
        running_model, _, endpoint = self._running[name]
        gone = endpoint.server_check() if endpoint.server_check is not None else None
        if running_model == model and gone is None:
            return True
        if gone is not None:
            logger.warning("%s; starting it again", gone)
        await self.stop(name)
        return False

    async def start(self, wanted: dict[str, str | None]) -> None:
        """Make every server of `wanted` (name -> model, None for the configured one) run; the
        missing ones start together. The processes start on this (the main) thread, which they
        outlive no longer than it (PR_SET_PDEATHSIG), and the tens of seconds they take to load
        are polled for in the event loop; a signal cancels the wait at once, and `stop_all`
        stops what was loading."""
        async with AsyncExitStack() as held:
            for name in sorted(wanted):  # always in one order, so two callers cannot deadlock
                await held.enter_async_context(self._starting.setdefault(name, asyncio.Lock()))
            launched = await self._launch(wanted)
            try:
                ready = await await_servers_async(launched) if launched else []
            except ServerError:
                self._forget_loading(launched)  # stopped already
                raise
            self._ready(launched, ready)

    async def _launch(self, wanted: dict[str, str | None]) -> Launched:
        to_start = []
        for name, model in wanted.items():
            if await self._is_current(name, model):
                continue
            spec = self.config.servers[name]
            if spec.engine == "external":
                key, directory = api_key_for(self.config, name), endpoint_dir(self.config, name)
                self._running[name] = (model, None, await external_endpoint_async(name, spec, key, directory))
            else:
                to_start.append(wanted_server(self.config, name, server_log(self.log_dir, name), model))
        return launch_servers(to_start, track=self._loading) if to_start else []

    def _forget_loading(self, launched: Launched) -> None:
        self._loading = [process for process in self._loading if all(process is not p for _, p, _ in launched)]

    def _ready(self, launched: Launched, ready: list[tuple[ServerProcess, Endpoint]]) -> None:
        self._forget_loading(launched)
        for (process, endpoint), (each, _, _) in zip(ready, launched):
            self._running[each.name] = (each.model, process, endpoint)
            self._record_start(endpoint, each.model or each.spec.model)

    def _record_start(self, endpoint: Endpoint, model: str | None) -> None:
        if self.on_start is None:
            return
        record = {
            "server": endpoint.name,
            "engine": endpoint.engine,
            "model": model,
            "base_url": endpoint.base_urls[0],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.on_start(record)

    async def endpoint(self, name: str, model: str | None = None) -> Endpoint:
        """The endpoint of server `name` serving `model` (None: the configured one), started if needed."""
        await self.start({name: model})
        return self._running[name][2]

    async def open_client(self, name: str, model: str | None = None) -> EndpointClient:
        """A new async client for server `name`; the caller closes it (`async with`)."""
        return client_for(await self.endpoint(name, model), self.config.servers[name])

    async def stop(self, name: str) -> None:
        if name in self._running:
            _, process, _ = self._running[name]
            if process is not None:
                # Still listed meanwhile: a signal during the stop leaves it to stop_all.
                await asyncio.to_thread(process.stop)
            self._running.pop(name, None)

    async def stop_for_training(self) -> None:
        """Stop the servers that would hold the GPUs student training needs."""
        for name in list(self._running):
            if not self.config.servers[name].keep_running_during_training:
                await self.stop(name)

    async def stop_all(self, grace_s: float | None = None) -> None:
        """Stop every server, loading or running, side by side (each group gets SIGTERM first)."""
        processes = list(self._loading)
        self._loading = []
        for name in list(self._running):
            _, process, _ = self._running.pop(name)
            if process is not None:
                processes.append(process)
        if processes:
            await asyncio.to_thread(stop_processes, processes, grace_s)

    def check_ports(self) -> None:
        """Refuse, before anything runs, a configured port of a server in use that another process holds."""
        for name in self.config.servers_in_use():
            check_configured_port(name, self.config.servers[name])

    async def __aenter__(self) -> ServerSet:
        self.check_ports()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        interrupted = exc_type is not None and issubclass(
            exc_type, (SystemExit, KeyboardInterrupt, asyncio.CancelledError)
        )
        await self.stop_all(INTERRUPT_GRACE_S if interrupted else None)
