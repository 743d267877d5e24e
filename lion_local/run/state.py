"""The run's durable state: state.json, the append-only journals, whole-file writes and the writer lock.

A stage can be killed at any instant and re-run. That holds because of three rules here:
- every completed model call is one JSON line appended (and flushed) to a journal, so a re-run
  reads the journal and asks only for what is missing; a line torn by the kill is dropped;
- whole files (pools, judgements, state.json) are written to a temporary name and renamed;
- a stage is done only when its marker is in state.json, written last.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lion_local.errors import InputError, LionError
from lion_local.run.layout import RunDir, Stage

logger = logging.getLogger(__name__)

class RunStateError(InputError):
    """state.json cannot be read; the message names the file and how to repair it."""


class RunLockedError(LionError):
    """Another lion-local process is writing to this run directory."""


class LockUnsupportedError(InputError):
    """The file system under a lock file refuses flock (some Lustre and NFS mounts)."""


# ----------------------------------------------------------------------------------------------
# Whole-file writes and state.json
# ----------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_state(run: RunDir) -> dict[str, Any]:
    if not run.state_json.exists():
        return {"iteration": 0, "completed": [], "stage_seconds": {}}
    try:
        state = json.loads(run.state_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunStateError(f"{run.state_json}: cannot read the run state: {exc}; {_STATE_HINT}") from None
    if not isinstance(state, dict):
        raise RunStateError(f"{run.state_json}: the run state must be a JSON object; {_STATE_HINT}")
    state.setdefault("iteration", 0)
    state.setdefault("completed", [])
    state.setdefault("stage_seconds", {})
    if not isinstance(state["completed"], list) or not all(isinstance(m, str) for m in state["completed"]):
        raise RunStateError(f"{run.state_json}: 'completed' must be a list of stage names; {_STATE_HINT}")
    for marker in state["completed"]:
        try:
            Stage.parse(marker)
        except ValueError as exc:
            raise RunStateError(f"{run.state_json}: 'completed': {exc}; {_STATE_HINT}") from None
    if not isinstance(state["iteration"], int) or not isinstance(state["stage_seconds"], dict):
        raise RunStateError(f"{run.state_json}: 'iteration' must be a number and 'stage_seconds' an object; {_STATE_HINT}")
    return state


# state.json is only ever replaced whole (write_atomic), so a damaged one was changed by hand.
_STATE_HINT = (
    'lion-local never writes it partially: restore it, or write {"completed": [...]} with the '
    'stages that finished (e.g. "1/imitation")'
)


def completed_stages(run: RunDir) -> list[Stage]:
    """The stages state.json records as finished, in the order they finished."""
    return [Stage.parse(marker) for marker in read_state(run)["completed"]]


def mark_completed(run: RunDir, stage: Stage, seconds: float) -> None:
    """Record a finished stage in state.json (its marker, e.g. "2/discrimination", and its time)."""
    state = read_state(run)
    marker = str(stage)
    if marker not in state["completed"]:
        state["completed"].append(marker)
    if stage.iteration.number is not None:
        state["iteration"] = max(state["iteration"], stage.iteration.number)
    state["stage_seconds"][marker] = round(state["stage_seconds"].get(marker, 0.0) + seconds, 3)
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_atomic(run.state_json, json.dumps(state, indent=2) + "\n")


def add_stage_seconds(run: RunDir, stage: Stage, seconds: float) -> None:
    """Time spent on an unfinished stage (a killed or failed attempt) still counts in its timings."""
    if not run.state_json.parent.exists():
        return
    state = read_state(run)
    marker = str(stage)
    state["stage_seconds"][marker] = round(state["stage_seconds"].get(marker, 0.0) + seconds, 3)
    write_atomic(run.state_json, json.dumps(state, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Journals
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """All complete records of a JSONL file; a torn last line (no newline, or bad JSON) is skipped.

    Bad JSON anywhere else means the file was edited or corrupted, and raises RunStateError.
    """
    if not path.exists():
        return []
    return _intact_records(path, path.read_bytes())[0]


def _intact_records(path: Path, data: bytes) -> tuple[list[dict], int]:
    """The records of `data` and the length of its intact part (all of it, less a torn last line)."""
    lines = data.split(b"\n")
    torn_tail = lines.pop()  # b"" when the file ends with a newline
    intact = len(data) - len(torn_tail)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    offset = 0
    for index, line in enumerate(lines):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a cut multi-byte char
            if index == last and not torn_tail.strip():
                logger.warning("%s:%d: dropping a damaged last line", path, index + 1)
                intact = start
                continue
            raise RunStateError(
                f"{path}:{index + 1}: not valid JSON, so the file was edited or corrupted; restore it, or "
                "delete that line and those after it (their calls are asked again)"
            ) from None
    if torn_tail.strip():
        logger.warning("%s:%d: dropping a torn last line (no newline)", path, len(lines) + 1)
    return records, intact


class Journal:
    """An append-only JSONL file of completed calls; opening it drops a torn last line for good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "ab+")
        self._handle.seek(0)
        data = self._handle.read()
        try:
            self.records, intact = _intact_records(path, data)
        except RunStateError:
            self._handle.close()
            raise
        if intact != len(data):
            self._handle.truncate(intact)  # new lines must start on a fresh line

    def append(self, record: dict) -> None:
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()  # in the page cache: a SIGKILL after this loses nothing
        self.records.append(record)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# One writer per run
# ----------------------------------------------------------------------------------------------


_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


def lock_exclusively(handle: Any, path: Path, wait: bool) -> bool:
    """flock `handle` (the open file `path`) exclusively; False when not waiting and it is held.

    The kernel drops the lock when its holder dies, which is what makes a killed run's lock stale
    rather than stuck. A file system without flock cannot give that, so it is refused, naming the file.
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        raise LockUnsupportedError(
            f"{path}: this file system does not support file locks (flock: {exc.strerror}); put the "
            "run directory and tiny_models.dir on one that does (a local disk, or Lustre mounted with -o flock)"
        ) from None
    return True


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold the run directory's writer lock; the kernel releases it when the holder dies."""
    run.root.mkdir(parents=True, exist_ok=True)
    lock_path = run.lock
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        held = lock_exclusively(handle, lock_path, wait=False)
    except BaseException:  # no flock here, or another OSError: the handle must not leak
        handle.close()
        raise
    if not held:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(
            f"{run.root}: the run is in use by {holder}; wait for it to finish or stop it first"
        ) from None
    handle.seek(0)
    left_behind = handle.read().strip()
    if left_behind:
        # A clean exit empties the file, so a name here is a holder that died (SIGKILL, a lost node).
        logger.warning("%s: taking over the stale lock of %s, which no longer runs", run.root, left_behind)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        handle.close()
