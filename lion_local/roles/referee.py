"""Parsing of the referee's verdict.

The referee (a large LLM) compares two answers to the same question, explains
its judgement and is asked to finish with::

    Score of Assistant 1: <score>
    Score of Assistant 2: <score>

Real models deviate (markdown, "Assistant A", "7/10", both scores on one line,
the Vicuna-style bare "8 6" line, ...). :func:`parse_referee_scores` accepts
the common styles but is deliberately conservative: a wrong pair of scores
silently poisons the distillation data, while ``None`` only drops one example.
So a number is read as a score only when the text makes it a score statement
about a labelled assistant, and any doubt (missing, conflicting, out-of-range
or out-of-scale scores, unknown assistants) gives ``None``.
"""

from __future__ import annotations

import logging
import re

from lion_local.config import RefereeRole
from lion_local.endpoint import Completion, EndpointClient
from lion_local.roles.templates import render

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a fair and careful judge of the quality of answers."


def referee_messages(instruction: str, input_text: str, answer_1: str, answer_2: str) -> list[dict]:
    """The chat messages asking for a review of two answers (template: referee.txt)."""
    review_request = render(
        "referee.txt", instruction=instruction, input=input_text, answer_1=answer_1, answer_2=answer_2
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": review_request.strip()},
    ]


async def ask_referee(
    client: EndpointClient,
    role: RefereeRole,
    instruction: str,
    input_text: str,
    answer_1: str,
    answer_2: str,
    seed: int | None = None,
) -> Completion:
    params = role.request_params(seed)
    return await client.chat("referee", referee_messages(instruction, input_text, answer_1, answer_2), **params)

_FLAGS = re.IGNORECASE | re.MULTILINE

# Markdown emphasis and code marks carry no meaning for us; dropping them turns
# "**Assistant 1**: **8**" or "__8__" into plain "Assistant 1: 8".
_MARKDOWN = re.compile(r"[*_`]")

# "Assistant 1", "answer #2", "Response B". Letters must be upper case so that
# prose such as "an answer a child understands" is never taken for a label.
# Any number or capital is captured so that "Assistant 3: 7" can be rejected.
_LABEL = r"(?:assistant|answer|response)[ \t]*#?[ \t]*(?P<id>\d+|(?-i:[A-Z]))\b"
_SCORE_WORD = r"(?:(?:overall|final)[ \t]+)?(?:score|rating)"

# A score statement: label, optional "'s" and "score"/"rating", a separator,
# then the number *directly* (so "Assistant 1: It gives 3 examples" is not
# one). Only horizontal whitespace is allowed, so a statement never spans
# lines. Dashes need a space before them so "Assistant 1-2" is not "1 gets 2".
_STATEMENT = re.compile(
    _LABEL
    + r"(?:'s|’s)?"
    + r"(?:(?:[ \t]+" + _SCORE_WORD + r")?[ \t]*[:=]"  # "Assistant 1 score: 8"
    + r"|(?:[ \t]+" + _SCORE_WORD + r")?[ \t]+[-–—]"  # "Assistant 1 - 8"
    + r"|[ \t]+" + _SCORE_WORD + r"[ \t]+is[ \t]*:?"  # "Assistant 1's score is 8"
    + r"|[ \t]+(?:gets|receives)[ \t]+a[ \t]+" + _SCORE_WORD + r"[ \t]+of"
    + r"|[ \t]+scored)"  # "Assistant 1 scored 8"
    + r"[ \t]*(?P<num>[-+]?\d+(?:\.\d+)?)"
    # An optional scale, kept so that "8/100" or "4 out of 5" can be rejected.
    + r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+(?:\.\d+)?))?"
    # After the number only closing punctuation up to the end of the line, or a
    # joiner leading to the next label ("8, Assistant 2: 6", "8 | Score of
    # Assistant 2: 6"). This rejects "Assistant 1: 3 steps, ...". `next` marks
    # that label: it must itself start a score statement (checked below), so
    # "Assistant 1: 3, Assistant 2 lists 5" is not a statement either.
    + r"(?=[ \t.,;!)\]]*$"
    + r"|[ \t]*(?:[.,;|&–—-]|and|vs\.?|versus)?[ \t]*(?:and[ \t]+)?"
    + r"(?:(?:the[ \t]+)?" + _SCORE_WORD + r"[ \t]+(?:of|for)[ \t]+)?(?:the[ \t]+)?"
    + r"(?P<next>(?:assistant|answer|response)\b))",
    _FLAGS,
)

