"""The referee: its prompts, its call, and the reading of its verdict in each mode.

roles.referee.mode chooses the review. explain_first (the paper's, template referee.txt) asks
the referee to explain its judgement and to finish with::

    Score of Assistant 1: <score>
    Score of Assistant 2: <score>

The two short modes, scores_only and expected_score, constrain the reply to the two scores; their
template and reading are in referee_scores.py.

Real models deviate from the explain_first format (markdown, "Assistant A", "7/10", both scores
on one line, the Vicuna-style bare "8 6" line, ...). :func:`parse_referee_scores` accepts
the common styles but is deliberately conservative: a wrong pair of scores
silently poisons the distillation data, while ``None`` only drops one example.
So a number is read as a score only when the text makes it a score statement
about a labelled assistant, and any doubt (missing, conflicting, out-of-range
or out-of-scale scores, unknown assistants) gives ``None``.
"""

from __future__ import annotations

import json
import logging
import re

from lion_local.config import RefereeRole
from lion_local.endpoints.client import Completion, EndpointClient, EndpointError
from lion_local.roles.referee_scores import REPLY_FORMATS, REPLY_REMINDERS, constraint_params, expected_scores, read_scores
from lion_local.roles.templates import render, template_text

logger = logging.getLogger(__name__)

# The paper's judge; roles.referee.system_prompt replaces it.
SYSTEM_PROMPT = "You are a fair and careful judge of the quality of answers."
_TEMPLATES = {"explain_first": "referee.txt", "scores_only": "referee_scores.txt", "expected_score": "referee_scores.txt"}


def referee_messages(
    instruction: str,
    input_text: str,
    answer_1: str,
    answer_2: str,
    mode: str = "explain_first",
    structured_output: str = "regex",
    system_prompt: str | None = None,
) -> list[dict]:
    """The chat messages asking for a review of two answers in `mode` (system_prompt None: SYSTEM_PROMPT)."""
    review_request = render(
        _TEMPLATES[mode], instruction=instruction, input=input_text, answer_1=answer_1, answer_2=answer_2,
        reply_format=REPLY_FORMATS[structured_output], reply_reminder=REPLY_REMINDERS[structured_output],
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT if system_prompt is None else system_prompt},
        {"role": "user", "content": review_request.strip()},
    ]


def referee_params(role: RefereeRole, seed: int | None = None) -> dict:
    """The request fields of one review: the role's sampling, and in the short modes the constraint."""
    params = role.request_params(seed)
    if role.mode != "explain_first":
        params.update(constraint_params(role.structured_output, expected_score=role.mode == "expected_score"))
    return params


def referee_identity(role: RefereeRole) -> str:
    """Everything besides the pair that shapes a review: the prompt texts and the request fields."""
    template = template_text(_TEMPLATES[role.mode])
    system_prompt = SYSTEM_PROMPT if role.system_prompt is None else role.system_prompt
    return json.dumps([system_prompt, template, role.mode, referee_params(role)], sort_keys=True)


async def ask_referee(
    client: EndpointClient,
    role: RefereeRole,
    instruction: str,
    input_text: str,
    answer_1: str,
    answer_2: str,
    seed: int | None = None,
) -> Completion:
    messages = referee_messages(
        instruction, input_text, answer_1, answer_2, role.mode, role.structured_output, role.system_prompt
    )
    completion = await client.chat("referee", messages, **referee_params(role, seed))
    if role.mode == "expected_score" and completion.logprobs is None:
        raise EndpointError(
            f"endpoint '{client.name}' returned no logprobs for the referee's expected_score mode; serve the "
            "referee with vLLM (it returns top_logprobs) or set roles.referee.mode: scores_only"
        )
    return completion


def read_review(completion: Completion, role: RefereeRole) -> tuple[float, float] | None:
    """The two scores of one referee reply in the role's mode, or None when they cannot be trusted."""
    if role.mode == "scores_only":
        return read_scores(completion.text, completion.finish_reason, role.structured_output)
    if role.mode == "expected_score":
        return expected_scores(completion.text, completion.finish_reason, role.structured_output, completion.logprobs)
    return read_explained_review(completion.text, completion.finish_reason)


_FLAGS = re.IGNORECASE | re.MULTILINE

# Markdown emphasis and code marks carry no meaning for us; dropping them turns
# "**Assistant 1**: **8**" or "__8__" into plain "Assistant 1: 8".
_MARKDOWN = re.compile(r"[*_`]")

