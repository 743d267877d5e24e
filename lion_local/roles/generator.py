"""The generator role: writes one new instruction modelled on a hard or an easy seed.

Hard seeds ask for the same domain and task type; easy seeds ask for the same domain but a
rarer, more long-tail topic (templates generator_hard.txt and generator_easy.txt).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from lion_local.config import GeneratorRole
from lion_local.endpoints.client import Completion, EndpointClient
from lion_local.roles.templates import render

SeedKind = Literal["hard", "easy"]

# Labels a model may put before its answer although the template already ends with one.
_LEADING_LABEL = re.compile(
    r"^\s*(?:[#*_>\s]*)(?:new\s+(?:instruction|task|prompt)|instruction|task)\s*[#*_]*\s*:\s*[*_]*\s*",
    re.IGNORECASE,
)
# A repeated template section means the model kept writing past its one instruction.
_TEMPLATE_ECHO = re.compile(r"#\s*(?:given|new)\s+instruction\s*#", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")


def generator_messages(instruction: str, input_text: str, kind: SeedKind) -> list[dict]:
    template = "generator_hard.txt" if kind == "hard" else "generator_easy.txt"
    return [{"role": "user", "content": render(template, instruction=instruction, input=input_text).strip()}]


def generator_max_tokens(role: GeneratorRole, seed_instruction: str) -> int:
    """The length budget: a multiple of the seed's word count, at least 16, at most role.max_tokens."""
    words = len(seed_instruction.split())
    return min(role.max_tokens, max(16, math.ceil(role.length_budget_factor * words)))


def parse_generated_instruction(text: str) -> str | None:
    """The one new instruction in a generator reply, or None when there is not exactly one."""
    candidate = _LEADING_LABEL.sub("", text.strip(), count=1).strip()
    candidate = candidate.strip("\"'`").strip()
    if candidate.startswith("**") and candidate.endswith("**"):
        candidate = candidate[2:-2].strip()
    if not candidate or _TEMPLATE_ECHO.search(candidate):
        return None
    lines = [line for line in candidate.splitlines() if line.strip()]
    if sum(1 for line in lines if _LIST_ITEM.match(line)) >= 2:
        return None
    return candidate


async def ask_generator(
    client: EndpointClient,
    role: GeneratorRole,
    instruction: str,
    input_text: str,
    kind: SeedKind,
    seed: int | None = None,
) -> Completion:
    params = role.request_params(seed, max_tokens=generator_max_tokens(role, instruction))
    return await client.chat("generator", generator_messages(instruction, input_text, kind), **params)
