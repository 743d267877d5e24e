"""The run's copy of lion-local's log: <run_dir>/logs/lion-local.log, for a whole command.

Every command that works on a run (run, iteration, stage, evaluate) copies the log records of
lion_local and serving there, so a batch job's log survives with the run it belongs to.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lion_local.run.layout import RunDir

logger = logging.getLogger(__name__)


@contextmanager
def run_log(run: RunDir) -> Iterator[None]:
    """Copy lion-local's log records to <run_dir>/logs/lion-local.log for the whole command."""
    run.logs.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(run.main_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("lion_local", "serving")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield
    finally:
        for each in loggers:
            each.removeHandler(handler)
        try:
            handler.close()
        except OSError as exc:  # cannot hide the error that ends the command
            logger.warning("%s: %s", run.main_log, exc.strerror)


class _RunLogHandler(logging.FileHandler):
    """The run's log file; a record it cannot write (a full disk) is dropped without a traceback
    (the console has the same record), and the file is left alone for the rest of the command."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        error = sys.exc_info()[1]
        logger.warning("%s: cannot write the run's log (%s); the console keeps it", self.baseFilename,
                       getattr(error, "strerror", None) or error)
