"""The first process of every server lion-local starts: it runs the server and takes its whole
process tree down with it.

    python serving/supervisor.py --grace-s 20 -- vllm serve ...

Why it exists: vLLM is an API server, an engine-core process and workers. SIGKILL reaches only
the process it is sent to, and an API server still loading ignores the SIGTERM that Linux sends
it when its parent dies (measured: killing lion-local 15 s into a vLLM start left the API server
and its engine core running). So the process lion-local starts is this small one, which does
nothing but wait:

- It leads the server's process group, and Linux sends it SIGTERM when lion-local dies
  (serving.process starts it with PR_SET_PDEATHSIG).
- On SIGTERM, SIGINT or SIGHUP (lion-local stopping it, lion-local killed, `scancel`), or when
  the server exits by itself, it sends SIGTERM to every other process of its group, waits up to
  --grace-s for them, then SIGKILLs what is left. Python's multiprocessing resource trackers are
  killed last: they unlink the shared memory of the processes they outlived.
- SIGUSR1, before or during that wait, cuts it short: what is left is SIGKILLed at once (trackers
  still last). lion-local sends it when a server that is still loading has had its short grace.
- It exits as the server did (the same code, or killed by the same signal), so the caller sees
  the server's own end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

RESOURCE_TRACKER = "multiprocessing.resource_tracker"


def group_members(pgid: int) -> dict[int, str]:
    """The live processes of group `pgid` other than this one -> their command lines.

    psutil lists the processes and reads their state and command line; zombies are left out
    (exited, only waiting to be reaped). psutil has no process-group field, so os.getpgid asks."""
    members = {}
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            if os.getpgid(pid) != pgid:
                continue
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                members[pid] = " ".join(process.cmdline())
        except (ProcessLookupError, psutil.Error):
            continue  # it exited while we looked, or cannot be read
    return members


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_until_gone(
    server: subprocess.Popen, keep: set[int], deadline: float, hurry: Callable[[], bool] = lambda: False
) -> None:
    """Wait until only `keep` is left of the group (the server reaped once it exits), the deadline,
    or `hurry()`."""
    while time.monotonic() < deadline and not hurry() and set(group_members(os.getpgrp())) - keep:
        server.poll()
        time.sleep(0.1)


def take_down_group(server: subprocess.Popen, grace_s: float, hurry: Callable[[], bool] = lambda: False) -> None:
    members = group_members(os.getpgrp())
    trackers = {pid for pid, command in members.items() if RESOURCE_TRACKER in command}
    signal_all([pid for pid in members if pid not in trackers], signal.SIGTERM)
    wait_until_gone(server, trackers, time.monotonic() + grace_s, hurry)
    signal_all([pid for pid in group_members(os.getpgrp()) if pid not in trackers], signal.SIGKILL)
    # A tracker unlinks its leftover shared memory once the last process it served is gone.
    wait_until_gone(server, set(), time.monotonic() + 5.0)
    signal_all(list(group_members(os.getpgrp())), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace-s", type=float, default=20.0, help="Wait after SIGTERM before SIGKILL.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The server's command, after --.")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the server's command after --")
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # lead a group of its own, so that taking it down reaches only the server
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, lambda number, _frame: stopping.append(number))
    try:
        server = subprocess.Popen(command)
    except OSError as exc:
        sys.exit(f"supervisor: cannot start {command[0]!r}: {exc}")
    while server.poll() is None and not stopping:
        time.sleep(0.2)
    take_down_group(server, args.grace_s, hurry=lambda: signal.SIGUSR1 in stopping)
    code = server.wait()
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # these two have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
