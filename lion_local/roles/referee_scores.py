"""The referee's two short modes: a reply constrained to the two scores (template: referee_scores.txt).

scores_only: the endpoint's structured outputs force the reply into the two scores, so it costs a
few completion tokens instead of an explanation, and reads without any guessing.

expected_score: the same constrained reply, asked with top_logprobs; each score is then the
probability-weighted mean over the score tokens at its position (the G-Eval reading), a real
number that keeps the referee's uncertainty instead of its one sampled digit.

Why the reading is exact, and where it cannot be:
- The constraint leaves only score tokens possible at a score's first position, and vLLM reports
  the constrained distribution (disallowed tokens come back at -9999), so the top_logprobs there
  carry the whole distribution over the scores that start at that position. A token counts with
  and without its leading space (" 9" and "9").
- "10" is one token in some vocabularies and "1", "0" in others. A "1" at the score's position is
  then 1 or the start of 10. When the reply itself went through that "1", the next position's
  probability of "0" splits its mass exactly. When the reply went another way, that split was
  never computed: if "10" is a token of its own at the position, "1" is read as 1 (a tokenizer
  writes 10 as its one token); otherwise the mass of "1" is left out and the rest renormalised.
- A reply whose tokens cannot be aligned with its text (a token spanning a score and the text
  around it) keeps its sampled scores: still two valid scores, never unreadable.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# The reply format each constraint asks for, as the prompt words it (no example scores: a small
# referee copies them), and the line that restates it after the answers.
REPLY_FORMATS = {
    "regex": "Assistant 1's score, then a space, then Assistant 2's score.",
    "json_schema": 'as JSON: {"assistant_1": <score>, "assistant_2": <score>}',
}
REPLY_REMINDERS = {
    "regex": "Now give the two scores (1 to 10): Assistant 1's, a space, Assistant 2's.",
    "json_schema": "Now give the two scores (1 to 10) as JSON.",
}
SCORES_REGEX = r"([1-9]|10) ([1-9]|10)"
_SCORE_SCHEMA = {"type": "integer", "minimum": 1, "maximum": 10}
SCORES_SCHEMA = {
    "type": "object",
    "properties": {"assistant_1": _SCORE_SCHEMA, "assistant_2": _SCORE_SCHEMA},
    "required": ["assistant_1", "assistant_2"],
    "additionalProperties": False,
}
# Enough for either form ("10 10" is 3-5 tokens, the JSON object about 15) with room for spacing.
SCORES_MAX_TOKENS = {"regex": 8, "json_schema": 32}
# The most alternatives vLLM (max_logprobs) and hosted APIs return by default.
TOP_LOGPROBS = 20

_REGEX_REPLY = re.compile(r"\s*(10|[1-9]) (10|[1-9])\s*")
_JSON_VALUE = re.compile(r'"assistant_([12])"\s*:\s*(\d+)')
_VALID = {str(score): score for score in range(1, 11)}


def constraint_params(structured_output: str, expected_score: bool) -> dict:
    """The request fields that constrain the reply (and ask for its logprobs in expected_score)."""
    if structured_output == "regex":
        params: dict = {"structured_outputs": {"regex": SCORES_REGEX}}
    else:
        params = {"response_format": {"type": "json_schema", "json_schema": {"name": "scores", "schema": SCORES_SCHEMA}}}
    params["max_tokens"] = SCORES_MAX_TOKENS[structured_output]
    if expected_score:
        params.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    return params


def score_spans(text: str, structured_output: str) -> list[tuple[int, int]] | None:
    """Where the two scores stand in a constrained reply (character spans), or None if it is not one."""
    if structured_output == "regex":
        match = _REGEX_REPLY.fullmatch(text)
        return [match.span(1), match.span(2)] if match else None
    try:
        reply = json.loads(text)
    except ValueError:
        return None
    if not isinstance(reply, dict) or set(reply) != {"assistant_1", "assistant_2"}:
        return None
    if not all(type(reply[key]) is int and 1 <= reply[key] <= 10 for key in reply):
        return None
    spans = {match[1]: match.span(2) for match in _JSON_VALUE.finditer(text)}
    return [spans["1"], spans["2"]] if set(spans) == {"1", "2"} else None


def read_scores(text: str, finish_reason: str | None, structured_output: str) -> tuple[float, float] | None:
    """scores_only: the two scores of a constrained reply; None if it is not one or was cut short."""
    spans = score_spans(text, structured_output)
    if spans is None or finish_reason == "length":
        logger.debug("not a complete two-score reply (finish_reason=%s): %r", finish_reason, text[:80])
        return None
    return float(text[slice(*spans[0])]), float(text[slice(*spans[1])])


def expected_scores(
    text: str, finish_reason: str | None, structured_output: str, tokens: Sequence[dict] | None
) -> tuple[float, float] | None:
    """expected_score: each score's probability-weighted mean (rounded to 4 decimals), from the
    reply's token logprobs (the OpenAI chat format: token, logprob, top_logprobs)."""
    sampled = read_scores(text, finish_reason, structured_output)
    if sampled is None:
        return None
    # The tokens spell the reply, then perhaps the end-of-sequence token's text ("</s>").
    if not tokens or not "".join(token["token"] for token in tokens).startswith(text):
        logger.debug("token logprobs do not spell the reply %r: its sampled scores stand", text)
        return sampled
    spans = score_spans(text, structured_output)
    starts, offset = [], 0
    for token in tokens:
        starts.append(offset)
        offset += len(token["token"])
    return tuple(_expected_at(tokens, starts, text, span, fallback) for span, fallback in zip(spans, sampled))


def _expected_at(tokens: Sequence[dict], starts: list[int], text: str, span: tuple[int, int], fallback: float) -> float:
    """The expected score whose text starts at span[0]; `fallback` where the tokens do not allow it."""
    index = max(i for i, start in enumerate(starts) if start <= span[0])
    if text[starts[index] : span[0]].strip():
        return fallback  # the score shares its token with other text
    mass = score_mass(tokens[index]["top_logprobs"])
    ambiguous = mass.pop("1?", 0.0)
    if _bare_one(tokens[index]["token"]):
        after = tokens[index + 1]["top_logprobs"] if index + 1 < len(tokens) else []
        zero = sum(math.exp(alt["logprob"]) for alt in after if alt["token"] == "0")
        mass[10] = mass.get(10, 0.0) + ambiguous * zero
        mass[1] = mass.get(1, 0.0) + ambiguous * (1.0 - zero)
    elif 10 in mass:
        mass[1] = mass.get(1, 0.0) + ambiguous  # "10" is its own token here: "1" is 1
    total = sum(mass.values())
    if total <= 0.0:
        return fallback
    return round(sum(score * p for score, p in mass.items()) / total, 4)


def score_mass(alternatives: Sequence[dict]) -> dict:
    """Probability per score among one position's alternatives; a bare "1" goes under "1?" (1, or
    the first token of 10) for the caller to resolve."""
    mass: dict = {}
    for alternative in alternatives:
        word = alternative["token"]
        if word.strip() not in _VALID:
            continue  # not a score token
        key = "1?" if _bare_one(word) else _VALID[word.strip()]
        mass[key] = mass.get(key, 0.0) + math.exp(alternative["logprob"])
    return mass


def _bare_one(token: str) -> bool:
    """A "1" that nothing ends ("1", " 1"; not "1 "): the next token may make it 10."""
    return token.strip() == "1" and token == token.rstrip()
