"""Checks before a command writes to, or builds on, a run directory; each failure is one line.

- `writable_dir`: a folder (the run directory, export's --out) can be made and written: the
  nearest existing part of its path is a folder, the missing parts can be created, and a probe
  file can be written, synced and removed (layout.write_probe). A bad path is exit 2, a file
  system that refuses the write (full, read-only, no permission) exit 1 (lion_local.errors).
- `check_within_iterations`, `check_finished_stages`: state.json is checked, not trusted: no
  finished stage lies beyond the config's iterations, and each finished stage the next one builds
  on (layout.builds_on) still has what it leaves (layout.finished_outputs), readable, else one
  line naming the file and the repair.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from lion_local.errors import InputError, os_error
from lion_local.run.layout import RunDir, Stage, builds_on, finished_outputs, write_probe
from lion_local.run.state import RunStateError, completed_stages

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# A folder that can be written
# ----------------------------------------------------------------------------------------------


def check_dir_path(path: Path, setting: str) -> Path:
    """The nearest existing part of `path` (itself, or a parent), refused unless it is a folder.

    Reads only. `setting` names what gave the path ("run_dir", "--out") in the fix.
    """
    for part in (path, *path.parents):
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            if part.is_symlink():
                raise InputError(f"{part}: a symbolic link to nothing ({os.readlink(part)}); {_elsewhere(setting)}") from None
            continue
        except NotADirectoryError:
            continue  # a parent further up is a file: found there
        except OSError as exc:
            raise _refusal(exc, part, setting) from None
        if stat.S_ISDIR(mode):
            return part
        below = "" if part == path else f"; {path} would be below it"
        raise InputError(f"{part}: a file, not a folder{below}; {_elsewhere(setting)}")
    raise InputError(f"{path}: no part of the path exists; {_elsewhere(setting)}")  # pragma: no cover


def writable_dir(path: Path, setting: str) -> None:
    """Make `path` (and its missing parents) and prove it writable, before anything else is written."""
    existing = check_dir_path(path, setting)
    parts = [path, *path.parents]
    for part in reversed(parts[: parts.index(existing)]):  # the missing ones, outermost first
        try:
            os.mkdir(part)
        except FileExistsError:
            if not part.is_dir():
                raise InputError(f"{part}: exists and is not a folder; {_elsewhere(setting)}") from None
        except FileNotFoundError:  # the parent exists, yet no folder can be made in it: /proc, /sys
            raise InputError(
                f"{part}: no folder can be made in {part.parent} (a virtual file system such as /proc?); "
                f"{_elsewhere(setting)}"
            ) from None
        except OSError as exc:
            raise _refusal(exc, part, setting) from None
    _probe(path, setting)


def _probe(directory: Path, setting: str) -> None:
    probe = write_probe(directory, os.getpid())
    try:
        with open(probe, "wb", buffering=0) as handle:
            handle.write(b"lion-local write probe\n")
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _refusal(exc, directory, setting) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("%s: cannot remove the write probe: %s", probe, exc.strerror)


def _refusal(exc: OSError, path: Path, setting: str) -> Exception:
    """The one-line error for a refusal at `path`; an errno lion_local.errors does not class stays as it is."""
    return os_error(exc, path, _elsewhere(setting)) or exc


def _elsewhere(setting: str) -> str:
    return f"or choose another {setting}" + (" (--set run_dir=...)" if setting == "run_dir" else "")


# ----------------------------------------------------------------------------------------------
# Finished stages
# ----------------------------------------------------------------------------------------------


def check_within_iterations(run: RunDir, iterations: int) -> None:
    """Refuse a config with fewer iterations than the run has finished stages of."""
    beyond = [stage for stage in completed_stages(run) if (stage.iteration.number or 0) > iterations]
    if beyond:
        last = max(stage.iteration.number or 0 for stage in beyond)
        raise InputError(
            f"{run.state_json}: records {', '.join(map(str, beyond))} as finished, but the config has iterations: "
            f"{iterations}; set iterations to {last} or more (--set iterations={last}), or start a new run_dir"
        )


def check_finished_stages(run: RunDir, upcoming: Stage | None, iterations: int) -> None:
    """Refuse a run whose state.json says a stage finished while something it leaves, which the
    `upcoming` stage builds on (layout.builds_on), is missing or unreadable."""
    if upcoming is None:
        return
    completed = completed_stages(run)
    for index, stage in enumerate(completed):
        if not builds_on(upcoming, stage, iterations):
            continue
        for path, folder in finished_outputs(run, stage):
            problem = _unreadable(path, folder)
            if problem is not None:
                raise RunStateError(f"{path}: {problem}, although {run.state_json} records {stage} as finished; "
                                    f"{repair(run, stage, completed[index + 1:])}")


def repair(run: RunDir, stage: Stage, later: list[Stage]) -> str:
    """How to run a damaged finished stage again (pure): restore its file, or take its marker and
    the later ones out of state.json, and the later iterations' folders away."""
    markers = ", ".join(f'"{each}"' for each in [stage, *later])
    folders = sorted({run.at(each.iteration).path.name for each in later if each.iteration != stage.iteration})
    also = f" and move {', '.join(f'{name}/' for name in folders)} away" if folders else ""
    return f"restore it, or remove {markers} from \"completed\" in state.json{also}, then run again to redo {'them' if later else 'it'}"


def _unreadable(path: Path, folder: bool) -> str | None:
    """Why `path` is not a readable file (or folder), or None."""
    try:
        if folder:
            with os.scandir(path):
                return None
        with open(path, "rb") as handle:
            handle.read(1)
        return None
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "a file, not a folder" if path.exists() else "missing"
    except IsADirectoryError:
        return "a folder, not a file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or errno.errorcode.get(exc.errno or 0, 'error')})"

