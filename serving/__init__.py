"""Launching and health-checking the OpenAI-compatible servers the roles talk to.

`running_server(config, name, log_dir)` starts `vllm serve` or `transformers serve` for the
server `name` of a config (or uses an external endpoint), waits for /health, yields an
`Endpoint`, and stops the server on exit. An external server without base_urls is found
through the endpoint files that server jobs publish (serving/published.py). `client_for`
turns an Endpoint into the async client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lion_local.config import Config, ServerConfig, api_key_for
from lion_local.endpoint import EndpointClient
from serving.commands import request_model_name, server_command, server_environment
from serving.process import ServerError, ServerProcess, free_port
from serving.published import live_published_endpoints

logger = logging.getLogger(__name__)

__all__ = [
    "Endpoint",
    "ServerError",
    "ServerSet",
    "client_for",
    "running_server",
    "server_launch",
    "server_process",
]


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_urls: list[str]
    model: str
    api_key: str | None = field(default=None, repr=False)
    # For a server lion-local started: why its process is gone, or None while it runs.
    server_check: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ServerLaunch:
    """What starting a server would run; `serve --dry-run` prints it."""

    command: list[str]
    environment: dict[str, str] = field(repr=False)
    port: int
    base_url: str
    health_url: str


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def server_launch(config: Config, name: str, model: str | None = None) -> ServerLaunch:
    server = config.servers[name]
    port = server.port or free_port(_url_host(server.host))
    internal_port = free_port() if server.engine == "vllm" else None
    command = server_command(server, server.host, port, model)
    environment = server_environment(server, api_key_for(config, name), internal_port)
    root = f"http://{_url_host(server.host)}:{port}"
    return ServerLaunch(command, environment, port, f"{root}/v1", f"{root}/health")


def server_process(
    config: Config, name: str, log_path: Path, model: str | None = None
) -> tuple[ServerProcess, ServerLaunch]:
    """The (not yet started) process of server `name`, and what it will run."""
    server = config.servers[name]
    launch = server_launch(config, name, model)
    process = ServerProcess(
        name,
        launch.command,
        launch.environment,
        log_path,
        launch.health_url,
        server.startup_timeout_s,
        stop_grace_s=60.0 if server.engine == "vllm" else 15.0,
    )
    return process, launch


@contextmanager
def running_server(config: Config, name: str, log_dir: Path, model: str | None = None) -> Iterator[Endpoint]:
    """Start (or reach) server `name`, yield its Endpoint, stop it afterwards."""
    server = config.servers[name]
    api_key = api_key_for(config, name)
    if server.engine == "external":
        if server.base_urls:
            yield Endpoint(name, list(server.base_urls), request_model_name(server), api_key)
        else:
            base_urls, published_model = live_published_endpoints(config, name)
            yield Endpoint(name, base_urls, server.served_model_name or published_model, api_key)
        return
    process, launch = server_process(config, name, Path(log_dir) / f"server-{name}.log", model)
    process.start()
    try:
        process.wait_until_healthy()
        yield Endpoint(name, [launch.base_url], request_model_name(server, model), api_key, process.exit_report)
    finally:
        process.stop()


def client_for(endpoint: Endpoint, server: ServerConfig) -> EndpointClient:
    return EndpointClient(
        endpoint.name,
        endpoint.base_urls,
        endpoint.model,
        api_key=endpoint.api_key,
        max_concurrency=server.max_concurrency,
        request_timeout_s=server.request_timeout_s,
        failure_budget_s=server.failure_budget_s,
        backoff_initial_s=server.backoff_initial_s,
        backoff_max_s=server.backoff_max_s,
        use_env_proxy=server.use_env_proxy,
        server_check=endpoint.server_check,
    )


class ServerSet:
    """Servers started on first use and kept running across stages until stopped.

    The loop keeps the teacher up from one stage to the next, restarts the student server for
    each new checkpoint, and stops everything before student training needs the GPUs.
    """

    def __init__(self, config: Config, log_dir: Path) -> None:
        self.config = config
        self.log_dir = Path(log_dir)
        self._running: dict[str, tuple[str | None, ExitStack, Endpoint]] = {}

    def endpoint(self, name: str, model: str | None = None) -> Endpoint:
        if name in self._running:
            running_model, _, endpoint = self._running[name]
            gone = endpoint.server_check() if endpoint.server_check is not None else None
            if running_model == model and gone is None:
                return endpoint
            if gone is not None:
                logger.warning("%s; starting it again", gone)
            self.stop(name)
        stack = ExitStack()
        endpoint = stack.enter_context(running_server(self.config, name, self.log_dir, model))
        self._running[name] = (model, stack, endpoint)
        return endpoint

    def client(self, name: str, model: str | None = None) -> EndpointClient:
        """A new async client for server `name`; the caller closes it."""
        return client_for(self.endpoint(name, model), self.config.servers[name])

    def stop(self, name: str) -> None:
        if name in self._running:
            _, stack, _ = self._running.pop(name)
            stack.close()

    def stop_all(self) -> None:
        for name in list(self._running):
            self.stop(name)

    def __enter__(self) -> ServerSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()
