"""Environment faults are one line: a full disk, a read-only file system, a missing permission, a
path below a regular file, a run directory under /proc, a symlink loop, export --out where no
folder can be (lion_local.errors classes them by errno; lion_local.run.preflight checks the run
directory before the first write; the command line is the last line of defence).

Each case runs the real command line (in-process, and the full-disk case also as a real process):
exit 2 for a bad path, exit 1 for a file system that refuses the write, exactly one `error:` line
naming the path and the fix, no traceback, and nothing torn left behind (no `.tmp` file, no torn
journal line, an empty lock file). The tmpfs and read-only bind mounts need root; without it
those tests skip saying so.
"""

from __future__ import annotations

import asyncio

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.errors import FileSystemError, InputError, LionError, os_error
from lion_local.run.layout import RunDir, Stage
from lion_local.run.state import Journal, read_jsonl, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ["Name three primary colours.", "Write a haiku about rain.", "Explain what a prime number is.", "Count to five."]


def write_config(root: Path, run_dir: Path, **top: object) -> Path:
    """A config that passes every check before a run without a model: two model folders with a
    config.json and an (empty) weights file, four seeds, no tiny models."""
    for name in ("teacher", "student"):
        model = root / "models" / name
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text('{"model_type": "llama"}\n')
        (model / "model.safetensors").write_bytes(b"")
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": seed}) + "\n" for seed in SEEDS))
    data = {
        "run_dir": str(run_dir),
        "seed": 0,
        "iterations": 1,
        "seed_data": str(seeds),
        "tiny_models": None,
        "servers": {
            "teacher": {"engine": "transformers", "model": str(root / "models/teacher")},
            "student": {"engine": "transformers", "model": str(root / "models/student")},
        },
        "generation": {"new_per_iteration": 4, "hard_ratio": 0.5, "rouge_threshold": 0.7},
        "discrimination": {"tau": 1.0},
        **top,
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_line_error(result, exit_code: int, *parts: str) -> str:
    """Exit `exit_code`, no traceback, exactly one line on stderr: 'error: ...' holding each part."""
    stderr = result.stderr
    detail = f"exit {result.exit_code}, stdout {result.stdout!r}, stderr {stderr!r}, exception {result.exception!r}"
    assert result.exit_code == exit_code, detail
    assert "Traceback" not in result.stdout + stderr, detail
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    """`run` installs a SIGTERM handler; in-process runs must not leave it to pytest."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {result.stderr.strip()})")


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a 1 MB tmpfs or a read-only bind mount")


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real 1 MB file system (tmpfs), unmounted afterwards."""
    _need_root()
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture
def read_only(tmp_path: Path):
    """(a folder, a read-only bind mount of it)."""
    _need_root()
    source, view = tmp_path / "writable", tmp_path / "read-only"
    source.mkdir()
    view.mkdir()
    _mount("--bind", str(source), str(view))
    try:
        _mount("-o", "remount,bind,ro", str(view))
        yield source, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)


def fill(disk: Path, leave_pages: int = 0) -> None:
    """Fill `disk` with 4 KiB files until it is full, then free `leave_pages` pages of it."""
    ballast = disk / "ballast"
    ballast.mkdir()
    pages = []
    while True:
        page = ballast / str(len(pages))
        try:
            page.write_bytes(b"x" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            page.unlink()
            break
        pages.append(page)
    for page in pages[:leave_pages]:
        page.unlink()


# ----------------------------------------------------------------------------------------------
# The errno classes (pure)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, kind, fix",
    [
        (errno.ENOSPC, FileSystemError, "the file system is full"),
        (errno.EDQUOT, FileSystemError, "quota"),
        (errno.EROFS, FileSystemError, "read-only"),
        (errno.EACCES, FileSystemError, "write access"),
        (errno.EPERM, FileSystemError, "may write to"),
        (errno.EIO, FileSystemError, "I/O error"),
        (errno.EMFILE, FileSystemError, "ulimit -n"),
        (errno.ENOTDIR, InputError, "a part of the path is a file"),
        (errno.ELOOP, InputError, "symbolic link loop"),
        (errno.ENAMETOOLONG, InputError, "shorter"),
        (errno.EISDIR, InputError, "a folder is where a file belongs"),
    ],
)
def test_os_errors_are_classed_by_errno(code: int, kind: type, fix: str):
    error = os_error(OSError(code, os.strerror(code), "/run/x/state.json"))
    assert type(error) is kind and error.exit_code == (2 if kind is InputError else 1)
    assert str(error).startswith(f"/run/x/state.json: {os.strerror(code)}; ") and fix in str(error)
    assert "\n" not in str(error)
    assert str(os_error(OSError(code, os.strerror(code)), Path("/elsewhere"))).startswith("/elsewhere: ")


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EEXIST, errno.EBADF, errno.EINVAL])
def test_other_os_errors_are_bugs_and_keep_their_traceback(code: int, tmp_path: Path, monkeypatch):
    assert os_error(OSError(code, os.strerror(code), "x")) is None
    monkeypatch.setattr("lion_local.stages.loop.status_lines", _raise(OSError(code, os.strerror(code), "x")))
    result = invoke("status", "--config", write_config(tmp_path, tmp_path / "run"))
    assert result.exit_code == 1 and isinstance(result.exception, OSError)  # not turned into a line


