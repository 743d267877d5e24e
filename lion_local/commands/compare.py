"""Runs side by side: did one arm (signal, seed) close the gap to the teacher better, and at what cost.

    lion-local compare RUN_DIR RUN_DIR... --out DIR [--json]

Reads each run directory (state.json, identity.json, iter_1/cache_pool.jsonl, every iteration's
report.json and the evaluation results under eval/, all through lion_local.run.layout and
lion_local.commands.report.collect), prints one table with one column per run, and writes:

    DIR/compare.md     the table, and the plots below
    DIR/compare.json   the same rows as data: {"runs": [...], "rows": [{"row", "values"}]}
    DIR/plots/nll.png         NLL per token of the teacher's answers per checkpoint (once evaluated)
    DIR/plots/hard_share.png  the Cache Pool's hard share per iteration
    DIR/plots/cost.png        calls per role

Runs compare only when they started from the same seed instructions (the ids of iter_1's Cache
Pool) with the same teacher (its server's settings, roles.teacher.*, its prompt); their seed and
discrimination.* may differ, being what is compared. Runs may be unfinished: what a run has not
reached is "-". Reading is all it does to the runs; DIR must lie outside every one of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from lion_local.commands.report import collect, markdown_table, nll_of, number, text_table
from lion_local.errors import InputError
from lion_local.run.identity import changed_keys
from lion_local.run.layout import INITIAL, RunDir, Stage
from lion_local.run.preflight import check_dir_path, writable_dir
from lion_local.run.record_types import EvaluationResult, IterationReport
from lion_local.run.state import read_jsonl, read_state, write_atomic
from lion_local.stages.role_calls import ROLES

logger = logging.getLogger(__name__)

USAGE_KEYS = ("calls", "prompt_tokens", "completion_tokens")
# discrimination.signal is recorded since the likelihood signal exists; older runs used the referee.
DEFAULT_SIGNAL = "referee"
COMPARE_MD, COMPARE_JSON, PLOTS = "compare.md", "compare.json", "plots"
_SHOWN_CHARS = 40


class ComparedRun(TypedDict):
    """What read_run reads of one run directory."""

    name: str
    path: str
    settings: dict  # identity.json's "settings"
    seed_ids: list[str]
    completed: list[str]  # stage markers
    reports: dict[str, IterationReport]  # by iteration: "1", "2", ..., "final"
    evaluations: dict[str, EvaluationResult]  # by checkpoint


@dataclass
class Row:
    label: str
    values: list
    digits: int = 2  # of a float, in the table


@dataclass
class Comparison:
    runs: list[ComparedRun]  # in the order given
    rows: list[Row]
    plots: list[Path] = field(default_factory=list)

    @property
    def header(self) -> list[str]:
        return ["", *(column(run) for run in self.runs)]

    def table(self) -> list[list[str]]:
        return [[row.label, *(number(value, row.digits) for value in row.values)] for row in self.rows]

    def as_json(self) -> dict:
        runs = [{"name": run["name"], "path": run["path"], "column": column(run), "signal": signal(run),
                 "seed": run["settings"].get("seed")} for run in self.runs]
        return {"runs": runs, "rows": [{"row": row.label, "values": row.values} for row in self.rows]}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_run(path: Path, name: str) -> ComparedRun:
    """What compare needs of one run directory (check_paths found its state.json), as plain data."""
    run = RunDir(path)
    state = read_state(run)
    seeds = run.iteration(1).cache_pool
    if not seeds.is_file():
        raise InputError(f"{path}: no {seeds.relative_to(path)}; the run has not started its first iteration, "
                         "so it has nothing to compare yet")
    try:
        report = collect(run)
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: a report.json or eval/*/result.json cannot be read ({exc}); "
                         "restore it, or run again the stage or the evaluation that wrote it") from None
    return {
        "name": name,
        "path": str(path),
        "settings": _settings(run),
        "seed_ids": sorted(record["id"] for record in read_jsonl(seeds)),
        "completed": state["completed"],
        "reports": {str(it.iteration): it.report for it in report.iterations},
        "evaluations": {result["checkpoint"]: result for result in report.evaluations},
    }


def _settings(run: RunDir) -> dict:
    hint = "compare only runs lion-local made (it writes identity.json when a run starts)"
    try:
        recorded = json.loads(run.identity.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{run.root}: no identity.json, so its teacher cannot be checked; {hint}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{run.identity}: cannot read the run's settings ({exc}); restore it") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
        raise InputError(f"{run.identity}: must be a JSON object with 'settings'; restore it")
    return recorded["settings"]


def column_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, or its last two path parts (then its whole path) where names collide."""
    resolved = [path.resolve() for path in paths]
    for depth in (1, 2):
        names = ["/".join(path.parts[-depth:]) for path in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(path) for path in resolved]