# Vicuna style: a line holding exactly two scores ("8 6", "8, 6", "8/10 6/10").
# "8,6" (no space) is refused: it may be a decimal comma.
_NUM_10 = r"([-+]?\d+(?:\.\d+)?)(?:[ \t]*/[ \t]*10)?"
_BARE_PAIR = re.compile(
    r"^[ \t]*" + _NUM_10 + r"(?:[ \t]*,[ \t]+|[ \t]+)" + _NUM_10 + r"[ \t]*\.?[ \t]*$"
)

_ID_TO_INDEX = {"1": 0, "2": 1, "A": 0, "B": 1}


def _valid(score: float, den: str | None = None) -> bool:
    """A score counts only on the 1..10 scale (an explicit scale must be 10)."""
    return (den is None or float(den) == 10.0) and 1.0 <= score <= 10.0


def _labelled_scores(text: str) -> tuple[float, float] | None:
    scores: list[float | None] = [None, None]
    matches = list(_STATEMENT.finditer(text))
    starts = {match.start() for match in matches}
    for match in matches:
        if match["next"] is not None and match.start("next") not in starts:
            continue  # "Assistant 1: 3, Assistant 2 lists 5": not a score
        index = _ID_TO_INDEX.get(match["id"])
        score = float(match["num"])
        if index is None:
            logger.debug("referee scored an unknown assistant: %r", match[0])
            return None
        if not _valid(score, match["den"]):
            logger.debug("referee score out of range or scale: %r", match[0])
            return None
        if scores[index] is not None and scores[index] != score:
            logger.debug("referee gave assistant %d two scores", index + 1)
            return None
        scores[index] = score
    if scores[0] is None or scores[1] is None:
        return None
    return scores[0], scores[1]


def _bare_pair(text: str) -> tuple[float, float] | None:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    pairs = {m.groups() for m in map(_BARE_PAIR.match, (lines[0], lines[-1])) if m}
    if len(pairs) != 1:  # none, or first and last lines disagree
        return None
    first, second = (float(n) for n in pairs.pop())
    if not (_valid(first) and _valid(second)):
        return None
    return first, second


def parse_referee_scores(text: str) -> tuple[float, float] | None:
    """Read the referee's scores for the first and second answer it was shown.

    Returns ``(score_1, score_2)`` or ``None`` when both cannot be read with
    confidence. Labelled statements ("Score of Assistant 1: 8", "Assistant B:
    6/10", ...) take precedence; the bare two-number line on the first or last
    non-empty line is used only when the text has no labelled score at all;
    if both are present and disagree, the answer is ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"referee output must be str, not {type(text).__name__}")
    text = _MARKDOWN.sub("", text.replace("\r\n", "\n"))
    bare = _bare_pair(text)
    if not _STATEMENT.search(text):
        result = bare
    else:
        result = _labelled_scores(text)
        if bare is not None and bare != result:
            result = None  # a bare "8 6" line contradicts the labelled scores
    if result is None:
        logger.debug("could not read referee scores from %r", text[-200:])
    return result


# A reply cut at the length limit right after a number may have lost the rest of it ("1" of "10").
_CUT_AFTER_NUMBER = re.compile(r"[\d.]\s*$")


def read_review(text: str, finish_reason: str | None) -> tuple[float, float] | None:
    """The scores of one referee reply, or None when they cannot be trusted: unreadable, or the
    reply was cut at the length limit right after a number."""
    if finish_reason == "length" and _CUT_AFTER_NUMBER.search(text):
        logger.debug("referee reply cut after a number, possibly mid-score: %r", text[-80:])
        return None
    return parse_referee_scores(text)