def _raise(exc: BaseException):
    def function(*args, **kwargs):
        raise exc

    return function


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_before_the_first_write(tmpfs: Path, tmp_path: Path):
    """A real process on a full tmpfs: exit 1, one line naming the run directory, nothing left there."""
    run_dir = tmpfs / "run"
    config = write_config(tmp_path, run_dir)
    fill(tmpfs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "lion_local", "run", "--config", str(config)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {run_dir}: No space left on device; the file system is full: free space on it (or move the run "
        "to another one), then run the same command again; or choose another run_dir (--set run_dir=...)"
    ]
    assert list(run_dir.iterdir()) == []  # no probe, no lock, no temporary file


def test_a_disk_that_fills_at_the_first_file_leaves_nothing_torn(tmpfs: Path, tmp_path: Path):
    """One free page: the probe and the lock fit, identity.json does not. The last line of
    defence names the file; no temporary file is left, and the lock file is emptied."""
    run_dir = tmpfs / "run"
    config = write_config(tmp_path, run_dir)
    fill(tmpfs, leave_pages=1)
    line = one_line_error(invoke("run", "--config", config), 1, f"{run_dir}/identity.json: No space left on device")
    assert "free space" in line
    assert files(run_dir) == {".lock": b""}


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmpfs: Path):
    state = tmpfs / "run" / "state.json"
    write_atomic(state, '{"completed": []}\n')
    fill(tmpfs)
    with pytest.raises(OSError) as raised:
        write_atomic(state, json.dumps({"completed": ["x" * 10_000]}))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(state)
    assert os_error(raised.value) is not None
    assert files(tmpfs / "run") == {"state.json": b'{"completed": []}\n'}


def test_a_journal_append_on_a_full_disk_leaves_no_torn_line(tmpfs: Path):
    path = tmpfs / "run" / "teacher_answers.jsonl"
    with Journal(path) as journal:
        journal.append({"id": "a", "answer": "first"})
        before = path.read_bytes()
        fill(tmpfs, leave_pages=1)  # a page for part of the next line, not for all of it
        with pytest.raises(OSError) as raised:
            journal.append({"id": "b", "answer": "y" * 20_000})
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
        assert path.read_bytes() == before  # cut back: no torn tail
        assert journal.records == [{"id": "a", "answer": "first"}]
        for page in (tmpfs / "ballast").iterdir():
            page.unlink()
        journal.append({"id": "b", "answer": "second"})  # continues on a fresh line
    assert read_jsonl(path) == [{"id": "a", "answer": "first"}, {"id": "b", "answer": "second"}]
    assert path.read_text().count("\n") == 2


def test_the_run_log_on_a_full_disk_writes_no_traceback(tmpfs: Path, capfd):
    from lion_local.run.log import run_log

    run = RunDir(tmpfs / "run")
    run.logs.mkdir(parents=True)
    fill(tmpfs)
    with run_log(run):
        logging.getLogger("lion_local.stages.loop").warning("a record the full disk cannot take " + "z" * 8192)
        logging.getLogger("lion_local.stages.loop").warning("and another")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Logging error" not in captured.err