# ----------------------------------------------------------------------------------------------
# Whether the runs compare (pure)
# ----------------------------------------------------------------------------------------------


def teacher_settings(settings: dict) -> dict:
    """The identity keys that shape the teacher's answers: its server's, roles.teacher.*, its prompt."""
    server = settings.get("roles.teacher.server")
    return {key: value for key, value in settings.items()
            if key.startswith("roles.teacher.") or key == "prompts.teacher" or key.startswith("prompts.teacher.")
            or (server is not None and key.startswith(f"servers.{server}."))}


_UNSET = object()


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not _UNSET else "(unset)"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def mismatch(first: ComparedRun, other: ComparedRun) -> str | None:
    """Why two runs do not compare (other seed data, another teacher), in one line; None if they do."""
    seeds_a, seeds_b = set(first["seed_ids"]), set(other["seed_ids"])
    if seeds_a != seeds_b:
        return (f"{first['path']} and {other['path']} started from different seed data: "
                f"{len(seeds_a ^ seeds_b)} seed instructions differ (of {len(seeds_a)} and {len(seeds_b)} in "
                "iter_1/cache_pool.jsonl); compare runs made from the same seed file")
    teacher_a, teacher_b = teacher_settings(first["settings"]), teacher_settings(other["settings"])
    changed = changed_keys(teacher_a, teacher_b)
    if not changed:
        return None
    key = "roles.teacher.server" if "roles.teacher.server" in changed else changed[0]
    return (f"{first['path']} and {other['path']} have different teachers: {key} is "
            f"{_shown(teacher_a.get(key, _UNSET))} and {_shown(teacher_b.get(key, _UNSET))}; "
            "compare runs of the same teacher (only the seed and discrimination.* may differ)")


# ----------------------------------------------------------------------------------------------
# The rows (pure: each takes read_run's dicts)
# ----------------------------------------------------------------------------------------------


def signal(run: ComparedRun) -> str:
    return run["settings"].get("discrimination.signal", DEFAULT_SIGNAL)


def column(run: ComparedRun) -> str:
    """A run's column header: "arm-a (likelihood, seed 1)"."""
    return f"{run['name']} ({signal(run)}, seed {run['settings'].get('seed', '?')})"


def iterations_completed(run: ComparedRun) -> int:
    """The numbered iterations whose generation, their last stage, finished."""
    stages = [Stage.parse(marker) for marker in run["completed"]]
    return sum(1 for stage in stages if stage.name == "generation" and not stage.iteration.is_final)


def hard_shares(run: ComparedRun) -> dict[int, float | None]:
    """Iteration -> labels.hard / pools.cache; None where nothing was labelled (signal none, or no labels)."""
    shares = {}
    for key, report in run["reports"].items():
        if key.isdigit():
            labels, cache = report.get("labels") or {}, report.get("pools", {}).get("cache")
            judged = sum(labels.get(name, 0) for name in ("hard", "easy", "unjudged"))
            shares[int(key)] = labels.get("hard", 0) / cache if judged and cache else None
    return shares


def control_accuracies(run: ComparedRun) -> dict[int, float | None]:
    return {int(key): (report.get("referee_check") or {}).get("accuracy")
            for key, report in run["reports"].items() if key.isdigit()}


def checkpoint_order(name: str) -> tuple[int, int]:
    """initial, iter_1, iter_2, ..., final."""
    if name == INITIAL:
        return (-1, 0)
    number = name.removeprefix("iter_")
    return (0, int(number)) if number.isdigit() else (1, 0) if name == "final" else (2, 0)


def checkpoint_label(name: str) -> str:
    return name.replace("_", " ")


def nll_by_checkpoint(run: ComparedRun, part: str) -> dict[str, float | None]:
    """Checkpoint -> the mean NLL per token of the teacher's answers on `part` ("questions", "held_out")."""
    return {name: nll_of(result, part) for name, result in run["evaluations"].items()}


def usage_totals(run: ComparedRun) -> dict[str, dict[str, int]]:
    """Role -> calls, prompt and completion tokens, summed over every iteration report (final included)."""
    totals = {role: dict.fromkeys(USAGE_KEYS, 0) for role in ROLES}
    for report in run["reports"].values():
        for role in ROLES:
            usage = report.get("roles", {}).get(role, {})
            for key in USAGE_KEYS:
                totals[role][key] += usage.get(key, 0)
    return totals


def _training_examples(run: ComparedRun) -> int | None:
    counts = [report.get("imitation", {}).get("examples") for report in run["reports"].values()]
    counts = [count for count in counts if count is not None]
    return sum(counts) if counts else None


