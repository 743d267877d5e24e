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

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lion_local.config import Config, api_key_for, check_launchers, check_models_exist, config_to_yaml
from lion_local.stages.discrimination import run_discrimination
from lion_local.stages.generation import run_generation
from lion_local.stages.imitation import run_imitation
from lion_local.stages.iteration_report import write_iteration_report
from lion_local.run.records import seed_records
from lion_local.run.state import (
    FINAL,
    STAGES,
    RunDir,
    StageOrderError,
    add_stage_seconds,
    mark_completed,
    read_jsonl,
    read_state,
    run_lock,
    write_atomic,
)
from lion_local.endpoints.servers import ServerSet
from lion_local.smoke.tiny_models import ensure_tiny_models

logger = logging.getLogger(__name__)


def stage_markers(config: Config) -> list[str]:
    markers = [f"{k}/{stage}" for k in range(1, config.iterations + 1) for stage in STAGES]
    if config.imitation.final_imitation:
        markers.append(f"{FINAL}/imitation")
    return markers


def remaining_markers(config: Config, run: RunDir) -> list[str]:
    completed = set(read_state(run)["completed"])
    return [marker for marker in stage_markers(config) if marker not in completed]


def remaining_iterations(config: Config) -> list[str]:
    """The iterations with a stage left ("1", "2", ..., "final"), in order; each is one `iteration` command."""
    run = RunDir(config.run_dir)
    left: list[str] = []
    for marker in remaining_markers(config, run):
        iteration = marker.split("/")[0]
        if iteration not in left:
            left.append(iteration)
    return left


def markers_for(config: Config, run: RunDir, scope: str, stage: str | None = None) -> list[str]:
    """The stages a command runs: scope is "run", "iteration" or "stage" (with its name)."""
    remaining = remaining_markers(config, run)
    if not remaining:
        return []
    if scope == "run":
        return remaining
    current = remaining[0].split("/")[0]
    if scope == "iteration":
        return [marker for marker in remaining if marker.split("/")[0] == current]
    if stage == FINAL and not config.imitation.final_imitation:
        raise StageOrderError("the final imitation is off in this config (imitation.final_imitation: false)")
    if current == FINAL and stage != FINAL:
        raise StageOrderError(f"every iteration is complete; the next stage is {remaining[0]}")
    wanted = f"{FINAL}/imitation" if stage == FINAL else f"{current}/{stage}"
    if wanted == remaining[0]:
        return [wanted]
    if wanted not in remaining:
        raise StageOrderError(f"stage {wanted} is already complete; the next stage is {remaining[0]}")
    raise StageOrderError(f"stage {wanted} cannot run yet: the next stage is {remaining[0]}; run that first")


def check_inputs(config: Config, run: RunDir) -> None:
    """Everything a run needs beyond the config, checked before the run directory is created."""
    servers = config.servers_in_use()
    check_models_exist(config, servers)
    check_launchers(config, servers)
    for name in servers:
        api_key_for(config, name)
    if not (run.iteration(1) / "cache_pool.jsonl").exists():
        seed_records(config)  # a bad seed file fails here, before anything is written


def execute(config: Config, scope: str, stage: str | None = None) -> list[str]:
    """Run the stages of `scope`; return the markers completed now ([] when nothing was left)."""
    run = RunDir(config.run_dir)
    if run.state_json.exists() and not remaining_markers(config, run):
        return []
    markers_for(config, run, scope, stage)  # a stage out of order fails before anything is written
    check_inputs(config, run)
    run.root.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    with run_lock(run):
        markers = markers_for(config, run, scope, stage)  # again: another process may have moved on
        ensure_tiny_models(config)
        write_atomic(run.config_yaml, config_to_yaml(config))
        with run_log(run), ServerSet(config, run.logs, run.servers_journal) as servers:
            for marker in markers:
                run_stage(config, run, marker, servers)
                done.append(marker)
    return done