# "Assistant 1", "answer #2", "Response B". Letters must be upper case so that
# prose such as "an answer a child understands" is never taken for a label.
# Any number or capital is captured so that "Assistant 3: 7" can be rejected.
_LABEL = r"(?:assistant|answer|response)[ \t]*#?[ \t]*(?P<id>\d+|(?-i:[A-Z]))\b"
_SCORE_WORD = r"(?:(?:overall|final)[ \t]+)?(?:score|rating)"
_NUMBER = r"(?P<num>[-+]?\d+(?:\.\d+)?)"
# An optional scale, kept so that "8/100" or "4 out of 5" can be rejected.
_SCALE = r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+(?:\.\d+)?))?"
# A joiner leading to the next label ("8, Assistant 2: 6", "8 | Score of Assistant 2: 6").
# `next` marks that label: it must itself start a score statement (checked below), so
# "Assistant 1: 3, Assistant 2 lists 5" is not a statement.
_TO_NEXT_LABEL = (
    r"[ \t]*(?:[.,;|&–—-]|and|vs\.?|versus)?[ \t]*(?:and[ \t]+)?"
    + r"(?:(?:the[ \t]+)?" + _SCORE_WORD + r"[ \t]+(?:of|for)[ \t]+)?(?:the[ \t]+)?"
    + r"(?P<next>(?:assistant|answer|response)\b)"
)

# A score statement about a labelled assistant, in two strengths. Only horizontal
# whitespace is allowed, so a statement never spans lines.
#
# Terse ("Assistant 1: 8", "Assistant 1 - 8", "Assistant 1 score = 8"): the separator alone
# says little, so after the number only closing punctuation to the end of the line, a
# parenthesised reason ("Assistant 1: 4 (incorrect steps)"), a dashed reason
# ("Assistant 2: 10/10 - the steps are right") or the next label may follow. This rejects
# "Assistant 1: 3 steps, ...". Dashes need a space before them so "Assistant 1-2" is not
# "1 gets 2".
_TERSE = (
    r"(?:(?:[ \t]+" + _SCORE_WORD + r")?[ \t]*[:=]"
    + r"|(?:[ \t]+" + _SCORE_WORD + r")?[ \t]+[-–—])"
    + r"[ \t]*" + _NUMBER + _SCALE
    + r"(?=[ \t.,;!)\]]*$|[ \t]*\([^()\n]*\)[ \t.]*$|[ \t]+[-–—][ \t]+\S|" + _TO_NEXT_LABEL + ")"
)
# Worded ("Assistant 1's score is 8", "Assistant 1's score of 8", "Assistant 2 receives a higher score of 9", "give
# Assistant 1 a score of 10 and Assistant 2 a score of 1", "Assistant 1 scored 8"): the words
# make the number a score, so the sentence may go on after a comma, a full stop or a reason
# ("due to", "because", "as", "since"), but not with "for" ("8 for relevance, 6 for ...").
_WORDED = (
    r"(?:(?:'s|’s)[ \t]+(?:\w+[ \t]+)?" + _SCORE_WORD + r"[ \t]+(?:is[ \t]*:?|of)"
    + r"|[ \t]+(?:gets|receives|earns|deserves|is[ \t]+given)[ \t]+a[ \t]+(?:\w+[ \t]+)?" + _SCORE_WORD + r"[ \t]+of"
    + r"|[ \t]+a[ \t]+(?:\w+[ \t]+)?" + _SCORE_WORD + r"[ \t]+of"
    + r"|[ \t]+scored)"
    + r"[ \t]*" + _NUMBER + _SCALE
    + r"(?=[ \t]*(?:[.,;!)\]]|$|(?:and|but|while|whereas|due|because|as|since)\b)|" + _TO_NEXT_LABEL + ")"
)
_STATEMENTS = (
    re.compile(_LABEL + r"(?:'s|’s)?" + _TERSE, _FLAGS),
    re.compile(_LABEL + _WORDED, _FLAGS),
)

# Vicuna style: a line holding exactly two scores ("8 6", "8, 6", "8/10 6/10").
# "8,6" (no space) is refused: it may be a decimal comma.
_NUM_10 = r"([-+]?\d+(?:\.\d+)?)(?:[ \t]*/[ \t]*10)?"
_BARE_PAIR = re.compile(
    r"^[ \t]*" + _NUM_10 + r"(?:[ \t]*,[ \t]+|[ \t]+)" + _NUM_10 + r"[ \t]*\.?[ \t]*$"
)
# The tuple some judging prompts ask for: "(10, 1)", "Output: (1, 10)", "The output tuple is
# (9, 10).", "the scores are (1, 5) for Assistant 1 and Assistant 2". Read only from a line that
# is the tuple alone (after an optional "Word:") or that speaks of a tuple, scores or output,
# so "(x2, y2) = (10, 4)" in a worked solution is not a score pair.
_TUPLE = re.compile(r"\([ \t]*([-+]?\d+(?:\.\d+)?)[ \t]*,[ \t]*([-+]?\d+(?:\.\d+)?)[ \t]*\)")
_TUPLE_LINE = re.compile(r"^[ \t]*(?:[A-Za-z][A-Za-z ]{0,30}:)?[ \t]*\([^()]*\)[ \t.]*$|tuple|scores?\b|output", re.IGNORECASE)

