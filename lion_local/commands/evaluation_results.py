"""What `lion-local evaluate` reports: the relative-score arithmetic and the one line per checkpoint.

The arithmetic, per checkpoint (lion_local/commands/evaluation.py runs the evaluation):
- A question left without a readable review in either order is excluded from both totals and
  counted in excluded_questions; every unreadable reply (a retried one too) is counted in
  unparseable_judgements. Unreadable replies never count as scores.
- relative_score = 100 * sum(student_score) / sum(teacher_score) over the judged questions: the
  student's total score as a percentage of the teacher's, rounded to 2 decimals; null when no
  question is judged. The same for each category, over the questions that carry it.
"""

from __future__ import annotations

from lion_local.run.record_types import EvalJudgement, EvaluationResult, Question
from lion_local.stages.judging import inconsistent_share, judged_pairs


def summary_line(result: EvaluationResult) -> str:
    """One line per result, e.g. iter_1: student at 87.5% of the teacher (40 of 40 questions judged, 0
    unparseable judgements); NLL 2.31 per token on the questions (teacher 0.52), 2.40 on 32 held-out seeds"""
    nll = _nll_words(result.get("likelihood") or {})
    if "relative_score" not in result:
        return f"{result['checkpoint']}: {nll or 'no NLL figure'}"
    counts = f"{result['judged']} of {result['questions']} questions judged, {result['unparseable_judgements']} unparseable judgements"
    nll = f"; {nll}" if nll else ""
    if result["relative_score"] is None:
        return f"{result['checkpoint']}: no relative score ({counts}){nll}"
    return f"{result['checkpoint']}: student at {result['relative_score']:g}% of the teacher ({counts}){nll}"


def _nll_words(likelihood: dict) -> str:
    questions, held = likelihood.get("questions") or {}, likelihood.get("held_out") or {}
    teacher = (likelihood.get("teacher") or {}).get("questions") or {}
    if questions.get("mean_nll") is None:
        return ""
    words = f"NLL {questions['mean_nll']:.2f} per token on the questions"
    if teacher.get("mean_nll") is not None:
        words += f" (teacher {teacher['mean_nll']:.2f})"
    if held.get("mean_nll") is not None:
        words += f", {held['mean_nll']:.2f} on {held['answers']} held-out seeds"
    return words


def relative_scores(questions: list[Question], judgements: list[EvalJudgement]) -> dict:
    """Counts, totals and relative scores, overall and per category, from one checkpoint's judge
    replies (the arithmetic of the module docstring)."""
    judged = judged_pairs([q["id"] for q in questions], judgements)
    # question id -> (teacher_score, student_score)
    scores = {qid: (pair["teacher_score"], pair["student_score"]) for qid, pair in judged.items()}
    result = {
        "questions": len(questions),
        "judged": len(scores),
        "excluded_questions": len(questions) - len(scores),
        "unparseable_judgements": sum(1 for judgement in judgements if judgement["scores"] is None),
        "position_inconsistent_share": inconsistent_share(list(judged.values())),
        **_totals([scores[q["id"]] for q in questions if q["id"] in scores]),
        "by_category": {},
    }
    for category in dict.fromkeys(q["category"] for q in questions if q["category"]):
        members = [q["id"] for q in questions if q["category"] == category]
        judged = [scores[qid] for qid in members if qid in scores]
        result["by_category"][category] = {"questions": len(members), "judged": len(judged), **_totals(judged)}
    return result


def _totals(pairs: list[tuple[float, float]]) -> dict:
    teacher_total = sum(teacher for teacher, _ in pairs)
    student_total = sum(student for _, student in pairs)
    return {
        "teacher_total": round(teacher_total, 4),
        "student_total": round(student_total, 4),
        "relative_score": round(100 * student_total / teacher_total, 2) if pairs and teacher_total > 0 else None,
    }
