"""The one kind of error lion-local reports to its user, and the exit code of each case.

Every message is one line naming the file or key at fault and how to fix it. The command line
catches `LionError` once (lion_local.cli) and prints it without a traceback; anything else that
escapes is a bug and keeps its traceback. The serving package, which never imports lion_local,
reports its own failures as serving.process.ServerError, caught in the same place with exit 1.

The file system's refusals (an OSError) are classed here, by errno, once (`os_error`):
- a bad path is exit 2, like any bad input: a path below a regular file (ENOTDIR), a symlink
  loop (ELOOP), a name too long (ENAMETOOLONG), a folder where a file belongs (EISDIR), or a
  place no folder can be made (a virtual file system such as /proc);
- an environment fault is exit 1, like any runtime failure: a full disk (ENOSPC) or quota
  (EDQUOT), a read-only file system (EROFS), a missing permission (EACCES, EPERM), an I/O error
  (EIO), too many open files (EMFILE, ENFILE). The same command continues once it is fixed.
`execute` checks the run directory before its first write (lion_local.run.preflight); the command
line turns one of these errnos raised later into the same one line, as a last line of defence.
Any other OSError is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import errno
import os


class LionError(Exception):
    """A failure the user must know about; exit 1 (a server, an endpoint or training failed)."""

    exit_code = 1


class InputError(LionError):
    """A bad config, input file, run state, path or command line, found before anything is written; exit 2."""

    exit_code = 2


class StageOrderError(LionError):
    """A stage was asked for before the stages it depends on finished (or after it finished); exit 3."""

    exit_code = 3


class FileSystemError(LionError):
    """The file system refused a write (full, over quota, read-only, no permission, I/O error); exit 1."""


_REDO = "then run the same command again"
# errno -> (bad path, the fix)
_OS_ERRORS: dict[int, tuple[bool, str]] = {
    errno.ENOSPC: (False, f"the file system is full: free space on it (or move the run to another one), {_REDO}"),
    errno.EDQUOT: (False, f"the disk quota is used up: free space or have the quota raised, {_REDO}"),
    errno.EROFS: (False, "the file system is mounted read-only: use a writable location (or remount it read-write)"),
    errno.EACCES: (False, "permission denied: give this user write access there, or use a location it may write to"),
    errno.EPERM: (False, "operation not permitted there: use a location this user may write to"),
    errno.EIO: (False, f"an I/O error: check the disk or network file system (dmesg), {_REDO}"),
    errno.EMFILE: (False, f"too many open files: raise the limit (ulimit -n), {_REDO}"),
    errno.ENFILE: (False, f"the system's open-file table is full: close other programs, {_REDO}"),
    errno.ENOTDIR: (True, "a part of the path is a file, not a folder: use a path whose parents are folders"),
    errno.ELOOP: (True, "a symbolic link loop: point the link at a real folder, or use another path"),
    errno.ENAMETOOLONG: (True, "the path is too long: use a shorter one"),
    errno.EISDIR: (True, "a folder is where a file belongs: move the folder away"),
}


def os_error(exc: OSError, path: object = None, hint: str = "") -> LionError | None:
    """The one-line error for a file system refusal, or None when its errno is not one (a bug).

    "<path>: <strerror>; <fix>[; <hint>]", the path being `path` or the one the OSError names.
    """
    known = _OS_ERRORS.get(exc.errno or 0)
    if known is None:
        return None
    bad_path, fix = known
    where = path if path is not None else exc.filename
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
    message = f"{where}: {reason}; {fix}" if where is not None else f"{reason}; {fix}"
    if hint:
        message += f"; {hint}"
    return InputError(message) if bad_path else FileSystemError(message)


def reported(exc: BaseException) -> LionError | None:
    """What the command line prints for `exc` in one line (lion_local.cli), or None for a bug:
    a LionError itself, a file system refusal (`os_error`, the last line of defence), or
    pathlib's symlink loop."""
    if isinstance(exc, LionError):
        return exc
    if isinstance(exc, OSError):
        return os_error(exc)
    if isinstance(exc, RuntimeError):
        return symlink_loop_error(exc)
    return None


def symlink_loop_error(exc: RuntimeError) -> LionError | None:
    """The one-line error for pathlib's "Symlink loop from '<path>'" (Python < 3.13 raises it from
    Path.resolve instead of an OSError with ELOOP), or None for any other RuntimeError."""
    prefix = "Symlink loop from "
    text = str(exc)
    if not text.startswith(prefix):
        return None
    try:
        path = ast.literal_eval(text[len(prefix):])
    except (ValueError, SyntaxError):
        return None
    return os_error(OSError(errno.ELOOP, os.strerror(errno.ELOOP), path))
