"""The run directory's on-disk rules (lion_local/run/state.py).

Covered:
- Journal: records survive a reopen; a torn last line (no trailing newline, or a newline-ended
  line of bad JSON) is dropped and cut off the file, so the next append starts on a fresh line
  and the whole file parses again (also when the cut falls inside a multi-byte UTF-8 character);
  bad JSON in the middle of a file (even just before a torn last line) is an error naming file
  and line; an absent or empty file is an empty journal.
- read_jsonl: the same torn-line rules, without touching the file.
- write_atomic / write_jsonl_atomic: content, no temporary file left, parent folders created.
- state.json: read_state defaults, mark_completed (idempotent marker, highest numeric iteration,
  "final/..." ignored for the iteration, accumulated seconds), add_stage_seconds; a damaged
  state.json (bad JSON, not an object, wrong field types) is a RunStateError naming the file,
  and `lion-local status` turns it into exit 2 with one line.
- run_lock: a second process is refused with a message naming the run and the holder's pid; a
  holder killed with SIGKILL leaves a lock that can be taken again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lion_local.run.layout import FINAL, RunDir, Stage
from lion_local.run.state import Journal, LockUnsupportedError, RunLockedError, RunStateError, add_stage_seconds, mark_completed, read_jsonl, read_state, run_lock, write_atomic, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[dict]:
    """Every line of the file parsed strictly: fails on a torn or merged line."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path} does not end with a newline: {text!r}"
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------
# Journal
# ----------------------------------------------------------------------------------------------


def test_journal_records_survive_a_reopen(tmp_path: Path):
    path = tmp_path / "sub" / "calls.jsonl"  # the parent folder does not exist yet
    with Journal(path) as journal:
        assert journal.records == []
        journal.append({"id": "a", "n": 1})
        journal.append({"id": "b", "text": "naïve café"})
        assert journal.records == [{"id": "a", "n": 1}, {"id": "b", "text": "naïve café"}]
    with Journal(path) as reopened:
        assert reopened.records == [{"id": "a", "n": 1}, {"id": "b", "text": "naïve café"}]
        reopened.append({"id": "c"})
    assert _lines(path) == [{"id": "a", "n": 1}, {"id": "b", "text": "naïve café"}, {"id": "c"}]


