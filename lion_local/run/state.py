"""The run's durable state: state.json, the append-only journals, whole-file writes and the writer lock.

A stage can be killed at any instant and re-run. That holds because of three rules here:
- every completed model call is one JSON line appended (and flushed) to a journal, so a re-run
  reads the journal and asks only for what is missing; a line torn by the kill is dropped;
- whole files (pools, judgements, state.json) are written to a temporary name and renamed;
- a stage is done only when its marker is in state.json, written last.
A write that fails (a full disk) leaves nothing torn: a whole-file write removes its temporary
file, a journal append cuts the file back to its length before, and the lock's release never
raises over the error that ended the command. What is read is checked, not trusted: state.json's
fields and each journal line's type (a JSON object; a string "id" in the files keyed by id).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock

from lion_local.errors import InputError, LionError
from lion_local.run.layout import FINAL, ID_KEYED_FILES, RunDir, Stage

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
    """Write `text` to `path` so that a reader sees the old file or the new one, never a mix.

    On any failure (a full disk, a kill) the temporary file is removed and the old file is left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError as cleanup:  # the first error is the one to report
            logger.warning("%s: cannot remove %s: %s", path, temporary, cleanup.strerror)
        if isinstance(exc, OSError):  # named by the file it was to replace (the temporary is gone)
            exc.filename, exc.filename2 = str(path), None
        raise


def name_path(exc: BaseException, path: Path) -> None:
    """Name `path` in an OSError that names no file (a failed write, flush or fsync), for its one line."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(path)


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
    problem = state_problem(state)
    if problem is not None:
        raise RunStateError(f"{run.state_json}: {problem}; {_STATE_HINT}")
    return state


def state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a parsed state.json, or None when nothing is (pure)."""
    completed, iteration, seconds = state["completed"], state["iteration"], state["stage_seconds"]
    if not isinstance(completed, list) or not all(isinstance(marker, str) for marker in completed):
        return "'completed' must be a list of stage names"
    for marker in completed:
        try:
            Stage.parse(marker)
        except ValueError as exc:
            return f"'completed': {exc}"
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        return f"'iteration' must be a number from 0, not {json.dumps(iteration)}"
    if not isinstance(seconds, dict):
        return "'stage_seconds' must be an object of {\"<stage>\": <seconds>}"
    for marker, value in seconds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            return f"'stage_seconds' of {marker!r} must be a number of seconds from 0, not {json.dumps(value)}"
    return None


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


def reopen_final(run: RunDir, aside: Path) -> None:
    """Make the final imitation run again from scratch: its marker and time leave state.json,
    then what it wrote (final/ and its evaluation eval/final/) moves into `aside`.

    Each step can be repeated, so a command killed between them is finished by the next one.
    """
    state = read_state(run)
    marker = str(FINAL.stage("imitation"))
    if marker in state["completed"] or marker in state["stage_seconds"]:
        state["completed"] = [each for each in state["completed"] if each != marker]
        state["stage_seconds"].pop(marker, None)
        write_atomic(run.state_json, json.dumps(state, indent=2) + "\n")
    for source, name in ((run.final.path, "final"), (run.evaluation(FINAL).path, "eval-final")):
        if source.exists():
            aside.mkdir(parents=True, exist_ok=True)
            target, number = aside / name, 1
            while target.exists():  # set aside before, by an earlier change
                number += 1
                target = aside / f"{name}-{number}"
            os.replace(source, target)
            logger.warning("%s: moved to %s; the final imitation runs again", source, target)


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
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a cut multi-byte char
            if index == last and not torn_tail.strip():
                logger.warning("%s:%d: dropping a damaged last line", path, index + 1)
                intact = start
                continue
            raise RunStateError(f"{path}:{index + 1}: not valid JSON, {_EDITED}") from None
        problem = record_problem(record, path.name in ID_KEYED_FILES)
        if problem is not None:  # whole JSON, so not torn by a kill: changed by hand
            raise RunStateError(f"{path}:{index + 1}: {problem}, {_EDITED}")
        records.append(record)
    if torn_tail.strip():
        logger.warning("%s:%d: dropping a torn last line (no newline)", path, len(lines) + 1)
    return records, intact


