"""The run's report: is the student closing the gap, and where does the cost go.

    lion-local report --config X

Reads what the run wrote (each iteration's report.json, built from the journals, and the
evaluation results under eval/), prints a summary table with one column per iteration, and
writes <run_dir>/report.md with PNG plots in <run_dir>/plots/ (every path from
lion_local.run.layout; the plots' own file names are this module's):

    gaps.png        histogram of the teacher-student score gap, one series per iteration
    likelihood_gaps.png  discrimination.signal likelihood: histogram of the student's NLL per token
                    of the teacher's answers, one series per iteration, with each threshold
    labels.png      hard / easy / unjudged shares of the Cache Pool per iteration
    scores.png      teacher and student mean referee scores per iteration
    pools.png       Train Pool, Cache Pool and generated instructions per iteration
    generation.png  generated instructions accepted per side and rejected per reason
    cost.png        calls, tokens and seconds per role and stage
    evaluation.png  the student's score as a percentage of the teacher's, per checkpoint
                    (only once `lion-local evaluate` has run)
    referee.png     the referee on its control pairs: accuracy, position consistency and unjudged
                    share per iteration, with the bounds that stop a discrimination
    likelihood.png  the NLL per token of the teacher's answers under each checkpoint, from the
                    initial student on, with the teacher's own (once `lion-local evaluate` has run)

It also writes <run_dir>/report.json: every iteration's report.json and every evaluation result in
one file, for scripts, and report.md shows an example of each role's text from the run.

Reading is all it does: the report can be made while a run goes on, and as often as wanted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lion_local.errors import StageOrderError
from lion_local.run.layout import FINAL, INITIAL, Iteration, RunDir
from lion_local.run.record_types import EvaluationResult, IterationReport, Usage
from lion_local.run.state import read_jsonl, read_state, write_atomic
from lion_local.stages.role_calls import ROLE_STAGES

logger = logging.getLogger(__name__)

LABELS = ("hard", "easy", "unjudged")


@dataclass
class IterationSummary:
    """One iteration's report.json, with its checkpoint's evaluation result if any."""

    iteration: Iteration
    report: IterationReport
    evaluation: EvaluationResult | None = None

    @property
    def label(self) -> str:
        """"iter 1", "iter 2", ..., "final": its column in the tables and its name on the plots."""
        return str(self.iteration) if self.iteration.is_final else f"iter {self.iteration}"

    def usage(self, role: str, stage: str) -> Usage | dict:
        roles = self.report.get("roles", {})
        if role == "teacher":
            return roles.get("teacher", {}).get("by_stage", {}).get(stage, {})
        return roles.get(role, {}) if stage != "imitation" else {}


@dataclass
class RunReport:
    run: RunDir
    iterations: list[IterationSummary]
    evaluations: list[EvaluationResult] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    @property
    def judged(self) -> list[IterationSummary]:
        """The iterations whose discrimination labelled the Cache Pool."""
        return [it for it in self.iterations if "labels" in it.report]

    @property
    def generating(self) -> list[IterationSummary]:
        """The iterations with a generation stage."""
        return [it for it in self.iterations if "generation" in it.report]


def collect(run: RunDir) -> RunReport:
    """Every iteration report on disk, in loop order, with its checkpoint's evaluation if any."""
    evaluations = _evaluations(run)
    by_iteration = {_evaluated(e): e for e in evaluations if _evaluated(e) is not None}
    iterations = [
        IterationSummary(iteration, _load(run.at(iteration).report), by_iteration.get(iteration))
        for iteration in [*run.numbered_iterations(), FINAL]
        if run.at(iteration).report.exists()
    ]
    return RunReport(run, iterations, evaluations)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _evaluations(run: RunDir) -> list[EvaluationResult]:
    """Every eval/<checkpoint>/result.json, in loop order (initial, iter_1, ..., final)."""
    results = [_load(path) for path in run.evaluation_results()]
    return sorted(results, key=lambda result: (-1, 0) if _evaluated(result) is None else _evaluated(result).sort_key)


def _evaluated(result: EvaluationResult) -> Iteration | None:
    """The iteration whose checkpoint a result.json evaluates ("iteration": 1, 2, ... or "final"),
    None for the initial student."""
    return None if result["iteration"] == INITIAL else Iteration.parse(str(result["iteration"]))


