"""The adversarial loop: which stage comes next, running stages in order, and the run's status.

    lion-local run --config X          every remaining stage, then the final imitation
    lion-local iteration --config X    the remaining stages of the next iteration
    lion-local stage NAME --config X   one stage (it must be the next one)
    lion-local status --config X       where the run stands

Stages run in the fixed order 1/imitation, 1/discrimination, 1/generation, 2/imitation, ...,
final/imitation; a stage is done once its marker is in state.json. Everything a command needs
beyond the config (seed data, model directories, API keys) is checked before the run directory
is created, and one writer lock guards the run directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from lion_local.config import Config, config_to_yaml
from lion_local.endpoints.access import check_access, check_launchers, check_models_exist
from lion_local.endpoints.servers import ServerSet
from lion_local.errors import LionError, StageOrderError
from lion_local.stages.run_identity import check_accepted, check_resume
from lion_local.run.layout import FINAL, Iteration, RunDir, Stage, all_stages
from lion_local.run.log import run_log
from lion_local.run.preflight import check_finished_stages, check_within_iterations, writable_dir
from lion_local.run.record_types import CallFields, TeacherAnswer
from lion_local.run.records import seed_records
from lion_local.run.state import Journal, add_stage_seconds, completed_stages, mark_completed, read_jsonl, read_state, run_lock, write_atomic
from lion_local.smoke.tiny_models import ensure_tiny_models
from lion_local.stages.decontamination import decontamination_index
from lion_local.stages.discrimination import run_discrimination
from lion_local.stages.generation import run_generation
from lion_local.stages.imitation import run_imitation
from lion_local.stages.judging import current_reviews, pending_reviews, referee_fingerprint
from lion_local.stages.role_calls import REVIEW_ORDERS
from lion_local.stages.iteration_report import write_iteration_report

logger = logging.getLogger(__name__)


def run_stages(config: Config) -> list[Stage]:
    return all_stages(config.iterations, config.imitation.final_imitation)


def remaining_stages(config: Config, run: RunDir) -> list[Stage]:
    completed = set(completed_stages(run))
    return [stage for stage in run_stages(config) if stage not in completed]


def remaining_iterations(config: Config) -> list[Iteration]:
    """The iterations with a stage left (1, 2, ..., final), in order; each is one `iteration` command."""
    return list(dict.fromkeys(stage.iteration for stage in remaining_stages(config, RunDir(config.run_dir))))


def stages_for(config: Config, run: RunDir, scope: str, stage: str | None = None) -> list[Stage]:
    """The stages a command runs: scope is "run", "iteration" or "stage" (with its name, or "final")."""
    remaining = remaining_stages(config, run)
    if not remaining:
        return []
    if scope == "run":
        return remaining
    current = remaining[0].iteration
    if scope == "iteration":
        return [each for each in remaining if each.iteration == current]
    if stage == "final" and not config.imitation.final_imitation:
        raise StageOrderError("the final imitation is off in this config (imitation.final_imitation: false)")
    if current.is_final and stage != "final":
        raise StageOrderError(f"every iteration is complete; the next stage is {remaining[0]}")
    wanted = FINAL.stage("imitation") if stage == "final" else current.stage(stage)  # type: ignore[arg-type]
    if wanted == remaining[0]:
        return [wanted]
    if wanted not in remaining:
        raise StageOrderError(f"stage {wanted} is already complete; the next stage is {remaining[0]}")
    raise StageOrderError(f"stage {wanted} cannot run yet: the next stage is {remaining[0]}; run that first")


def check_inputs(config: Config, run: RunDir, stages: list[Stage] | None = None) -> None:
    """Everything a run needs beyond the config, checked before the run directory is created
    (`stages`: those about to run, None: any; only a training stage needs a launchable accelerate file)."""
    from lion_local.config import check_accelerate_config
    from lion_local.stages.training_launch import check_launch_settings

    servers = config.servers_in_use()
    check_models_exist(config, servers)
    check_launchers(config, servers)
    for name in servers:
        check_access(config, name)
    if not run.iteration(1).cache_pool.exists():
        seed_records(config)  # a bad seed file fails here, before anything is written
    decontamination_index(config)  # and so does a bad question file
    # A FIFO, a broken file or settings accelerate would not honour here (FSDP on the CPU) would
    # stop or mislead the training process, not this one.
    if stages is None or any(each.name == "imitation" for each in stages):
        check_launch_settings(config)
    else:
        check_accelerate_config(config)


def execute(config: Config, scope: str, stage: str | None = None, accepted_changes: tuple[str, ...] = ()) -> list[Stage]:
    """Run the stages of `scope`; return the stages completed now ([] when nothing was left).

    `accepted_changes`: result-shaping settings that may differ from the run's (lion_local.run.identity).
    """
    run = RunDir(config.run_dir)
    check_accepted(run, config, accepted_changes)
    check_within_iterations(run, config.iterations)
    if run.state_json.exists() and not remaining_stages(config, run):
        return []
    # A stage out of order fails before anything is written.
    check_inputs(config, run, stages_for(config, run, scope, stage))
    writable_dir(run.root, "run_dir")  # a full, read-only or bad path: one line before the first write
    done: list[Stage] = []
    with run_lock(run):
        stages = stages_for(config, run, scope, stage)  # again: another process may have moved on
        check_resume(run, config, accepted_changes, next_stage=str(stages[0]) if stages else "")
        stages = stages_for(config, run, scope, stage)  # an accepted change may have re-opened a stage
        # state.json is checked, not trusted, before a stage builds on what it says finished
        check_finished_stages(run, stages[0] if stages else None, config.iterations)
        ensure_tiny_models(config)
        write_atomic(run.config_yaml, config_to_yaml(config))
        with run_log(run):
            asyncio.run(run_in_order(config, run, stages, done))
    return done


async def run_in_order(config: Config, run: RunDir, stages: list[Stage], done: list[Stage]) -> None:
    """Run `stages` in order in the command's one event loop, with servers kept across them;
    append each to `done` as it completes."""
    with Journal(run.servers_journal) as started:
        async with ServerSet(config, run.logs, started.append) as servers:
            for each in stages:
                await run_stage(config, run, each, servers)
                done.append(each)


async def run_stage(config: Config, run: RunDir, stage: Stage, servers: ServerSet) -> None:
    logger.info("==== %s", stage)
    started = time.monotonic()
    try:
        if stage.name == "imitation":
            await run_imitation(config, run, stage.iteration, servers)
        elif stage.name == "discrimination":
            await run_discrimination(config, run, stage.iteration, servers)
        else:
            await run_generation(config, run, stage.iteration, servers)
        seconds = time.monotonic() - started
        if stage.name == "generation" or stage.iteration.is_final:
            # Before the marker, so a finished iteration always has its report.
            write_iteration_report(run, stage.iteration, {str(stage): seconds})
    except BaseException:
        try:
            add_stage_seconds(run, stage, time.monotonic() - started)
        except (OSError, LionError) as exc:  # a full disk, say: the stage's own error is the one to report
            logger.warning("%s: the time of this attempt is not recorded: %s", stage, exc)
        raise
    mark_completed(run, stage, seconds)
    logger.info("==== %s done in %.1f s", stage, seconds)


# ----------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------


def status_lines(config: Config) -> list[str]:
    """One line per stage: done, next or pending, with done/total of its work."""
    run = RunDir(config.run_dir)
    if not run.state_json.exists() and not run.root.exists():
        return [f"run {run.root}: not started ({len(run_stages(config))} stages to run)"]
    check_within_iterations(run, config.iterations)
    state = read_state(run)
    remaining = remaining_stages(config, run)
    check_finished_stages(run, remaining[0] if remaining else None, config.iterations)
    lines = []
    if remaining:
        current = remaining[0].iteration
        where = "final imitation" if current.is_final else f"iteration {current} of {config.iterations}"
        lines.append(f"run {run.root}: {where}, next stage {remaining[0]}")
    else:
        lines.append(f"run {run.root}: complete ({len(state['completed'])} stages)")
    answered = {r["id"]: r for r in read_jsonl(run.teacher_answers)}
    for stage in run_stages(config):
        label = "done" if str(stage) in state["completed"] else ("next" if remaining and stage == remaining[0] else "pending")
        seconds = state["stage_seconds"].get(str(stage))
        timing = f" {seconds:.0f} s" if seconds else ""
        lines.append(f"  {str(stage):<20} {label:<8}{timing:>8}  {_progress(config, run, stage, answered)}")
    return lines


def _progress(config: Config, run: RunDir, stage: Stage, answered: dict[str, TeacherAnswer]) -> str:
    directory = run.at(stage.iteration)
    if not directory.exists():
        return ""
    train = read_jsonl(directory.train_pool)
    cache = read_jsonl(directory.cache_pool)
    if stage.name == "imitation":
        done = [answered[r["id"]] for r in train if r["id"] in answered]
        parts = [f"teacher answers {len(done)}/{len(train)}{_truncated(done)}"]
        progress = _json(directory.sft_progress)
        if directory.student.is_dir():
            parts.append("student trained")
        elif progress.get("max_steps"):
            parts.append(f"training steps {progress.get('step')}/{progress['max_steps']}")
        return ", ".join(parts)
    if stage.name == "discrimination" and config.discrimination.signal != "referee":
        if config.discrimination.signal == "none":
            return "no discrimination (signal none: seeds drawn from the whole Cache Pool)"
        return f"likelihood gaps {len(read_jsonl(directory.likelihoods))}/{len(cache)}"
    if stage.name == "discrimination":
        student = len(read_jsonl(directory.student_answers))
        reviews = current_reviews(read_jsonl(directory.reviews), "referee", referee_fingerprint(config, config.roles.referee.server))
        due = pending_reviews([r["id"] for r in cache], reviews, config.roles.referee.parse_retries)
        referee_check = _json(directory.discrimination_summary).get("referee_check")
        accuracy = referee_check.get("accuracy") if isinstance(referee_check, dict) else None
        check = f", control accuracy {accuracy:.2f}" if isinstance(accuracy, (int, float)) else ""
        wanted = REVIEW_ORDERS * len(cache)
        return f"student answers {student}/{len(cache)}, reviews {wanted - len(due)}/{wanted}{check}"
    generated = len(read_jsonl(directory.generated))
    calls = read_jsonl(directory.generator_calls)
    if not calls:
        return ""
    return f"accepted {generated}/{config.generation.new_per_iteration}, generator calls {len(calls)}{_truncated(calls)}"


def _truncated(calls: Sequence[CallFields]) -> str:
    """" (N truncated)" when N of the journaled calls were cut at max_tokens."""
    cut = sum(1 for call in calls if call.get("finish_reason") == "length")
    return f" ({cut} truncated)" if cut else ""


def _json(path: Path) -> dict:
    """A summary file for status to show from; {} when missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
