"""One server process: started in its own process group, health-checked, stopped as a group.

Every server runs under serving/supervisor.py, the leader of its process group, which takes the
whole tree down when it is stopped, when the server exits, and when the process that started it
dies (Linux sends it SIGTERM then): vLLM's engine-core and worker processes are separate, and a
SIGKILL of the API server alone, or of lion-local during a start, leaves them running. Stopping
sends SIGTERM to the group and waits: the server's stop_grace_s once it has answered /health, at most
LOADING_GRACE_S while it still loads (a loading vLLM API server ignores SIGTERM). Then SIGUSR1 tells
the supervisor to SIGKILL what is left at once, and the group is SIGKILLed last. Several servers
are stopped side by side (`stop_processes`): every group gets its SIGTERM first.

The wait for /health (and the check that the server answering is the one started) is in
serving/startup.py.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving.ports import port_problem

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
SUPERVISOR = Path(__file__).with_name("supervisor.py")
# A server that never answered /health is still loading: it gets this long after SIGTERM.
LOADING_GRACE_S = 5.0
# After SIGUSR1 (kill now), how long the supervisor may take to kill its group and exit.
HURRY_S = 5.0
# How much of a start's log is read for its failure (an address in use is near the end).
STARTUP_LOG_BYTES = 65536


class ServerError(RuntimeError):
    """A server that would not start or died; the message says which and where its log is."""


@dataclass(frozen=True)
class Expected:
    """What must answer on a started server's port, checked once its /health answers."""

    host: str  # the address the server binds
    port: int
    port_key: str | None  # the config key of a configured port (servers.<name>.port); None: picked free
    model: str | None  # the model name requests carry, which /v1/models must list; None: not checked
    api_key: str | None = field(default=None, repr=False)  # for /v1/models


Relaunch = Callable[[], tuple[list[str], dict[str, str], str, Expected]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (called in the child)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ServerProcess:
    def __init__(
        self,
        name: str,
        command: list[str],
        environment: dict[str, str],
        log_path: Path,
        health_url: str,
        startup_timeout_s: float,
        stop_grace_s: float = 30.0,
        expected: Expected | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.environment = environment
        self.log_path = log_path
        self.health_url = health_url
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.expected = expected
        # Starts the server again on fresh ports (a picked port taken before the server bound it);
        # None: it may not move (its caller has announced its port).
        self.relaunch_with: Relaunch | None = None
        self.attempt = 0  # starts so far
        self.process: subprocess.Popen | None = None
        self.answered = False  # /health answered, and by this server
        self._server_pid: int | None = None  # the server under the supervisor, once seen
        self._log_offset = 0  # where this start's lines begin in the log
        self._stop_began: float | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the server under its supervisor; a configured port already in use is refused first."""
        expected = self.expected
        if expected is not None and expected.port_key is not None:
            problem = port_problem(self.name, expected.host, expected.port, expected.port_key)
            if problem is not None:
                raise ServerError(problem)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt += 1
        self.answered, self._server_pid, self._stop_began, self._stopped = False, None, None, False
        with open(self.log_path, "a", encoding="utf-8") as log:
            self._log_offset = log.tell()
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: {shlex.join(self.command)}\n")
            log.flush()
            # Run as a file, not as a module of this package: it starts in a quarter of the time.
            supervised = [sys.executable, str(SUPERVISOR), "--grace-s", str(self.stop_grace_s), "--", *self.command]
            try:
                self.process = subprocess.Popen(
                    supervised,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise ServerError(f"{self.name} server could not start: {exc}") from exc
        logger.info("started %s server (pid %d), log: %s", self.name, self.process.pid, self.log_path)

    def relaunch(self) -> None:
        """Start again on the fresh ports `relaunch_with` gives (after this start lost its port)."""
        assert self.relaunch_with is not None, "this server may not move to another port"
        self.stop()
        self.command, self.environment, self.health_url, self.expected = self.relaunch_with()
        self.start()

    def failure_hint(self) -> str:
        """The log's last lines, and the config key to fix when the server rejected its own flags."""
        tail = self.log_tail()
        hint = ""
        if "unrecognized arguments" in tail or "error: argument" in tail:
            hint = (
                f"the server rejected a flag: check servers.{self.name}.vllm.extra_args (or the "
                f"transformers options), or whether servers.{self.name}.vllm.launcher runs a vLLM too old for it; "
            )
        return f"{hint}last log lines: {tail!r}; full log: {self.log_path}"

    def server_pid(self) -> int | None:
        """The server's own process (the supervisor's child), or None when it cannot be read."""
        if self.process is None:
            return None
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            self._server_pid = int(children[0])
        return self._server_pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_report(self) -> str | None:
        """None while the server runs; once it has exited, one line on how and where its log is."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        return (
            f"the {self.name} server (pid {self._server_pid or self.process.pid}) {how} while in use; "
            f"{self.failure_hint()}"
        )

    def begin_stop(self) -> None:
        """SIGTERM the process group (once); `finish_stop` waits for it. Quick: nothing is waited for."""
        if self.process is None or self._stop_began is not None or self.process.poll() is not None:
            return
        self._stop_began = time.monotonic()
        _signal_group(self.process.pid, signal.SIGTERM)  # start_new_session made the supervisor its group's leader

    def stop_grace(self, grace_s: float | None = None) -> float:
        """How long the group gets after SIGTERM: stop_grace_s (or less: grace_s), and at most
        LOADING_GRACE_S for a server that never answered (a loading vLLM API server ignores SIGTERM)."""
        grace = self.stop_grace_s if grace_s is None else min(grace_s, self.stop_grace_s)
        return grace if self.answered else min(grace, LOADING_GRACE_S)

    def finish_stop(self, grace_s: float | None = None) -> None:
        """Wait for the group after `begin_stop`; then SIGUSR1 (the supervisor kills what is left),
        and SIGKILL to the whole group in every case (children may outlive the supervisor)."""
        if self.process is None or self._stopped:
            return
        self.begin_stop()
        pgid = self.process.pid
        began = self._stop_began if self._stop_began is not None else time.monotonic()
        if not _exited_by(self.process, began + self.stop_grace(grace_s)):
            _signal_process(pgid, signal.SIGUSR1)
            if not _exited_by(self.process, time.monotonic() + HURRY_S):
                logger.warning("%s server: its supervisor did not exit; killing its group", self.name)
        _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        self._stopped = True
        logger.info("stopped %s server (exit code %s)", self.name, self.process.returncode)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the process group, wait its grace (`stop_grace`), then kill what is left."""
        self.begin_stop()
        self.finish_stop(grace_s)

    def startup_log(self) -> str:
        """What this start has written to the log so far (its last STARTUP_LOG_BYTES)."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - STARTUP_LOG_BYTES))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(line.strip() for line in self.startup_log().splitlines()[-lines:])


def stop_processes(processes: list[ServerProcess], grace_s: float | None = None) -> None:
    """Stop several servers side by side: each group gets its SIGTERM before any is waited for."""
    for process in processes:
        process.begin_stop()
    for process in processes:
        process.finish_stop(grace_s)


def _exited_by(process: subprocess.Popen, deadline: float) -> bool:
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_process(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
