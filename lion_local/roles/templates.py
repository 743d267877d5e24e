"""Rendering of the roles' prompt templates, which are text files next to the role modules."""

from __future__ import annotations

from functools import cache
from importlib import resources

import jinja2

_ENVIRONMENT = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


@cache
def _template(name: str) -> jinja2.Template:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return _ENVIRONMENT.from_string(text)


def render(name: str, **values: object) -> str:
    """Render the template file `name` (e.g. "referee.txt"); a missing value is an error."""
    return _template(name).render(**values)