def test_a_failed_time_record_does_not_hide_the_stage_s_own_error(tmp_path: Path, monkeypatch):
    """run_stage records a failed attempt's time; on a full disk that write fails too, and the
    stage's own error is still the one raised."""
    from lion_local.config import load_config
    from lion_local.stages import loop

    config = load_config(write_config(tmp_path, tmp_path / "run"))
    monkeypatch.setattr(loop, "run_imitation", _raise(LionError("the stage's own error")))
    monkeypatch.setattr(loop, "add_stage_seconds", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.json")))
    with pytest.raises(LionError, match="the stage's own error"):
        asyncio.run(loop.run_stage(config, RunDir(config.run_dir), Stage.parse("1/imitation"), servers=None))


# ----------------------------------------------------------------------------------------------
# Read-only, permissions, quota
# ----------------------------------------------------------------------------------------------


def test_a_read_only_file_system_is_one_line(read_only, tmp_path: Path):
    source, view = read_only
    config = write_config(tmp_path, view / "run")
    one_line_error(invoke("run", "--config", config), 1, f"{view}/run: Read-only file system", "writable location")
    assert list(source.iterdir()) == []
    # A run directory that exists there already: the probe is refused, the run is left as it was.
    (source / "run").mkdir()
    (source / "run" / "state.json").write_text('{"completed": []}\n')
    one_line_error(invoke("run", "--config", config), 1, f"{view}/run: Read-only file system")
    assert files(source) == {"run/state.json": b'{"completed": []}\n'}
    assert invoke("status", "--config", config).exit_code == 0  # status only reads


def test_a_command_that_writes_late_on_a_read_only_file_system_is_one_line(read_only, tmp_path: Path):
    """`report` writes report.md without a preflight: the command line's last line of defence."""
    from test_run_report import _iteration_report

    source, view = read_only
    config = write_config(tmp_path, view / "run")
    (source / "run/iter_1").mkdir(parents=True)
    (source / "run/iter_1/report.json").write_text(json.dumps(_iteration_report(1, cache=6, hard=2, easy=3)))
    (source / "run/state.json").write_text(json.dumps({"completed": ["1/imitation", "1/discrimination", "1/generation"]}))
    before = files(source)
    one_line_error(invoke("report", "--config", config), 1, f"{view}/run", "Read-only file system")
    assert files(source) == before


@pytest.mark.parametrize(
    "where, code, expected",
    [
        ("os.mkdir", errno.EACCES, "Permission denied; permission denied: give this user write access"),
        ("os.fsync", errno.EDQUOT, "Disk quota exceeded; the disk quota is used up"),
    ],
)
def test_no_permission_and_a_full_quota_are_one_line(tmp_path: Path, monkeypatch, where: str, code: int, expected: str):
    """Root passes every permission check, so these two are raised where the kernel would raise them."""
    config = write_config(tmp_path, tmp_path / "run")
    monkeypatch.setattr(f"lion_local.run.preflight.{where}", _raise(OSError(code, os.strerror(code))))
    one_line_error(invoke("run", "--config", config), 1, f"{tmp_path / 'run'}: {expected}")
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Bad paths: exit 2, nothing created
# ----------------------------------------------------------------------------------------------


def test_a_run_dir_below_a_regular_file_is_one_line(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("a file\n")
    run_dir = tmp_path / "notes.txt" / "runs" / "run"
    config = write_config(tmp_path, run_dir)
    one_line_error(invoke("run", "--config", config), 2, f"{tmp_path / 'notes.txt'}: a file, not a folder",
                   f"{run_dir} would be below it", "choose another run_dir")
    assert (tmp_path / "notes.txt").read_text() == "a file\n"


def test_a_run_dir_that_is_a_regular_file_is_one_line(tmp_path: Path):
    (tmp_path / "run").write_text("a file\n")
    config = write_config(tmp_path, tmp_path / "run")
    one_line_error(invoke("run", "--config", config), 2, f"{tmp_path / 'run'}: a file, not a folder")


def test_a_run_dir_under_proc_is_one_line(tmp_path: Path):
    if not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    config = write_config(tmp_path, Path("/proc/lion-run"))
    one_line_error(invoke("run", "--config", config), 2, "/proc/lion-run: no folder can be made in /proc",
                   "choose another run_dir")
    assert not Path("/proc/lion-run").exists()


@pytest.mark.parametrize("below", [False, True], ids=["the-link", "below-the-link"])
def test_a_symlink_loop_as_run_dir_is_one_line(tmp_path: Path, below: bool):
    (tmp_path / "loop").symlink_to("loop")
    run_dir = tmp_path / "loop" / "run" if below else tmp_path / "loop"
    config = write_config(tmp_path, run_dir)
    for command in (["run"], ["status"]):
        one_line_error(invoke(*command, "--config", config), 2, str(run_dir))
    assert os.readlink(tmp_path / "loop") == "loop"


# ----------------------------------------------------------------------------------------------
# export --out
# ----------------------------------------------------------------------------------------------


def test_export_out_below_a_file_or_on_a_read_only_file_system_is_one_line(read_only, tmp_path: Path):
    from test_export import _cli, _config, _fake_run

    _fake_run(_config(tmp_path), ["1/imitation", "1/discrimination"])
    (tmp_path / "notes.txt").write_text("a file\n")
    one_line_error(_cli(tmp_path, "--out", str(tmp_path / "notes.txt" / "export")), 2,
                   f"{tmp_path / 'notes.txt'}: a file, not a folder", "choose another --out")
    source, view = read_only
    one_line_error(_cli(tmp_path, "--out", str(view / "export")), 1, f"{view / 'export'}: Read-only file system")
    assert list(source.iterdir()) == []
    result = _cli(tmp_path, "--out", str(source / "export"))  # the neighbour that works
    assert result.exit_code == 0, result.output
    assert (source / "export" / "export.json").exists()


def test_pathlib_s_symlink_loop_is_a_bad_path_and_other_runtime_errors_are_bugs():
    """Path.resolve raises RuntimeError for a loop before Python 3.13 (OSError ELOOP after)."""
    from lion_local.errors import reported

    error = reported(RuntimeError("Symlink loop from '/data/runs/loop'"))
    assert isinstance(error, InputError) and str(error).startswith("/data/runs/loop: ")
    assert "symbolic link loop" in str(error)
    assert reported(RuntimeError("something else")) is None
    assert reported(ValueError("a bug")) is None
    lion = LionError("already one line")
    assert reported(lion) is lion
