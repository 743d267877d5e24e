"""Is the referee's judgement worth anything? Control pairs with a known better side.

A weak referee does not fail loudly: it echoes the prompt (its reviews are unreadable, so every
instruction ends unjudged) or it writes two scores that carry no signal (position bias, the
same pair of numbers for everything). Either way the split into hard and easy instructions is
noise. So the referee is measured on pairs whose better side is known:

A control pair is an instruction with the teacher's answer against a degraded answer to the
same instruction, of one of three kinds, in turn:
    empty  an empty answer
    cut    the teacher's answer cut to its first CUT_WORDS words
    other  the teacher's answer to another instruction
The instructions are drawn in a fixed order (a hash of the run seed and the instruction id), so
asking for more pairs keeps the first ones. A control pair is reviewed like any pair (both
orders, the same retries, lion_local.stages.judging) but journaled apart and never enters a pool.

The figures (`control_figures`):
    unjudged_share             pairs left without a readable review in either order
    readable_share             referee replies that could be read (retries included)
    position_consistent_share  judged pairs whose two orders name the same better answer
    accuracy                   judged pairs where the teacher's answer scores strictly higher
`referee_problem` turns them and the bounds of discrimination.referee_check into the one line
that stops a discrimination (and fails `lion-local doctor`), or None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from lion_local.config import RefereeCheck
from lion_local.errors import LionError
from lion_local.stages.judging import AnswerPair, judged_pairs

KINDS = ("empty", "cut", "other")
CUT_WORDS = 4


class RefereeCheckError(LionError):
    """The referee's judgement crossed a bound of discrimination.referee_check (exit 1)."""


@dataclass(frozen=True)
class ControlPair:
    """A pair whose better side is known: `pair.teacher` is the real answer, `pair.student` the degraded one."""

    pair: AnswerPair
    kind: str


# ----------------------------------------------------------------------------------------------
# Decisions (pure)
# ----------------------------------------------------------------------------------------------


def control_pairs(records: list[dict], answers: Mapping[str, str], count: int, seed: int) -> list[ControlPair]:
    """`count` control pairs from `records` (instruction records) and their teacher `answers` by id.

    Only instructions with an answer of more than CUT_WORDS words take part (a shorter one cut
    is itself); an `other` pair needs a second such instruction with a different answer.
    """
    usable = [r for r in records if len(answers.get(r["id"], "").split()) > CUT_WORDS]
    usable.sort(key=lambda r: hashlib.sha256(f"{seed}/control/{r['id']}".encode("utf-8")).hexdigest())
    usable = list({r["id"]: r for r in usable}.values())
    pairs = []
    for index, record in enumerate(usable[:count]):
        kind = KINDS[index % len(KINDS)]
        answer = answers[record["id"]]
        degraded = _degraded(kind, answer, [answers[r["id"]] for r in usable[index + 1 :] + usable[:index]])
        if degraded is None:
            continue
        pairs.append(ControlPair(AnswerPair(record["id"], record["instruction"], record["input"], answer, degraded), kind))
    return pairs


def _degraded(kind: str, answer: str, others: list[str]) -> str | None:
    if kind == "empty":
        return ""
    if kind == "cut":
        return " ".join(answer.split()[:CUT_WORDS])
    return next((other for other in others if other.strip() != answer.strip()), None)


def control_figures(controls: list[ControlPair], reviews: list[dict]) -> dict:
    """The referee's figures on `controls` from their review replies (see the module docstring)."""
    judged = judged_pairs([c.pair.id for c in controls], reviews)
    kinds = {c.pair.id: c.kind for c in controls}
    figures = {
        "pairs": len(controls),
        **_shares(list(judged.values()), len(controls)),
        "replies": len(reviews),
        "readable_share": _share(sum(1 for r in reviews if r["scores"] is not None), len(reviews)),
        "by_kind": {},
    }
    for kind in KINDS:
        members = [pair_id for pair_id, each in kinds.items() if each == kind]
        if members:
            figures["by_kind"][kind] = {"pairs": len(members), **_shares([judged[i] for i in members if i in judged], len(members))}
    return figures


def _shares(judged: list[dict], pairs: int) -> dict:
    return {
        "judged": len(judged),
        "unjudged_share": _share(pairs - len(judged), pairs),
        "accuracy": _share(sum(1 for j in judged if j["teacher_score"] > j["student_score"]), len(judged)),
        "position_consistent_share": _share(sum(1 for j in judged if j["position_consistent"]), len(judged)),
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def referee_problem(figures: dict, check: RefereeCheck, mode: str, where: str) -> str | None:
    """The line that stops a discrimination whose control pairs cross a bound, or None."""
    if not figures["pairs"]:
        return None
    unjudged = figures["unjudged_share"]
    if unjudged > check.max_unjudged_share:
        return (
            f"{where}: the referee left {figures['pairs'] - figures['judged']} of {figures['pairs']} control pairs "
            f"unjudged (unjudged share {unjudged:.2f} > discrimination.referee_check.max_unjudged_share "
            f"{check.max_unjudged_share:g}) in mode {mode}; {unreadable_remedy(mode)}"
        )
    accuracy = figures["accuracy"]
    if accuracy is not None and accuracy < check.min_control_accuracy:
        return (
            f"{where}: the referee preferred the teacher's answer to an empty, cut or unrelated one in only "
            f"{round(accuracy * figures['judged'])} of {figures['judged']} control pairs (control accuracy {accuracy:.2f} < "
            f"discrimination.referee_check.min_control_accuracy {check.min_control_accuracy:g}) in mode {mode}; "
            f"{weak_remedy(mode)}"
        )
    return None


def pool_problem(unjudged: int, total: int, check: RefereeCheck, mode: str, where: str) -> str | None:
    """The line that stops a discrimination that left too much of its Cache Pool unjudged, or None."""
    share = unjudged / total if total else 0.0
    if share <= check.max_unjudged_share:
        return None
    return (
        f"{where}: {unjudged} of {total} instructions are unjudged (unjudged share {share:.2f} > "
        f"discrimination.referee_check.max_unjudged_share {check.max_unjudged_share:g}) in mode {mode}; "
        f"{unreadable_remedy(mode)}"
    )


def unreadable_remedy(mode: str) -> str:
    if mode == "explain_first":
        return (
            "its reviews do not end in two readable scores: set roles.referee.mode: expected_score (or scores_only; "
            "vLLM or a hosted API) or raise roles.referee.max_tokens, and resume with --accept-change and that key; "
            "`lion-local doctor` compares the modes on this referee"
        )
    return (
        "the endpoint did not keep the reply to two scores: check roles.referee.structured_output against what it "
        "supports (`lion-local doctor` shows its replies), then resume"
    )


def weak_remedy(mode: str) -> str:
    return (
        "its hard/easy labels would be noise: use a stronger referee model (roles.referee.server), or another mode "
        "(`lion-local doctor` compares them) and resume with --accept-change roles.referee.mode; to go on knowingly, "
        "lower discrimination.referee_check.min_control_accuracy"
    )