def run_stage(config: Config, run: RunDir, marker: str, servers: ServerSet) -> None:
    iteration, stage = marker.split("/")
    k: int | str = iteration if iteration == FINAL else int(iteration)
    logger.info("==== %s", marker)
    started = time.monotonic()
    try:
        if stage == "imitation":
            run_imitation(config, run, k, servers)
        elif stage == "discrimination":
            run_discrimination(config, run, k, servers)
        else:
            run_generation(config, run, k, servers)
        seconds = time.monotonic() - started
        if stage == "generation" or k == FINAL:
            # Before the marker, so a finished iteration always has its report.
            write_iteration_report(run, k, {marker: seconds})
    except BaseException:
        add_stage_seconds(run, marker, time.monotonic() - started)
        raise
    mark_completed(run, marker, seconds)
    logger.info("==== %s done in %.1f s", marker, seconds)


@contextmanager
def run_log(run: RunDir) -> Iterator[None]:
    """Copy lion-local's log records to <run_dir>/logs/lion-local.log for the whole command."""
    run.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.logs / "lion-local.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("lion_local", "serving")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield
    finally:
        for each in loggers:
            each.removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------


def status_lines(config: Config) -> list[str]:
    """One line per stage: done, next or pending, with done/total of its work."""
    run = RunDir(config.run_dir)
    if not run.state_json.exists() and not run.root.exists():
        return [f"run {run.root}: not started ({len(stage_markers(config))} stages to run)"]
    state = read_state(run)
    remaining = remaining_markers(config, run)
    lines = []
    if remaining:
        current = remaining[0].split("/")[0]
        where = "final imitation" if current == FINAL else f"iteration {current} of {config.iterations}"
        lines.append(f"run {run.root}: {where}, next stage {remaining[0]}")
    else:
        lines.append(f"run {run.root}: complete ({len(state['completed'])} stages)")
    answered = {r["id"] for r in read_jsonl(run.teacher_answers)}
    for marker in stage_markers(config):
        label = "done" if marker in state["completed"] else ("next" if remaining and marker == remaining[0] else "pending")
        seconds = state["stage_seconds"].get(marker)
        timing = f" {seconds:.0f} s" if seconds else ""
        lines.append(f"  {marker:<20} {label:<8}{timing:>8}  {_progress(config, run, marker, answered)}")
    return lines


def _progress(config: Config, run: RunDir, marker: str, answered: set[str]) -> str:
    iteration, stage = marker.split("/")
    directory = run.iteration(iteration)
    if not directory.exists():
        return ""
    train = read_jsonl(directory / "train_pool.jsonl")
    cache = read_jsonl(directory / "cache_pool.jsonl")
    if stage == "imitation":
        parts = [f"teacher answers {sum(1 for r in train if r['id'] in answered)}/{len(train)}"]
        progress = _json(directory / "sft_progress.json")
        if (directory / "student").is_dir():
            parts.append("student trained")
        elif progress.get("max_steps"):
            parts.append(f"training steps {progress['step']}/{progress['max_steps']}")
        return ", ".join(parts)
    if stage == "discrimination":
        student = len(read_jsonl(directory / "student_answers.jsonl"))
        reviews = read_jsonl(directory / "reviews.jsonl")
        finished = {(r["id"], r["order"]) for r in reviews if r["scores"] is not None}
        attempts: dict[tuple[str, str], int] = {}
        for review in reviews:
            attempts[(review["id"], review["order"])] = attempts.get((review["id"], review["order"]), 0) + 1
        given_up = {key for key, count in attempts.items() if count > config.roles.referee.parse_retries}
        return (
            f"student answers {student}/{len(cache)}, "
            f"reviews {len(finished | given_up)}/{2 * len(cache)}"
        )
    generated = len(read_jsonl(directory / "generated.jsonl"))
    calls = len(read_jsonl(directory / "generator_calls.jsonl"))
    if not calls:
        return ""
    return f"accepted {generated}/{config.generation.new_per_iteration}, generator calls {calls}"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
