"""The one kind of error lion-local reports to its user, and the exit code of each case.

Every message is one line naming the file or key at fault and how to fix it. The command line
catches `LionError` once (lion_local.cli) and prints it without a traceback; anything else that
escapes is a bug and keeps its traceback. The serving package, which never imports lion_local,
reports its own failures as serving.process.ServerError, caught in the same place with exit 1.
"""

from __future__ import annotations


class LionError(Exception):
    """A failure the user must know about; exit 1 (a server, an endpoint or training failed)."""

    exit_code = 1


class InputError(LionError):
    """A bad config, input file, run state or command line, found before anything is written; exit 2."""

    exit_code = 2


class StageOrderError(LionError):
    """A stage was asked for before the stages it depends on finished (or after it finished); exit 3."""

    exit_code = 3
