"""Launching and health-checking the OpenAI-compatible servers the roles talk to.

Everything here works from a `ServerSpec` (serving/spec.py), the description of one server;
serving/ imports nothing from the package that uses it. `start_servers` starts several servers
side by side and waits until all answer /health, each confirmed as the server started (the model
it serves, the process that holds its port: serving/startup.py, serving/ports.py); `running_server`
does it for one, yields an `Endpoint`, and stops the server on exit. A configured port already in
use is refused before its server starts; a picked port lost to another process before the server
bound it is replaced. An external server is reached as it is: at its base_urls, or through the
endpoint files that server jobs publish (serving/published.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving.commands import request_model_name, server_command, server_environment
from serving.ports import port_problem
from serving.process import Expected, ServerError, ServerProcess, free_port, stop_processes
from serving.published import live_published_endpoints, live_published_endpoints_async
from serving.spec import ServerSpec
from serving.startup import wait_until_healthy, wait_until_healthy_async

logger = logging.getLogger(__name__)

__all__ = [
    "Endpoint",
    "ServerError",
    "Launched",
    "ServerLaunch",
    "ServerProcess",
    "ServerSpec",
    "StartedServer",
    "external_endpoint",
    "external_endpoint_async",
    "running_server",
    "server_launch",
    "server_process",
    "await_servers",
    "await_servers_async",
    "check_configured_port",
    "launch_servers",
    "start_servers",
    "stop_processes",
]


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_urls: list[str]
    model: str
    api_key: str | None = field(default=None, repr=False)
    # For a server lion-local started: why its process is gone, or None while it runs.
    server_check: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)
    # The engine and its version as the server reports them ("vllm 0.32.0"); None when unknown.
    engine: str | None = None
    # Keys of single base URLs, in place of api_key (published replicas each require their own).
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ServerLaunch:
    """What starting a server would run; `serve --dry-run` prints it."""

    command: list[str]
    environment: dict[str, str] = field(repr=False)
    port: int
    base_url: str
    health_url: str


@dataclass(frozen=True)
class StartedServer:
    """One server to start: its name, description, key, the environment to start it in, its model."""

    name: str
    spec: ServerSpec
    log_path: Path
    api_key: str | None = field(default=None, repr=False)
    environment: Mapping[str, str] | None = field(default=None, repr=False)
    model: str | None = None


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def server_launch(
    spec: ServerSpec, api_key: str | None, environment: Mapping[str, str] | None = None, model: str | None = None
) -> ServerLaunch:
    port = spec.port or free_port(_url_host(spec.host))
    internal_port = free_port() if spec.engine == "vllm" else None
    command = server_command(spec, spec.host, port, model)
    launch_environment = server_environment(spec, api_key, internal_port, environment)
    root = f"http://{_url_host(spec.host)}:{port}"
    return ServerLaunch(command, launch_environment, port, f"{root}/v1", f"{root}/health")


def expected_server(wanted: StartedServer, launch: ServerLaunch) -> Expected:
    """Who must answer on the launched server's port: the model name requests carry, its process."""
    spec = wanted.spec
    port_key = f"servers.{wanted.name}.port" if spec.port else None
    model = request_model_name(spec, wanted.model)
    return Expected(spec.host, launch.port, port_key, model, wanted.api_key)


def check_configured_port(name: str, spec: ServerSpec) -> None:
    """ServerError, naming the port, servers.<name>.port and its holder, when that port is in use."""
    if spec.engine == "external" or not spec.port:
        return
    problem = port_problem(name, spec.host, spec.port, f"servers.{name}.port")
    if problem is not None:
        raise ServerError(problem)


def server_process(wanted: StartedServer) -> tuple[ServerProcess, ServerLaunch]:
    """The (not yet started) process of a server, and what it will run. With a configured port it
    may start again on fresh internal ports (its own port stays, as announced); `launch_servers`
    lets a picked port move too."""
    spec = wanted.spec
    launch = server_launch(spec, wanted.api_key, wanted.environment, wanted.model)
    process = ServerProcess(
        wanted.name,
        launch.command,
        launch.environment,
        wanted.log_path,
        launch.health_url,
        spec.startup_timeout_s,
        stop_grace_s=spec.stop_grace_s or (20.0 if spec.engine == "vllm" else 10.0),
        expected=expected_server(wanted, launch),
    )
    if spec.port:
        process.relaunch_with = _fresh_launch(wanted)
    return process, launch


def _fresh_launch(wanted: StartedServer):
    """What starts `wanted` again on fresh ports (the configured port, if any, stays)."""

    def fresh() -> tuple[list[str], dict[str, str], str, Expected]:
        launch = server_launch(wanted.spec, wanted.api_key, wanted.environment, wanted.model)
        return launch.command, launch.environment, launch.health_url, expected_server(wanted, launch)

    return fresh


