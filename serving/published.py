"""Endpoints published on the shared file system by long-running server jobs.

`slurm/serve.sh` runs `lion-local serve NAME --publish`: once the server answers /health, one
JSON file describing it is written atomically to <run_dir>/endpoints/<NAME>/ (or the server's
`endpoint_dir`), and removed when the server stops. A run whose config makes that server
`engine: external` with no `base_urls` reads every file there, keeps the endpoints that answer
/health, and balances its requests over them; replicas (a job array) simply publish more files.

A file holds the key its server requires (each replica has its own) and is written and read under
serving/access.py's rules: 0600 in a 0700 directory, this user's only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from serving.access import check_private_directory, private_directory, read_private, write_private
from serving.process import ServerError
from serving.spec import ServerSpec

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0


def reachable_host(bind_host: str) -> str:
    """The host name other nodes use for a server bound to `bind_host`."""
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return bind_host


def endpoint_file_name(host: str, port: int) -> str:
    job = os.environ.get("SLURM_JOB_ID", "local")
    return f"{job}-{host}-{port}.json"


@contextmanager
def published_endpoint(
    name: str, directory: Path, base_url: str, model: str, api_key: str | None
) -> Iterator[Path]:
    """Publish server `name` at `base_url` (requiring `api_key`) in `directory` while the block runs;
    yield the file's path."""
    private_directory(directory)
    address = urlsplit(base_url)
    host = str(address.hostname)
    port = address.port or (443 if address.scheme == "https" else 80)
    path = directory / endpoint_file_name(host, port)
    record = {
        "server": name,
        "base_url": base_url,
        "model": model,
        "api_key": api_key,
        "host": host,
        "port": port,
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_private(path, json.dumps(record, indent=2) + "\n")
    logger.info("published %s at %s in %s", name, base_url, path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        logger.info("withdrew %s (%s)", name, path)


def read_published(directory: Path) -> list[dict]:
    """Every well-formed endpoint file in `directory` (malformed ones are skipped with a warning).

    ServerError when the directory or a file in it is another user's or not private (access.py).
    """
    check_private_directory(directory)
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(read_private(path))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if not isinstance(record.get("base_url"), str) or not isinstance(record.get("model"), str):
                raise ValueError("needs string fields base_url and model")
            if not isinstance(record.get("api_key"), (str, type(None))):
                raise ValueError("api_key must be a string or null")
        except FileNotFoundError:
            continue  # withdrawn between the listing and the read
        except (OSError, ValueError) as exc:
            logger.warning("skipping endpoint file %s: %s", path, exc)
            continue
        record["file"] = str(path)
        records.append(record)
    return records


async def poll_pause(seconds: float) -> None:
    """The wait between two looks at an endpoint directory (the tests' fake clock replaces it)."""
    await asyncio.sleep(seconds)


def _health_url(base_url: str) -> str:
    return f"{base_url.rstrip('/').removesuffix('/v1')}/health"


async def _is_healthy_async(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        return (await client.get(_health_url(base_url))).status_code == 200
    except httpx.HTTPError:
        return False


def _published_records(name: str, directory: Path) -> list[dict]:
    try:
        return read_published(directory) if directory.is_dir() else []
    except ServerError as exc:
        raise ServerError(f"servers.{name}: {exc}") from None


def _chosen(name: str, directory: Path, records: list[dict], live: list[dict]) -> tuple[dict[str, str | None], str]:
    """The live endpoints (base URL -> the key it requires) and their one model."""
    models = sorted({record["model"] for record in live})
    if len(models) > 1:
        raise ServerError(
            f"servers.{name}: the endpoints published in {directory} serve different models "
            f"({', '.join(models)}); stop the service jobs of the wrong one"
        )
    stale = len(records) - len(live)
    logger.info(
        "%s: %d published endpoint(s) in %s%s", name, len(live), directory, f" ({stale} not answering, ignored)" if stale else ""
    )
    return {record["base_url"]: record.get("api_key") for record in live}, models[0]


def _none_live(name: str, server: ServerSpec, directory: Path, records: list[dict]) -> ServerError:
    seen = f"{len(records)} file(s) there, none answering /health" if records else "no endpoint file there"
    return ServerError(
        f"servers.{name}: no live endpoint published in {directory} after "
        f"{server.startup_timeout_s:.0f} s ({seen}); start one with "
        f"`sbatch slurm/serve.sh <config> {name}` or set servers.{name}.base_urls"
    )


def live_published_endpoints(name: str, server: ServerSpec, directory: Path) -> tuple[dict[str, str | None], str]:
    """`live_published_endpoints_async` for synchronous code (never from inside an event loop)."""
    return asyncio.run(live_published_endpoints_async(name, server, directory))


async def live_published_endpoints_async(
    name: str, server: ServerSpec, directory: Path
) -> tuple[dict[str, str | None], str]:
    """The published endpoints of `name` that answer /health (base URL -> the key it requires) and
    the model they serve.

    Waits up to servers.<name>.startup_timeout_s for one to appear, so an iteration job may be
    submitted together with the service job that hosts its teacher; the waits are asyncio sleeps,
    so a signal cancels them at once and nothing else of the command is held up.
    """
    deadline = time.monotonic() + server.startup_timeout_s
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        for attempt in range(1 << 30):
            records = _published_records(name, directory)
            live = [record for record in records if await _is_healthy_async(client, record["base_url"])]
            if live:
                return _chosen(name, directory, records, live)
            if time.monotonic() > deadline:
                raise _none_live(name, server, directory, records)
            if attempt == 0:
                logger.info("%s: waiting for a published endpoint in %s", name, directory)
            await poll_pause(POLL_INTERVAL_S)
    raise AssertionError("unreachable")