_EDITED = (
    "so the file was edited or corrupted; restore it, or delete that line and those after it "
    "(their calls are asked again)"
)


def record_problem(record: Any, keyed: bool) -> str | None:
    """What makes a parsed line no record of a run file, or None (pure): every record is a JSON
    object, and a file keyed by id (layout.ID_KEYED_FILES) gives each a string "id"."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if keyed and not isinstance(record.get("id"), str):
        return "no \"id\"" if "id" not in record else f"\"id\" is {json.dumps(record['id'])}, not a string"
    return None


class Journal:
    """An append-only JSONL file of completed calls; opening it drops a torn last line for good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each line goes to the kernel in append() itself, so nothing is left in a
        # buffer for a later flush (or close) to write half of after a failed append.
        self._handle = open(path, "ab+", buffering=0)
        try:
            self._handle.seek(0)
            data = self._handle.readall()
            self.records, intact = _intact_records(path, data)
            if intact != len(data):
                self._handle.truncate(intact)  # new lines must start on a fresh line
        except BaseException as exc:
            self._handle.close()
            name_path(exc, path)
            raise

    def append(self, record: dict) -> None:
        """Append one line; in the page cache on return, so a SIGKILL after this loses nothing.

        A failed write (a full disk) cuts the file back to its length before, so no torn line is
        left, and raises.
        """
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        before = os.fstat(self._handle.fileno()).st_size
        try:
            while line:
                line = line[self._handle.write(line) :]
        except BaseException as exc:
            try:
                self._handle.truncate(before)
            except OSError as cleanup:  # reopening the journal drops the torn line instead
                logger.warning("%s: cannot cut a failed append back: %s", self.path, cleanup.strerror)
            name_path(exc, self.path)
            raise
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

    filelock's lock_descriptor (FileLock's own flock, on a file we opened) keeps the lock file
    ours: run_lock writes the holder's name in it and a refused contender reads it back. The kernel
    drops the lock when its holder dies, which is what makes a killed run's lock stale rather than
    stuck. A file system without flock cannot give that, so it is refused, naming the file (where
    FileLock would fall back to a lock file that a kill leaves behind).
    """
    try:
        return filelock.lock_descriptor(handle.fileno(), blocking=wait, poll_interval=0.1)
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        raise LockUnsupportedError(
            f"{path}: this file system does not support file locks (flock: {exc.strerror}); put the "
            "run directory and tiny_models.dir on one that does (a local disk, or Lustre mounted with -o flock)"
        ) from None


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold the run directory's writer lock; the kernel releases it when the holder dies."""
    run.root.mkdir(parents=True, exist_ok=True)
    lock_path = run.lock
    # Unbuffered, so no holder line waits in a buffer that a failed write leaves for the release.
    handle = open(lock_path, "a+b", buffering=0)
    try:
        held = lock_exclusively(handle, lock_path, wait=False)
    except BaseException:  # no flock here, or another OSError: the handle must not leak
        handle.close()
        raise
    if not held:
        handle.seek(0)
        holder = handle.read().decode("utf-8", "replace").strip() or "another process"
        handle.close()
        raise RunLockedError(
            f"{run.root}: the run is in use by {holder}; wait for it to finish or stop it first"
        ) from None
    try:
        _write_holder(run, handle)
        yield
    finally:
        _release(handle, lock_path)


def _write_holder(run: RunDir, handle: Any) -> None:
    handle.seek(0)
    left_behind = handle.read().decode("utf-8", "replace").strip()
    if left_behind:
        # A clean exit empties the file, so a name here is a holder that died (SIGKILL, a lost node).
        logger.warning("%s: taking over the stale lock of %s, which no longer runs", run.root, left_behind)
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n".encode("utf-8"))
    except OSError as exc:
        name_path(exc, run.lock)
        raise


def _release(handle: Any, path: Path) -> None:
    """Empty the lock file (a clean exit leaves no holder named) and close it. It never raises, so
    it cannot hide the error that ends a command; the kernel drops the lock with the handle anyway."""
    try:
        handle.truncate(0)
    except OSError as exc:
        logger.warning("%s: cannot empty the lock file: %s", path, exc.strerror)
    try:
        handle.close()
    except OSError as exc:
        logger.warning("%s: cannot close the lock file: %s", path, exc.strerror)
