"""One server process: started in its own process group, health-checked, stopped as a group.

Every server runs under serving/supervisor.py, the leader of its process group, which takes the
whole tree down when it is stopped, when the server exits, and when the process that started it
dies (Linux sends it SIGTERM then): vLLM's engine-core and worker processes are separate, and a
SIGKILL of the API server alone, or of lion-local during a start, leaves them running. Stopping
sends SIGTERM to the group, waits, then SIGKILLs the group.
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
from collections import deque
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
SUPERVISOR = Path(__file__).with_name("supervisor.py")


class ServerError(RuntimeError):
    """A server that would not start or died; the message says which and where its log is."""


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
    ) -> None:
        self.name = name
        self.command = command
        self.environment = environment
        self.log_path = log_path
        self.health_url = health_url
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.process: subprocess.Popen | None = None
        self._server_pid: int | None = None  # the server under the supervisor, once seen

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
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

    def wait_until_healthy(self) -> None:
        wait_until_healthy([self])

    def healthy(self, client: httpx.Client, deadline: float) -> bool:
        """One health poll: True once /health answers 200; raises if the process exited or time ran out."""
        assert self.process is not None, "start() first"
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"{self.name} server exited with code {code} while starting; {self.failure_hint()}")
        try:
            if client.get(self.health_url).status_code == 200:
                self.server_pid()
                logger.info("%s server is healthy at %s", self.name, self.health_url)
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            self.stop()
            raise ServerError(
                f"{self.name} server not healthy after {self.startup_timeout_s:.0f} s "
                f"(servers.{self.name}.startup_timeout_s); log: {self.log_path}"
            )
        return False

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

    def stop(self) -> None:
        """SIGTERM the process group, wait up to stop_grace_s, then SIGKILL the group."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session made the server its group's leader
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                # The supervisor itself waits stop_grace_s for the server, then kills what is left.
                self.process.wait(timeout=self.stop_grace_s + 10.0)
            except subprocess.TimeoutExpired:
                logger.warning("%s server ignored SIGTERM for %.0f s; killing it", self.name, self.stop_grace_s)
        # Children (e.g. vLLM engine cores) may outlive the leader; the group goes in every case.
        _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        logger.info("stopped %s server (exit code %s)", self.name, self.process.returncode)

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return " | ".join(line.strip() for line in deque(log, maxlen=lines))
        except OSError:
            return ""


def wait_until_healthy(processes: list[ServerProcess]) -> None:
    """Poll every started process until all answer /health, so servers load side by side.

    The first one to die or time out raises, after every process of the list is stopped.
    """
    deadlines = {id(process): time.monotonic() + process.startup_timeout_s for process in processes}
    pending = list(processes)
    try:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while pending:
                pending = [process for process in pending if not process.healthy(client, deadlines[id(process)])]
                if pending:
                    time.sleep(0.2)
    except BaseException:
        for process in processes:
            process.stop()
        raise


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