def nll_of(result: EvaluationResult | None, part: str = "questions", who: str | None = None) -> float | None:
    """An evaluation result's mean NLL per token on `part` (of the teacher's own figure with who="teacher")."""
    likelihood = (result or {}).get("likelihood") or {}
    node = likelihood.get(who) or {} if who else likelihood
    return (node.get(part) or {}).get("mean_nll")


# ----------------------------------------------------------------------------------------------
# The numbers, as rows of text
# ----------------------------------------------------------------------------------------------


def number(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(report: RunReport) -> tuple[list[str], list[list[str]]]:
    """The summary table: a header (one column per iteration) and its rows."""
    header = ["", *(it.label for it in report.iterations)]

    def row(label: str, value) -> list[str]:
        return [label, *(value(it) for it in report.iterations)]

    def get(*keys: str):
        def value(it: IterationSummary) -> str:
            node = it.report
            for key in keys:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            return number(node if node != {} else None)

        return value

    rows = [
        row("discrimination signal", get("signal")),
        row("Train Pool", get("pools", "train")),
        row("trainable parameters", get("imitation", "training", "trainable_parameters")),
        row("Cache Pool", get("pools", "cache")),
        row("generated", get("pools", "generated")),
        *(row(label, get("labels", label)) for label in LABELS),
        row("mean teacher score", get("scores", "mean_teacher")),
        row("mean student score", get("scores", "mean_student")),
        row("mean gap", get("scores", "mean_gap")),
        row("likelihood threshold", get("likelihood_gaps", "threshold")),
        row("position-inconsistent share", get("scores", "position_inconsistent_share")),
        row("unjudged share", get("discrimination", "unjudged_share")),
        row("control pairs", get("referee_check", "pairs")),
        row("control accuracy", get("referee_check", "accuracy")),
        row("control position-consistent share", get("referee_check", "position_consistent_share")),
        row("control unjudged share", get("referee_check", "unjudged_share")),
        row("truncated teacher answers", get("truncated", "teacher_answers")),
        row("truncated student answers", get("truncated", "student_answers")),
        row("truncated generator replies", get("truncated", "generator_replies")),
        row("rejected", get("generation", "rejected_total")),
        row("shortfall", get("generation", "shortfall", "total")),
    ]
    for role, stage in ROLE_STAGES:
        rows.append(row(f"{role} calls ({stage})", lambda it, r=role, s=stage: number(it.usage(r, s).get("calls"))))
    rows.append(row("stage seconds", lambda it: number(sum(it.report.get("stage_seconds", {}).values()), 1)))
    if report.evaluations:
        rows.append(row("student / teacher %", lambda it: number((it.evaluation or {}).get("relative_score"), 1)))
        rows.append(row("NLL of teacher answers", lambda it: number(nll_of(it.evaluation))))
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths)))
             for line in [header, *rows]]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in rows]
    return "\n".join(lines)


def rejection_rows(report: RunReport) -> tuple[list[str], list[list[str]]]:
    generating = report.generating
    reasons = sorted({reason for it in generating for reason in it.report["generation"].get("rejected", {})})
    header = ["", *(it.label for it in generating)]
    rows = [[f"accepted {side}", *(number(it.report["generation"]["accepted"].get(side)) for it in generating)]
            for side in ("hard", "easy")]
    rows += [[f"rejected: {reason}", *(number(it.report["generation"]["rejected"].get(reason, 0)) for it in generating)]
             for reason in reasons]
    return header, rows


def cost_rows(report: RunReport) -> tuple[list[str], list[list[str]]]:
    header = ["iteration", "role", "stage", "calls", "prompt tokens", "completion tokens", "seconds"]
    rows = []
    for it in report.iterations:
        for role, stage in ROLE_STAGES:
            usage = it.usage(role, stage)
            if usage.get("calls"):
                rows.append([str(it.iteration), role, stage, *(number(usage.get(key), 1) for key in
                                                     ("calls", "prompt_tokens", "completion_tokens", "seconds"))])
    return header, rows


