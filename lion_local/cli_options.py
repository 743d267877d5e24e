"""Option types and callbacks of the command line (lion_local.cli) whose refusals are one line.

click reports a bad option value in several lines of usage text; these raise lion-local's own
InputError instead, which the command line prints as one `error:` line with exit 2
(lion_local.errors), like every other bad input.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from lion_local.errors import InputError


class _OneLine(click.ParamType):
    """An option type whose refusal is one line naming the option, not click's usage text."""

    def fail(self, message: str, param: click.Parameter | None = None, ctx: click.Context | None = None):
        hint = param.get_error_hint(ctx) if param is not None and ctx is not None else "an option"
        raise InputError(f"{hint}: {message}")


class IntRange(_OneLine, click.IntRange):
    """click's IntRange, refused in one line."""


class FiniteFloatRange(_OneLine, click.FloatRange):
    """click's FloatRange, refused in one line; it lets nan (and inf, without a bound) through: refused here."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def writable_out(value: str, option: str = "--out") -> None:
    """An --out folder: made (with its parents) and proved writable before the command builds anything."""
    from lion_local.run.preflight import writable_dir  # the run directory's own check (run_dir)

    writable_dir(Path(value).absolute(), option)