def test_journal_append_is_on_disk_before_close(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    journal = Journal(path)
    try:
        journal.append({"id": "a"})
        assert read_jsonl(path) == [{"id": "a"}]  # flushed: a kill now would lose nothing
    finally:
        journal.close()


def test_journal_drops_a_torn_last_line_and_the_next_append_starts_a_fresh_line(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "answ', encoding="utf-8")
    with Journal(path) as journal:
        assert journal.records == [{"id": "a"}, {"id": "b"}]
        assert path.read_text(encoding="utf-8") == '{"id": "a"}\n{"id": "b"}\n'  # truncated on open
        journal.append({"id": "c", "answer": "again"})
    records = _lines(path)
    assert records == [{"id": "a"}, {"id": "b"}, {"id": "c", "answer": "again"}]
    assert len({r["id"] for r in records}) == len(records)
    with Journal(path) as reopened:
        assert reopened.records == records


def test_journal_drops_a_complete_record_that_lacks_its_newline(tmp_path: Path):
    # Valid JSON but no newline: the write was cut before the newline, so it is not committed.
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}', encoding="utf-8")
    with Journal(path) as journal:
        assert journal.records == [{"id": "a"}]
        journal.append({"id": "b"})
    assert _lines(path) == [{"id": "a"}, {"id": "b"}]


def test_journal_drops_a_newline_ended_last_line_of_bad_json(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "x\n', encoding="utf-8")
    with Journal(path) as journal:
        assert journal.records == [{"id": "a"}]
        assert path.read_text(encoding="utf-8") == '{"id": "a"}\n'
        journal.append({"id": "b"})
    assert _lines(path) == [{"id": "a"}, {"id": "b"}]


def test_journal_torn_inside_a_multibyte_character_is_dropped(tmp_path: Path):
    # Journals are written with ensure_ascii=False, so a cut can fall inside a UTF-8 sequence.
    path = tmp_path / "calls.jsonl"
    whole = json.dumps({"id": "b", "answer": "café"}, ensure_ascii=False).encode("utf-8")
    cut = whole[: whole.index("é".encode("utf-8")) + 1]  # first byte of the two-byte é only
    path.write_bytes(b'{"id": "a"}\n' + cut)
    assert read_jsonl(path) == [{"id": "a"}]
    with Journal(path) as journal:
        assert journal.records == [{"id": "a"}]
        journal.append({"id": "b", "answer": "café"})
    assert _lines(path) == [{"id": "a"}, {"id": "b", "answer": "café"}]


def test_journal_rejects_bad_json_in_the_middle_naming_file_and_line(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    original = '{"id": "a"}\nnot json\n{"id": "c"}\n{"id": "d"}\n'
    path.write_text(original, encoding="utf-8")
    with pytest.raises(RunStateError, match=rf"{path}:2\b.*delete that line"):
        Journal(path)
    assert path.read_text(encoding="utf-8") == original  # a corrupt file is not "repaired"


def test_journal_rejects_bad_json_followed_by_a_torn_line(tmp_path: Path):
    # Only the last line can be torn; "bad" here has a newline and a line after it, so it is
    # corruption in the middle. Accepting it would let the journal open, append, and then
    # refuse the very file it wrote on the next open.
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\nbad\n{"id": "c", "ans', encoding="utf-8")
    with pytest.raises(RunStateError, match=rf"{path}:2\b.*delete that line"):
        read_jsonl(path)
    with pytest.raises(RunStateError, match=rf"{path}:2\b.*delete that line"):
        Journal(path)


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_journal_of_an_absent_or_empty_file_is_empty(tmp_path: Path, content: str | None):
    path = tmp_path / "calls.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with Journal(path) as journal:
        assert journal.records == []
        journal.append({"id": "a"})
    assert read_jsonl(path) == [{"id": "a"}]


# ----------------------------------------------------------------------------------------------
# read_jsonl
# ----------------------------------------------------------------------------------------------


def test_read_jsonl_absent_file_is_empty(tmp_path: Path):
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    assert not (tmp_path / "missing.jsonl").exists()


@pytest.mark.parametrize(
    "content",
    [
        '{"id": "a"}\n{"id": "b"}\n{"id": "c", "ans',  # torn, no newline
        '{"id": "a"}\n{"id": "b"}\n{"id": "c"}',  # complete JSON but no newline
        '{"id": "a"}\n{"id": "b"}\n{"id": "c", "ans\n',  # newline-ended bad JSON
    ],
)
def test_read_jsonl_skips_a_torn_last_line_without_changing_the_file(tmp_path: Path, content: str):
    path = tmp_path / "calls.jsonl"
    path.write_text(content, encoding="utf-8")
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]
    assert path.read_text(encoding="utf-8") == content


def test_read_jsonl_skips_blank_lines(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n\n   \n{"id": "b"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]


def test_read_jsonl_rejects_bad_json_in_the_middle(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{broken\n{"id": "d"}\n{"id": "e"}\n', encoding="utf-8")
    with pytest.raises(RunStateError) as excinfo:
        read_jsonl(path)
    assert f"{path}:3:" in str(excinfo.value)


# ----------------------------------------------------------------------------------------------
# Whole-file writes
# ----------------------------------------------------------------------------------------------


def test_write_atomic_creates_parents_replaces_content_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "a" / "b" / "state.json"
    write_atomic(path, "first\n")
    assert path.read_text(encoding="utf-8") == "first\n"
    write_atomic(path, "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_write_jsonl_atomic_writes_one_line_per_record(tmp_path: Path):
    path = tmp_path / "iter_1" / "pool.jsonl"
    records = [{"id": "a", "instruction": "Décrivez la mer."}, {"id": "b", "parent": None}]
    write_jsonl_atomic(path, records)
    assert _lines(path) == records
    assert "Décrivez" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert read_jsonl(path) == records
    write_jsonl_atomic(path, [])
    assert path.read_text(encoding="utf-8") == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["pool.jsonl"]


# ----------------------------------------------------------------------------------------------
# state.json
# ----------------------------------------------------------------------------------------------


def test_read_state_defaults_when_state_json_is_missing(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    assert read_state(run) == {"iteration": 0, "completed": [], "stage_seconds": {}}
    assert not run.root.exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"completed": ["1/imitation"', "cannot read the run state"),
        ("[]", "must be a JSON object"),
        ('{"completed": "1/imitation"}', "'completed' must be a list"),
        ('{"completed": [], "iteration": "two"}', "'iteration' must be a number"),
        (b"\xff\xfe{}", "cannot read the run state"),
    ],
)
def test_damaged_state_json_is_reported_with_its_path(tmp_path: Path, content, problem: str):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    if isinstance(content, bytes):
        run.state_json.write_bytes(content)
    else:
        run.state_json.write_text(content, encoding="utf-8")
    before = run.state_json.read_bytes()
    with pytest.raises(RunStateError) as caught:
        read_state(run)
    assert str(caught.value).startswith(f"{run.state_json}: ")
    assert problem in str(caught.value) and "\n" not in str(caught.value)

    result = subprocess.run(
        [sys.executable, "-m", "lion_local", "status", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
         "--set", f"run_dir={run.root}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(run.state_json) in result.stderr
    assert run.state_json.read_bytes() == before


def test_mark_completed_adds_the_marker_once_and_accumulates_seconds(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    mark_completed(run, Stage.parse("1/imitation"), 1.5)
    mark_completed(run, Stage.parse("1/imitation"), 2.25)
    state = read_state(run)
    assert state["completed"] == ["1/imitation"]
    assert state["stage_seconds"] == {"1/imitation": 3.75}
    assert state["iteration"] == 1
    assert "updated" in state
    assert json.loads(run.state_json.read_text(encoding="utf-8")) == state


def test_mark_completed_keeps_the_highest_iteration_and_ignores_final(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    for marker in ("1/imitation", "1/discrimination", "1/generation", "2/imitation"):
        mark_completed(run, Stage.parse(marker), 1.0)
    assert read_state(run)["iteration"] == 2
    mark_completed(run, Stage.parse("1/generation"), 1.0)  # an older marker never lowers it
    assert read_state(run)["iteration"] == 2
    mark_completed(run, Stage.parse(f"{FINAL}/imitation"), 4.0)
    state = read_state(run)
    assert state["iteration"] == 2
    assert state["completed"] == ["1/imitation", "1/discrimination", "1/generation", "2/imitation", "final/imitation"]
    assert state["stage_seconds"]["final/imitation"] == 4.0
    assert state["stage_seconds"]["1/generation"] == 2.0


def test_add_stage_seconds_accumulates_without_marking_done(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    add_stage_seconds(run, Stage.parse("1/imitation"), 10.0)
    add_stage_seconds(run, Stage.parse("1/imitation"), 0.5)
    state = read_state(run)
    assert state["stage_seconds"] == {"1/imitation": 10.5}
    assert state["completed"] == []
    mark_completed(run, Stage.parse("1/imitation"), 1.0)  # the finished attempt adds to the failed ones
    assert read_state(run)["stage_seconds"] == {"1/imitation": 11.5}


def test_add_stage_seconds_does_nothing_without_a_run_directory(tmp_path: Path):
    run = RunDir(tmp_path / "never-created")
    add_stage_seconds(run, Stage.parse("1/imitation"), 3.0)
    assert not run.root.exists()


# ----------------------------------------------------------------------------------------------
# run_lock
# ----------------------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from lion_local.run.layout import RunDir
from lion_local.run.state import run_lock
with run_lock(RunDir(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path: Path):
    """Start a process holding the lock of tmp_path/run; yields (run, process) once it holds it."""
    run = RunDir(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run.root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else ""
        if line.strip() != "holding":
            process.kill()
            _, err = process.communicate(timeout=10)
            pytest.fail(f"the lock holder did not start: {line!r} {err}")
        yield run, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


def test_run_lock_refuses_a_second_process_naming_run_and_holder(lock_holder):
    run, holder = lock_holder
    with pytest.raises(RunLockedError) as excinfo:
        with run_lock(run):
            pytest.fail("took a lock another process holds")
    message = str(excinfo.value)
    assert str(run.root) in message
    assert f"pid {holder.pid}" in message
    assert holder.poll() is None  # the holder is untouched


def test_run_lock_held_by_a_killed_process_is_taken_over(lock_holder, caplog):
    run, holder = lock_holder
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    with caplog.at_level(logging.WARNING, logger="lion_local.run.state"):
        with run_lock(run):
            holder_line = (run.root / ".lock").read_text(encoding="utf-8")
            assert holder_line.startswith(f"pid {os.getpid()} ")
    assert [r.getMessage() for r in caplog.records] == [
        f"{run.root}: taking over the stale lock of pid {holder.pid} on {os.uname().nodename}, which no longer runs"
    ]


def test_run_lock_is_released_on_exit(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    with run_lock(run):
        assert run.root.is_dir()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(run):  # a second open file, even in the same process, is refused
                pass
    assert (run.root / ".lock").read_text() == ""  # a clean release leaves no holder behind
    with run_lock(run):  # released: taken again without error
        pass


def _no_flock(errno_value: int):
    def flock(handle, operation):
        raise OSError(errno_value, os.strerror(errno_value))

    return flock


def test_a_file_system_without_flock_is_refused_in_one_line_naming_the_lock(tmp_path: Path, monkeypatch):
    """Some Lustre and NFS mounts answer flock with ENOSYS: `run` says where and what to do, exit 2."""
    from click.testing import CliRunner

    from lion_local.cli import main
    from loop_checks import tiny_config

    data = tiny_config(tmp_path / "models/tiny", tmp_path / "run")  # not built: smoke mode would build them
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    monkeypatch.setattr("fcntl.flock", _no_flock(errno.ENOSYS))
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"error: {tmp_path}") and ".lock: this file system does not support file locks" in line
    assert "-o flock" in line
    assert not (tmp_path / "models/tiny").exists()  # nothing was built or half-written


def test_run_lock_on_a_file_system_without_flock_names_the_file_and_other_errors_pass_through(
    tmp_path: Path, monkeypatch
):
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr("fcntl.flock", _no_flock(errno.EOPNOTSUPP))
    with pytest.raises(LockUnsupportedError, match=r"run/\.lock: this file system does not support file locks"):
        with run_lock(run):
            pass
    monkeypatch.setattr("fcntl.flock", _no_flock(errno.EIO))
    with pytest.raises(OSError) as raised:
        with run_lock(run):
            pass
    assert raised.value.errno == errno.EIO and not isinstance(raised.value, LockUnsupportedError)