def comparison_rows(runs: list[ComparedRun]) -> list[Row]:
    """Every row of the table, one value per run (None: the run has no such number)."""
    usage = [usage_totals(run) for run in runs]
    shares = [hard_shares(run) for run in runs]
    accuracies = [control_accuracies(run) for run in runs]
    rows = [
        Row("signal", [signal(run) for run in runs]),
        Row("seed", [run["settings"].get("seed") for run in runs]),
        Row("iterations completed", [iterations_completed(run) for run in runs]),
        Row("final imitation", ["done" if "final/imitation" in run["completed"] else "no" for run in runs]),
        Row("teacher answers used", [totals["teacher"]["calls"] for totals in usage]),
        Row("training examples", [_training_examples(run) for run in runs]),
    ]
    iterations = sorted({k for each in shares for k in each})
    rows += [Row(f"hard share, iter {k}", [each.get(k) for each in shares], 3) for k in iterations]
    rows += [Row(f"control accuracy, iter {k}", [each.get(k) for each in accuracies], 3) for k in iterations]
    rows += evaluation_rows(runs)
    rows += [Row(f"{role} {key.replace('_', ' ')}", [totals[role][key] for totals in usage])
             for role in ROLES for key in USAGE_KEYS]
    return rows


def evaluation_rows(runs: list[ComparedRun]) -> list[Row]:
    """NLL (questions, held-out) and relative score per checkpoint that some run has a number for."""
    checkpoints = sorted({name for run in runs for name in run["evaluations"]}, key=checkpoint_order)
    measures = (
        ("NLL questions", lambda run, name: nll_by_checkpoint(run, "questions").get(name), 3),
        ("NLL held-out", lambda run, name: nll_by_checkpoint(run, "held_out").get(name), 3),
        ("student / teacher %", lambda run, name: run["evaluations"].get(name, {}).get("relative_score"), 1),
    )
    rows = []
    for label, value, digits in measures:
        for name in checkpoints:
            values = [value(run, name) for run in runs]
            if any(v is not None for v in values):
                rows.append(Row(f"{label}, {checkpoint_label(name)}", values, digits))
    return rows


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def check_paths(paths: list[Path], out: Path) -> Path:
    """The resolved --out; refused with fewer than 2 runs, a folder that is no run, a run given twice,
    or an --out inside a run."""
    if len(paths) < 2:
        given = f" (got only {paths[0]})" if paths else ""
        raise InputError(f"compare needs at least 2 run directories{given}; give two or more RUN_DIRs")
    resolved = out.resolve()
    seen: set[Path] = set()
    for path in paths:
        if not RunDir(path).state_json.is_file():
            raise InputError(f"{path}: not a run directory (no state.json); "
                             "give the run_dir of a run lion-local has started")
        root = path.resolve()
        if root in seen:
            raise InputError(f"{path}: given twice; give each run directory once")
        seen.add(root)
        if resolved == root or resolved.is_relative_to(root):
            raise InputError(f"--out {out}: inside the run directory {path}; compare reads runs only: "
                             "give a folder outside every run")
    check_dir_path(resolved, "--out")
    return resolved


def compare_runs(paths: list[Path], out: Path, make_plots: Callable[[Comparison, Path], list[Path]]) -> Comparison:
    """Read, check and compare the runs; write compare.md, compare.json and the plots under `out`
    (drawn by `make_plots`: lion_local.commands.compare_plots, which imports matplotlib)."""
    out = check_paths(paths, out)
    runs = [read_run(path, name) for path, name in zip(paths, column_names(paths))]
    for other in runs[1:]:
        problem = mismatch(runs[0], other)
        if problem is not None:
            raise InputError(problem)
    result = Comparison(runs, comparison_rows(runs))
    writable_dir(out, "--out")
    result.plots = make_plots(result, out / PLOTS)
    write_atomic(out / COMPARE_JSON, json.dumps(result.as_json(), indent=2) + "\n")
    write_atomic(out / COMPARE_MD, markdown(result, out))
    logger.debug("wrote %s, %s and %d plots", out / COMPARE_MD, out / COMPARE_JSON, len(result.plots))
    return result


def table_text(result: Comparison) -> str:
    return text_table(result.header, result.table())


def markdown(result: Comparison, out: Path) -> str:
    sections = [
        "# lion-local compare",
        "Runs: " + ", ".join(f"`{run['name']}` ({run['path']})" for run in result.runs) + ".",
        "The same seed instructions and the same teacher; a number a run has not reached yet is \"-\". "
        "Shares are of the Cache Pool; NLL is per token of the teacher's answers (lower: closer to the teacher); "
        "costs are summed over every iteration, the final imitation included.",
        markdown_table(result.header, result.table()),
    ]
    if not any(run["evaluations"] for run in result.runs):
        sections.append("No run has evaluation results yet: `lion-local evaluate` adds the NLL and relative scores.")
    if result.plots:
        sections += ["## Plots", *(f"![{path.stem}]({path.relative_to(out).as_posix()})" for path in result.plots)]
    return "\n\n".join(sections) + "\n"