def evaluation_rows(report: RunReport) -> tuple[list[str], list[list[str]]]:
    header = ["checkpoint", "student / teacher %", "judged", "excluded questions", "unparseable judgements",
              "NLL (questions)", "NLL (held-out seeds)", "teacher NLL (questions)"]
    rows = [[e["checkpoint"], number(e.get("relative_score"), 1),
             f"{e['judged']}/{e['questions']}" if "judged" in e else "-",
             number(e.get("excluded_questions")), number(e.get("unparseable_judgements")),
             number(nll_of(e)), number(nll_of(e, "held_out")), number(nll_of(e, who="teacher"))]
            for e in report.evaluations]
    categories = sorted({c for e in report.evaluations for c in e.get("by_category", {})})
    if categories:
        header += [f"{c} %" for c in categories]
        for line, e in zip(rows, report.evaluations):
            line += [number(e.get("by_category", {}).get(c, {}).get("relative_score"), 1) for c in categories]
    return header, rows


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------


def markdown(report: RunReport) -> str:
    run = report.run
    state = read_state(run)
    sections = [
        f"# lion-local run report: {run.root.name}",
        f"Completed stages: {', '.join(state['completed']) or 'none'}.",
        f"Servers: {_engines_line(report)}.",
        "Every number comes from the run's journals (through each iteration's report.json); "
        "`lion-local report` writes this file again whenever it runs.",
        "## Summary per iteration",
        markdown_table(*summary_rows(report)),
    ]
    if report.generating:
        sections += ["## Generation", markdown_table(*rejection_rows(report))]
    sections += ["## Calls, tokens and seconds per role and stage", markdown_table(*cost_rows(report))]
    if report.evaluations:
        sections += ["## Evaluation (the student's total judge score as a percentage of the teacher's, and its "
                     "NLL per token of the teacher's answers: lower is closer to the teacher)",
                     markdown_table(*evaluation_rows(report))]
    sections += example_sections(run)
    if report.plots:
        sections.append("## Plots")
        sections += [f"![{path.stem}]({path.relative_to(run.root).as_posix()})" for path in report.plots]
    return "\n\n".join(sections) + "\n"


def example_sections(run: RunDir, limit: int = 600) -> list[str]:
    """report.md's examples: the first journaled reply of each role in the first iteration, as it came."""
    directory = run.iteration(1)
    pool = {r["id"]: r for r in read_jsonl(directory.cache_pool)}
    teacher = {r["id"]: r for r in read_jsonl(run.teacher_answers)}
    picks = [
        ("teacher", next(iter(teacher.values()), None), "answer"),
        ("student", next(iter(read_jsonl(directory.student_answers)), None), "answer"),
        ("referee", next(iter(read_jsonl(directory.reviews)), None), "raw"),
        ("generator", next(iter(read_jsonl(directory.generator_calls)), None), "raw"),
    ]
    sections = []
    for role, record, key in picks:
        if record is None:
            continue
        asked = pool.get(record.get("parent") if role == "generator" else record["id"], {}).get("instruction", "")
        text = record[key] if len(record[key]) <= limit else record[key][:limit] + " [...]"
        what = "its seed" if role == "generator" else "asked"
        if role == "referee":
            what = f"the {record['order'].replace('_', ' ')} review of"
        sections.append(f"**{role}** ({what}: {asked!r}; finish_reason {record.get('finish_reason')}):\n\n"
                        + "\n".join(f"> {line}" for line in (text or "(empty)").splitlines()))
    return ["## Examples from iteration 1 (each role's first reply, as it came)", *sections] if sections else []


def _engines_line(report: RunReport) -> str:
    engines: dict[str, str] = {}
    for iteration in report.iterations:
        engines.update(iteration.report.get("engines", {}))
    return ", ".join(f"{name} on {engine}" for name, engine in sorted(engines.items())) or "not recorded"


def write_report(run: RunDir, make_plots: Callable[[RunReport, Path], list[Path]]) -> RunReport:
    """Collect, plot (with `make_plots`: lion_local.commands.report_plots, which imports matplotlib)
    and write report.md; returns what was reported."""
    if not any(run.at(each).report.exists() for each in run.numbered_iterations()):
        raise StageOrderError(
            f"{run.root}: nothing to report yet; an iteration's report.json is written when its "
            "generation stage ends (lion-local status shows where the run stands)"
        )
    report = collect(run)
    report.plots = make_plots(report, run.plots) if report.iterations else []
    write_atomic(run.report_md, markdown(report))
    summary = {"iterations": {str(it.iteration): it.report for it in report.iterations}, "evaluations": report.evaluations}
    write_atomic(run.report_json, json.dumps(summary, indent=2) + "\n")
    logger.debug("wrote %s and %d plots in %s", run.report_md, len(report.plots), run.plots)
    return report
