"""Rendering of the roles' prompt templates, which are text files next to the role modules.

A template may include another (`{% include "referee_criteria.txt" %}`), so text that several
prompts share is written once.
"""

from __future__ import annotations

from importlib import resources

import jinja2


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FunctionLoader(_source),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def render(name: str, **values: object) -> str:
    """Render the template file `name` (e.g. "referee.txt"); a missing value is an error."""
    return _ENVIRONMENT.get_template(name).render(**values)


def template_text(name: str) -> str:
    """The source of template `name` and of every template it includes, in order: what a prompt depends on."""
    text = _source(name)
    included = _ENVIRONMENT.parse(text).find_all(jinja2.nodes.Include)
    return text + "".join(template_text(node.template.value) for node in included)