_ID_TO_INDEX = {"1": 0, "2": 1, "A": 0, "B": 1}


class _Conflict(Exception):
    """Two readings of the text disagree: no pair can be trusted."""


def _valid(score: float, den: str | None = None) -> bool:
    """A score counts only on the 1..10 scale (an explicit scale must be 10)."""
    return (den is None or float(den) == 10.0) and 1.0 <= score <= 10.0


def _labelled_scores(text: str) -> list[float | None]:
    """Each assistant's score from its labelled statements (None where it has none)."""
    scores: list[float | None] = [None, None]
    matches = [match for statement in _STATEMENTS for match in statement.finditer(text)]
    starts = {match.start() for match in matches}
    for match in matches:
        if match["next"] is not None and match.start("next") not in starts:
            continue  # "Assistant 1: 3, Assistant 2 lists 5": not a score
        index = _ID_TO_INDEX.get(match["id"])
        score = float(match["num"])
        if index is None:
            raise _Conflict(f"an unknown assistant was scored: {match[0]!r}")
        if not _valid(score, match["den"]):
            raise _Conflict(f"a score out of range or scale: {match[0]!r}")
        if scores[index] is not None and scores[index] != score:
            raise _Conflict(f"assistant {index + 1} was given two scores")
        scores[index] = score
    return scores


def _unlabelled_pair(text: str) -> tuple[float, float] | None:
    """The pair stated without labels: a bare two-number first or last line, or a score tuple.
    Every such statement must agree, and both numbers must be valid scores."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    pairs = {m.groups() for m in map(_BARE_PAIR.match, (lines[0], lines[-1])) if m}
    for line in lines:
        if _TUPLE_LINE.search(line):
            pairs.update(m.groups() for m in _TUPLE.finditer(line))
    if not pairs:
        return None
    if len({(float(a), float(b)) for a, b in pairs}) != 1:
        raise _Conflict("the unlabelled score pairs disagree")
    first, second = (float(n) for n in pairs.pop())
    if not (_valid(first) and _valid(second)):
        raise _Conflict("an unlabelled score is out of range")
    return first, second


def parse_referee_scores(text: str) -> tuple[float, float] | None:
    """Read the referee's scores for the first and second answer it was shown.

    Returns ``(score_1, score_2)`` or ``None`` when both cannot be read with
    confidence. A pair stated without labels (the Vicuna-style "8 6" first or last
    line, a "(8, 6)" score tuple) is read when every labelled statement in the text
    agrees with it, even if only one assistant's score is restated in words ("8 9 ...
    Assistant 2 receives a higher score of 9"). Without such a pair, both assistants
    need a labelled statement ("Score of Assistant 1: 8", "Assistant B: 6/10", "I would
    give Assistant 1 a score of 8 and Assistant 2 a score of 9"). Any disagreement, an
    unknown assistant or an out-of-scale score gives ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"referee output must be str, not {type(text).__name__}")
    text = _MARKDOWN.sub("", text.replace("\r\n", "\n"))
    try:
        labelled = _labelled_scores(text)
        unlabelled = _unlabelled_pair(text)
    except _Conflict as conflict:
        logger.debug("referee scores not trusted: %s", conflict)
        return None
    if unlabelled is not None:
        if any(score is not None and score != unlabelled[index] for index, score in enumerate(labelled)):
            logger.debug("referee's labelled scores %s contradict its pair %s", labelled, unlabelled)
            return None
        return unlabelled
    if labelled[0] is None or labelled[1] is None:
        logger.debug("could not read referee scores from %r", text[-200:])
        return None
    return labelled[0], labelled[1]


# A reply cut at the length limit right after a number may have lost the rest of it ("1" of "10").
_CUT_AFTER_NUMBER = re.compile(r"[\d.]\s*$")


def read_explained_review(text: str, finish_reason: str | None) -> tuple[float, float] | None:
    """The scores of one explain_first reply, or None when they cannot be trusted: unreadable, or
    the reply was cut at the length limit right after a number."""
    if finish_reason == "length" and _CUT_AFTER_NUMBER.search(text):
        logger.debug("referee reply cut after a number, possibly mid-score: %r", text[-80:])
        return None
    return parse_referee_scores(text)
