"""report.json of each iteration (and of the final imitation), built from the run's files.

Every number comes from the journals and stage summaries on disk, not from in-memory counters,
so a report is the same whether the iteration ran in one go or was killed and resumed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lion_local.run.layout import Iteration, RunDir
from lion_local.run.record_types import CallFields, DiscriminationSummary, IterationReport, LikelihoodGap, Usage
from lion_local.run.state import read_jsonl, read_state, write_atomic
from lion_local.stages.role_calls import CALLS, ROLE_CALLS, call_journals


def usage(records: Sequence[CallFields | LikelihoodGap]) -> Usage:
    """Calls, tokens and seconds of a list of journaled model calls."""
    return {
        "calls": len(records),
        "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in records),
        "completion_tokens": sum(r.get("completion_tokens", 0) for r in records),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
    }


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def iteration_report(run: RunDir, iteration: Iteration, unrecorded_seconds: dict[str, float] | None = None) -> IterationReport:
    """The report of an iteration; `unrecorded_seconds` adds time not yet in state.json (the
    stage finishing now, by marker), so the report can be written before the stage is marked done."""
    directory = run.at(iteration)
    prefix = f"{iteration}/"
    teacher_calls = [r for r in read_jsonl(run.teacher_answers) if r.get("stage", "").startswith(prefix)]
    state = read_state(run)
    imitation = _load(directory.imitation_summary)
    report: IterationReport = {
        "iteration": iteration.json_value,
        "pools": {"train": len(read_jsonl(directory.train_pool))},
        "imitation": imitation,
        "roles": {
            "teacher": {
                **usage(teacher_calls),
                "by_stage": {
                    stage: usage([r for r in teacher_calls if r["stage"] == f"{prefix}{stage}"])
                    for stage in CALLS["teacher"].stages
                },
            },
        },
        "stage_seconds": _stage_seconds(state["stage_seconds"], unrecorded_seconds or {}, prefix),
        "engines": engines(run),
        # replies cut at max_tokens, of those the stage used (lion_local.stages.truncation)
        "truncated": {"teacher_answers": imitation.get("truncated_teacher_answers", 0)},
    }
    if iteration.is_final:
        return report

    discrimination = _load(directory.discrimination_summary)
    generation = _load(directory.generation_summary)
    cache_size = len(read_jsonl(directory.cache_pool))
    generated = generation.get("accepted", {}).get("total", 0)
    report["pools"].update(
        {"cache": cache_size, "generated": generated, "next_train": generated, "next_cache": cache_size + generated}
    )
    report["discrimination"] = discrimination
    report.update(signal_fields(discrimination))
    report["labels"] = {label: discrimination.get(label, 0) for label in ("hard", "easy", "unjudged")}
    report["scores"] = {
        "mean_teacher": discrimination.get("mean_teacher_score"),
        "mean_student": discrimination.get("mean_student_score"),
        "mean_gap": discrimination.get("mean_gap"),
        "gap_histogram": discrimination.get("gap_histogram", []),
        # judged instructions whose two review orders name different better answers
        "position_inconsistent_share": discrimination.get("position_inconsistent_share"),
    }
    report["generation"] = generation
    # the referee on control pairs with a known better side (lion_local.stages.referee_health)
    report["referee_check"] = discrimination.get("referee_check")
    report["truncated"].update({
        "teacher_answers_cache_pool": discrimination.get("truncated_teacher_answers", 0),
        "student_answers": discrimination.get("truncated_student_answers", 0),
        "generator_replies": generation.get("truncated_replies", 0),
    })
    for calls in ROLE_CALLS:
        if calls.run_journal is None:  # the teacher's, run-wide, is counted above
            report["roles"][calls.role] = usage([r for path in call_journals(directory, calls.role) for r in read_jsonl(path)])
    return report


def signal_fields(discrimination: DiscriminationSummary) -> dict:
    """How the discrimination split the Cache Pool (discrimination.signal; a summary without one: the
    referee), with the likelihood's threshold and histogram (lion_local.stages.likelihood_gaps)."""
    fields = {"signal": discrimination.get("signal", "referee")}
    if fields["signal"] == "likelihood":
        fields["likelihood_gaps"] = {key: discrimination.get(key) for key in ("threshold", "likelihood_quantile", "nll_histogram")}
    return fields


def engines(run: RunDir) -> dict[str, str]:
    """Server name -> the engine and version it last started with ("vllm 0.32.0")."""
    return {record["server"]: record["engine"] for record in read_jsonl(run.servers_journal) if record.get("engine")}


def _stage_seconds(recorded: dict[str, float], unrecorded: dict[str, float], prefix: str) -> dict[str, float]:
    markers = [m for m in {**recorded, **unrecorded} if m.startswith(prefix)]
    return {m: round(recorded.get(m, 0.0) + unrecorded.get(m, 0.0), 3) for m in markers}


def write_iteration_report(
    run: RunDir, iteration: Iteration, unrecorded_seconds: dict[str, float] | None = None
) -> IterationReport:
    report = iteration_report(run, iteration, unrecorded_seconds)
    write_atomic(run.at(iteration).report, json.dumps(report, indent=2) + "\n")
    return report