def engine_version(spec: ServerSpec, base_url: str, api_key: str | None) -> str | None:
    """The engine and version a started server reports: vLLM answers /version; `transformers serve`
    is the transformers of the environment that runs it, which answers no such route."""
    if spec.engine == "transformers":
        from importlib.metadata import version

        return f"transformers serve {version('transformers')}"
    root = base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.get(f"{root}/version", headers=headers, timeout=5.0, trust_env=False)
        return f"vllm {reply.json()['version']}"
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return "vllm (version unknown)"


# Each server, its process and what its first start ran; a start made again on fresh ports changes
# the process's command and health_url (the endpoints are built from those), not the ServerLaunch.
Launched = list[tuple[StartedServer, ServerProcess, ServerLaunch]]


def launch_servers(wanted: list[StartedServer], track: list[ServerProcess] | None = None) -> Launched:
    """Start the processes of `wanted` (quick: nothing waits for them to load). Each process is
    appended to `track` before it starts, so that whoever stops them on a signal knows all of them.
    A configured port already in use is refused before anything starts (ServerError).

    Call it on a thread that lives as long as the servers, such as the main thread: Linux sends
    a server SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG follows the thread).
    Each may be started again on fresh ports while it is waited for (serving/startup.py).
    """
    for each in wanted:
        check_configured_port(each.name, each.spec)
    launched = [(each, *server_process(each)) for each in wanted]
    for each, process, _ in launched:
        process.relaunch_with = _fresh_launch(each)  # its callers read the port from the process
    try:
        for _, process, _ in launched:
            if track is not None:
                track.append(process)
            process.start()
    except BaseException:
        stop_processes([process for _, process, _ in launched])
        raise
    return launched


def await_servers(launched: Launched) -> list[tuple[ServerProcess, Endpoint]]:
    """Wait until every launched server is up and confirmed as the one started, and return the
    endpoints; from synchronous code on the main thread (a signal interrupts the wait at once).

    If one fails, all are stopped and the ServerError of the first failure is raised.
    """
    if launched:
        wait_until_healthy([process for _, process, _ in launched])
    return _endpoints(launched)


async def await_servers_async(launched: Launched) -> list[tuple[ServerProcess, Endpoint]]:
    """`await_servers` in the event loop. Cancelled (a signal), the servers get SIGTERM and the
    caller finishes stopping them. Asking each server its version is blocking I/O: a thread does it."""
    await wait_until_healthy_async([process for _, process, _ in launched])
    return await asyncio.to_thread(_endpoints, launched)


def _endpoints(launched: Launched) -> list[tuple[ServerProcess, Endpoint]]:
    result = []
    for each, process, _ in launched:
        base_url = process.health_url.removesuffix("/health") + "/v1"  # the current start's port
        engine = engine_version(each.spec, base_url, each.api_key)
        logger.info("%s server: %s at %s", each.name, engine, base_url)
        endpoint = Endpoint(
            each.name,
            [base_url],
            request_model_name(each.spec, each.model),
            each.api_key,
            process.exit_report,
            engine,
        )
        result.append((process, endpoint))
    return result


def start_servers(wanted: list[StartedServer]) -> list[tuple[ServerProcess, Endpoint]]:
    """Start every server of `wanted` at once and wait until all are healthy."""
    return await_servers(launch_servers(wanted))


def external_endpoint(name: str, spec: ServerSpec, api_key: str | None, endpoint_dir: Path) -> Endpoint:
    """The endpoint of a server that already runs: its base_urls, or the live published ones."""
    if spec.base_urls:
        return Endpoint(name, list(spec.base_urls), request_model_name(spec), api_key, engine="external")
    return _published_endpoint(name, spec, api_key, live_published_endpoints(name, spec, endpoint_dir))


async def external_endpoint_async(name: str, spec: ServerSpec, api_key: str | None, endpoint_dir: Path) -> Endpoint:
    """`external_endpoint` in the event loop (a wait for a published endpoint does not block it)."""
    if spec.base_urls:
        return Endpoint(name, list(spec.base_urls), request_model_name(spec), api_key, engine="external")
    return _published_endpoint(name, spec, api_key, await live_published_endpoints_async(name, spec, endpoint_dir))


def _published_endpoint(
    name: str, spec: ServerSpec, api_key: str | None, published: tuple[dict[str, str | None], str]
) -> Endpoint:
    urls, published_model = published
    keys = {url: key for url, key in urls.items() if key}
    return Endpoint(name, list(urls), spec.served_model_name or published_model, api_key, api_keys=keys, engine="external")


@contextmanager
def running_server(wanted: StartedServer, endpoint_dir: Path | None = None) -> Iterator[Endpoint]:
    """Start (or reach) one server, yield its Endpoint, stop it afterwards."""
    if wanted.spec.engine == "external":
        directory = endpoint_dir or Path(".")
        yield external_endpoint(wanted.name, wanted.spec, wanted.api_key, directory)
        return
    launched = launch_servers([wanted])
    try:
        [(_, endpoint)] = await_servers(launched)
        yield endpoint
    finally:
        stop_processes([process for _, process, _ in launched])
