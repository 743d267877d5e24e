"""Who may use a server lion-local starts: the key it requires, and the private files that carry it.

The rule, in one place (`server_key`):

- A configured key (servers.<name>.api_key_env) is always required by the server.
- Otherwise a vLLM server gets a random key of its own when it is bound beyond loopback, or when it
  is a service job's (`serve --publish`, slurm/serve.sh) on any address: the key of a server a run
  starts stays in that run's memory; a service job's is published with its endpoint.
- A server nobody could get the key of (`serve` in the foreground, bound beyond loopback, no key
  configured) is refused, and so is `transformers serve` bound beyond loopback: it cannot require a
  key. `allow_open_server: true` lifts both refusals, with a warning: anyone who reaches the node can
  use the server.

Keys travel in the environment (VLLM_API_KEY), never on a command line, and are written only to
endpoint files: mode 0600, in a 0700 directory, created with those modes (never loosened, then
tightened) and renamed into place. A reader refuses files of another user and files or
directories that others could read or write: the key may have leaked, or the endpoint is not one
of this user's jobs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import secrets
import stat
from pathlib import Path
from typing import Literal

from serving.process import ServerError
from serving.spec import ServerSpec

logger = logging.getLogger(__name__)

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700

# run: started by a stage, its clients in the same process; service: `serve --publish`, its key
# published with the endpoint; foreground: `serve` without --publish, its key shown to nobody.
StartedFor = Literal["run", "service", "foreground"]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def key_rule(name: str, spec: ServerSpec, has_configured_key: bool, started_for: StartedFor) -> str:
    """How server `name` is keyed: "configured", "generate" or "open"; raises ServerError when it
    may not start as it is."""
    if spec.engine == "external":  # not started here: it requires whatever key it was given
        return "configured" if has_configured_key else "open"
    beyond_loopback = not is_loopback(spec.host)
    if spec.allow_open_server:
        return "configured" if has_configured_key and spec.engine == "vllm" else "open"
    if spec.engine != "vllm":
        if beyond_loopback:
            raise ServerError(
                f"servers.{name}.host: {spec.host} binds beyond loopback, and `transformers serve` cannot require "
                f"an API key; bind 127.0.0.1 (`serve --host`, SERVE_HOST for slurm/serve.sh), use engine vllm, or set "
                f"servers.{name}.allow_open_server: true "
                "(anyone who reaches this node can then use it)"
            )
        return "open"
    if has_configured_key:
        return "configured"
    if started_for == "service" or (beyond_loopback and started_for == "run"):
        return "generate"
    if beyond_loopback:
        raise ServerError(
            f"servers.{name}.host: {spec.host} binds beyond loopback with no API key; pass --publish (a per-job "
            f"key, published with the endpoint), set servers.{name}.api_key_env, or set "
            f"servers.{name}.allow_open_server: true (anyone who reaches this node can then use it)"
        )
    return "open"


def server_key(name: str, spec: ServerSpec, configured_key: str | None, started_for: StartedFor) -> str | None:
    """The key server `name` will require (None: none), following `key_rule`."""
    rule = key_rule(name, spec, configured_key is not None, started_for)
    if rule == "open" and spec.allow_open_server and not is_loopback(spec.host):
        logger.warning(
            "servers.%s.allow_open_server: the server binds %s and requires no API key; anyone who can reach "
            "this node can use it",
            name,
            spec.host,
        )
    if rule == "configured":
        return configured_key
    if rule == "generate":
        return secrets.token_urlsafe(32)
    return None


def private_directory(directory: Path) -> None:
    """Create `directory` 0700, or check that an existing one is this user's and tighten it to 0700."""
    directory.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    status = directory.stat()
    if status.st_uid != os.geteuid():
        raise ServerError(
            f"endpoint directory {directory} belongs to {_user(status.st_uid)}, not to you; "
            "publish in a directory of your own (servers.<name>.endpoint_dir)"
        )
    if stat.S_IMODE(status.st_mode) != PRIVATE_DIRECTORY_MODE:
        os.chmod(directory, PRIVATE_DIRECTORY_MODE)
        logger.info("endpoint directory %s: permissions set to 0700 (it holds API keys)", directory)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by this user only from its first byte."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    # O_EXCL: never write through a file or link that is already there.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)  # whatever the umask
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def private_problem(path: Path, status: os.stat_result, wanted_mode: int, loose_fix: str) -> str | None:
    """Why `path` (of `status`) may not be trusted with a key, or None; `loose_fix` says what to do
    when only its mode is wrong."""
    if status.st_uid != os.geteuid():
        return (
            f"{path} belongs to {_user(status.st_uid)}, not to you ({_user(os.geteuid())}); lion-local uses only "
            "endpoints your own service jobs published: remove it, or set servers.<name>.endpoint_dir to a "
            "directory of your own"
        )
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        return (
            f"{path} has mode {mode:04o}, looser than {wanted_mode:04o}, so other users may read or change "
            f"what it holds; {loose_fix}"
        )
    return None


def read_private(path: Path) -> str:
    """The text of endpoint file `path`; ServerError when it is not this user's alone."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, encoding="utf-8") as handle:
        problem = private_problem(
            path,
            os.fstat(handle.fileno()),
            PRIVATE_FILE_MODE,
            "its key may have leaked: remove it and restart the service job that published it (a new job makes "
            "a new key)",
        )
        if problem is not None:
            raise ServerError(f"refusing endpoint file {problem}")
        return handle.read()


def check_private_directory(directory: Path) -> None:
    """ServerError when the endpoint directory is another user's or others may read or write it."""
    problem = private_problem(
        directory,
        directory.stat(),
        PRIVATE_DIRECTORY_MODE,
        f"check that every file in it is yours, then `chmod 700 {directory}` (a service job does it when it publishes)",
    )
    if problem is not None:
        raise ServerError(f"refusing endpoint directory {problem}")


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
