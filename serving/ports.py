"""The ports of the servers lion-local starts: who holds one, whether the server answering on one is
the one lion-local started, and what to do when a start lost its port.

- A configured port (servers.<name>.port) already in use is refused before the server starts, in
  one line naming the port, the key and what holds it (`port_problem`).
- A port picked free (`free_port`) can be taken by another process in the seconds before the
  server binds it; the server then exits with "Address already in use". Such a start is made
  again on fresh ports, up to MAX_PORT_ATTEMPTS starts (`retry_decision`); vLLM's internal ports
  (VLLM_PORT) are always picked, and are picked again with it.
- Once /health answers, the server answering must be ours: /v1/models lists the model name the
  requests will carry, and the listening socket belongs to the server's process group where psutil
  can see it (`identity_problem`).

The decisions are pure functions; the I/O (a bind probe, psutil) is kept to the few below them.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from typing import Literal

import psutil

logger = logging.getLogger(__name__)

MAX_PORT_ATTEMPTS = 3
# What a server's log says when its bind failed (uvicorn, vLLM's own socket, ZMQ, torch.distributed).
ADDRESS_IN_USE_MARKS = ("Address already in use", "[Errno 98]", "EADDRINUSE", "address already in use")

RetryDecision = Literal["retry", "refuse", "fail"]


# ----------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------


def lost_its_port(log_text: str) -> bool:
    """True when a server's start log says that an address it binds was in use."""
    return any(mark in log_text for mark in ADDRESS_IN_USE_MARKS)


def retry_decision(
    *,
    lost_port: bool,
    may_restart: bool,
    configured_port_taken: bool,
    attempt: int,
    max_attempts: int = MAX_PORT_ATTEMPTS,
) -> RetryDecision:
    """After a start that failed: "retry" on fresh ports, "refuse" naming the configured port that
    another process holds, or "fail" with the server's own exit.

    `lost_port`: the log says an address was in use; `may_restart`: it may start again on fresh
    ports (a configured port stays; a picked one moves only where its caller reads the new one);
    `configured_port_taken`: the port is a configured one and another process holds it now (then
    the internal port was not the one lost); `attempt`: starts made so far.
    """
    if not lost_port:
        return "fail"
    if configured_port_taken:
        return "refuse"
    if not may_restart or attempt >= max_attempts:
        return "fail"
    return "retry"


def describe_holders(holders: list[tuple[int | None, str | None]] | None) -> str:
    """Who holds a port, for a message: "pid 123 (python3)", or "another process" when unknown."""
    named = sorted({f"pid {pid} ({name or 'unknown'})" for pid, name in holders or [] if pid is not None})
    return ", ".join(named) if named else "another process"


def configured_port_problem(name: str, port: int, port_key: str, holder: str) -> str:
    return (
        f"{port_key}: port {port} is already in use by {holder}; stop it, choose another port, or leave "
        f"{port_key} unset to have a free one picked (the {name} server was not started)"
    )


def identity_problem(
    name: str, port: int, model: str | None, served: list[str] | None, holders: list[tuple[int, str]], ours: bool | None
) -> str | None:
    """Why the server answering on `port` is not the one started for `name`, or None.

    `served`: the ids /v1/models lists (None: it gave no list); `holders`: the visible processes
    listening on the port; `ours`: whether one of them is in the started server's process group
    (None: no listener could be seen, so only the model name tells).
    """
    if ours is False:
        what = f"{describe_holders(list(holders))}, not the {name} server lion-local started"
    elif model is not None and (served is None or model not in served):
        listed = "no model list" if served is None else f"models {', '.join(map(repr, served)) or 'none'}"
        what = f"a server with {listed}, not the {name} server lion-local started for model {model!r}"
    else:
        return None
    return f"{name} server: port {port} is answered by {what}; another server holds the port"


# ----------------------------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now; probed as vLLM and uvicorn bind (SO_REUSEADDR)."""
    address = host if host not in ("", "0.0.0.0", "::") else ("::" if host == "::" else "0.0.0.0")
    family = socket.AF_INET6 if _is_ipv6(address) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE  # another error (a host not of this machine) is the server's to report
    return True


def listeners(port: int) -> list[tuple[int | None, str | None]] | None:
    """The processes listening on TCP `port` (pid None: another user's), or None when psutil cannot tell."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    found = []
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            found.append((connection.pid, _process_name(connection.pid)))
    return found


def port_problem(name: str, host: str, port: int, port_key: str) -> str | None:
    """One line naming the port, its key and its holder when another process holds the port, else None."""
    if port_is_free(host, port):
        return None
    return configured_port_problem(name, port, port_key, describe_holders(listeners(port)))


def answering_is_ours(port: int, group: int) -> tuple[list[tuple[int, str]], bool | None]:
    """The visible processes listening on `port`, and whether one is in process group `group`
    (None: none is visible)."""
    visible = [(pid, name or "unknown") for pid, name in listeners(port) or [] if pid is not None]
    if not visible:
        return [], None
    return visible, any(_process_group(pid) == group for pid, _ in visible)


def _process_name(pid: int | None) -> str | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
