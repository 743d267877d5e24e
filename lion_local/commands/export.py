"""The run's distilled data, exported to train with another stack or to study the Cache Pool.

    lion-local export --config X --out DIR [--format messages|alpaca|all] [--hf] [--partial]

Reads the run and writes only under DIR (never inside the run directory; the names below are
this module's, the run's own paths come from lion_local.run.layout):

    train.messages.jsonl         every instruction an imitation stage trained on, with the teacher's
                                 answer, as chat messages (the user turn is the student's chat prompt,
                                 lion_local.roles.student): {"messages": [user, assistant], "id",
                                 "origin", "parent", "iteration", "trained_in"}
    train.alpaca.json            the same rows as a JSON list of {"instruction", "input", "output", "id",
                                 "origin", "parent", "iteration", "trained_in"}; it reads back as a seed
                                 file (lion_local.run.seed_data.load_seed_instructions)
    cache_pool.judgements.jsonl  one line per (discrimination, Cache Pool instruction): "id",
                                 "instruction", "input", "origin", "parent", "iteration_added" (the
                                 record's iteration), "iteration" (the discrimination's), "teacher_score",
                                 "student_score", "gap", "label", and "position_consistent" when judged
    export.json                  counts per file, stage and iteration; the run, the stages, the formats
    hf/                          with --hf: a datasets.DatasetDict ("train", "cache_pool") written with
                                 save_to_disk, for datasets.load_from_disk

`--format` picks the training files (default all). The training rows follow the stage's own rule
(lion_local.stages.imitation.training_examples leaves out an empty teacher answer); each answer
is the teacher cache's line for the id with the config's teacher fingerprint
(lion_local.stages.teacher_answers.teacher_fingerprint). Only the stages state.json records as
finished are exported; the others are left out, saying so, unless --partial includes their
files as they are (an imitation's instructions answered so far; a discrimination's judgements,
or the stage's `judge` over the reviews so far with the instructions still under review labelled
"pending"), marked partial in export.json. Everything is read and checked before anything is
written; each file is replaced atomically, export.json last.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lion_local.config import Config
from lion_local.errors import InputError, StageOrderError
from lion_local.roles.student import student_chat_messages
from lion_local.run.layout import Iteration, RunDir, Stage
from lion_local.run.preflight import check_dir_path, writable_dir
from lion_local.run.record_types import InstructionRecord, Judgement, TeacherAnswer
from lion_local.run.records import by_id
from lion_local.run.state import completed_stages, read_jsonl, write_atomic, write_jsonl_atomic
from lion_local.stages.teacher_answers import teacher_fingerprint
from lion_local.stages.discrimination import judge
from lion_local.stages.imitation import training_examples
from lion_local.stages.judging import current_reviews, pending_reviews, referee_fingerprint

logger = logging.getLogger(__name__)

TRAIN_MESSAGES = "train.messages.jsonl"
TRAIN_ALPACA = "train.alpaca.json"
CACHE_JUDGEMENTS = "cache_pool.judgements.jsonl"
SUMMARY = "export.json"
HF_FOLDER = "hf"
FORMATS = {"messages": (TRAIN_MESSAGES,), "alpaca": (TRAIN_ALPACA,), "all": (TRAIN_MESSAGES, TRAIN_ALPACA)}
PROVENANCE = ("id", "origin", "parent", "iteration", "trained_in")
PENDING = "pending"  # the label of a Cache Pool instruction still under review (--partial only)


@dataclass
class StageExport:
    """The rows one stage contributes, and what was left out of them."""

    stage: Stage
    finished: bool
    rows: list[dict]
    counts: dict = field(default_factory=dict)


@dataclass
class RunExport:
    run: RunDir
    fingerprint: str
    stages: list[StageExport]
    left_out: list[Stage]

    def rows(self, name: str) -> list[dict]:
        return [row for each in self.stages if each.stage.name == name for row in each.rows]


# ----------------------------------------------------------------------------------------------
# Which stages (pure reading)
# ----------------------------------------------------------------------------------------------


def check_out_dir(run: RunDir, out: Path) -> Path:
    """The resolved output folder; refused inside the run directory or where a file is."""
    try:
        root, resolved = run.root.resolve(), out.resolve()
    except (OSError, RuntimeError) as exc:  # Python 3.11 raises RuntimeError for a symlink loop
        raise InputError(f"--out {out}: cannot resolve the path ({exc}); give another --out") from None
    if resolved == root or resolved.is_relative_to(root):
        raise InputError(f"--out {out}: inside the run directory {run.root}; export to a folder outside it")
    if resolved.exists() and not resolved.is_dir():
        raise InputError(f"--out {out}: a file is there; give a folder (created if missing)")
    check_dir_path(resolved, "--out")  # no part of it is a file: found before anything is read
    return resolved


def stages_on_disk(run: RunDir) -> list[Stage]:
    """The imitation and discrimination stages whose files exist, finished or not, in run order."""
    found = []
    for iteration in [*run.numbered_iterations(), *([run.final.iteration] if run.final.exists() else [])]:
        directory = run.at(iteration)
        if directory.train_pool.exists():
            found.append(iteration.stage("imitation"))
        if not iteration.is_final and (directory.judgements.exists() or directory.reviews.exists()):
            found.append(iteration.stage("discrimination"))
    return found


def select_stages(run: RunDir, partial: bool) -> tuple[list[tuple[Stage, bool]], list[Stage]]:
    """([(stage, finished)] to export, the unfinished stages left out), in run order."""
    finished = {stage for stage in completed_stages(run) if stage.name != "generation"}
    candidates = sorted({*stages_on_disk(run), *finished}, key=lambda s: (s.iteration.sort_key, s.name != "imitation"))
    included = [(stage, stage in finished) for stage in candidates if partial or stage in finished]
    left_out = [stage for stage in candidates if not partial and stage not in finished]
    if not included:
        raise StageOrderError(
            f"{run.root}: no finished imitation or discrimination stage to export yet (lion-local status "
            "shows where the run stands; --partial exports the files of unfinished stages as they are)"
        )
    return included, left_out


def _records(path: Path, stage: Stage, finished: bool) -> list[dict]:
    if finished and not path.exists():
        raise InputError(f"{path}: missing, although state.json records {stage} as finished; restore it")
    return read_jsonl(path)


# ----------------------------------------------------------------------------------------------
# The rows (pure: values in, values out)
# ----------------------------------------------------------------------------------------------


def train_stage(
    config: Config, stage: Stage, finished: bool, pool: list[InstructionRecord], answers: dict[str, TeacherAnswer]
) -> StageExport:
    """An imitation's rows: its Train Pool with the teacher's answers, as the stage trained on them."""
    answered = [record for record in pool if record["id"] in answers]
    missing = len(pool) - len(answered)
    if finished and missing:
        raise InputError(
            f"{stage}: {missing} of its {len(pool)} instructions have no teacher answer of this config's "
            "teacher fingerprint in teacher_answers.jsonl, so the config's teacher settings differ from "
            "the run's; export with the run's own config (--config <run_dir>/config.yaml)"
        )
    # The stage's own rule decides which instructions it trained on.
    kept = {example["id"] for example in training_examples(config, answered, answers, eos_token="")}
    rows = [train_row(record, answers[record["id"]]["answer"], stage) for record in answered if record["id"] in kept]
    counts = {"train_pool": len(pool), "empty_teacher_answers": len(answered) - len(rows), "unanswered": missing}
    return StageExport(stage, finished, rows, counts)


def train_row(record: InstructionRecord, answer: str, stage: Stage) -> dict:
    return {
        "id": record["id"],
        "instruction": record["instruction"],
        "input": record["input"],
        "output": answer,
        "origin": record["origin"],
        "parent": record["parent"],
        "iteration": record["iteration"],
        "trained_in": str(stage),
    }


def messages_row(row: dict) -> dict:
    """A chat row: the student's chat prompt as the user turn, the teacher's answer as the reply."""
    messages = student_chat_messages(row["instruction"], row["input"])
    return {"messages": [*messages, {"role": "assistant", "content": row["output"]}], **_provenance(row)}


def alpaca_row(row: dict) -> dict:
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"], **_provenance(row)}


def _provenance(row: dict) -> dict:
    return {key: row[key] for key in PROVENANCE}


def cache_stage(
    stage: Stage, finished: bool, pool: list[InstructionRecord], judgements: list[Judgement], pending: set[str]
) -> StageExport:
    """A discrimination's rows: each Cache Pool instruction with its judgement ("pending" while under review)."""
    judged = by_id(judgements)
    rows = []
    for record in pool:
        judgement = judged.get(record["id"]) if record["id"] not in pending else None
        rows.append(cache_row(record, judgement, stage.iteration))
    labels = Counter(row["label"] for row in rows)
    return StageExport(stage, finished, rows, {"cache_pool": len(pool), "labels": dict(sorted(labels.items()))})


def cache_row(record: InstructionRecord, judgement: Judgement | None, iteration: Iteration) -> dict:
    judgement = judgement or {"teacher_score": None, "student_score": None, "gap": None, "label": PENDING}
    row = {
        "id": record["id"],
        "instruction": record["instruction"],
        "input": record["input"],
        "origin": record["origin"],
        "parent": record["parent"],
        "iteration_added": record["iteration"],
        "iteration": iteration.json_value,
        **{key: judgement.get(key) for key in ("teacher_score", "student_score", "gap", "label")},
    }
    if "position_consistent" in judgement:
        row["position_consistent"] = judgement["position_consistent"]
    return row


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------


def build_export(config: Config, partial: bool = False) -> RunExport:
    """Every row of the stages to export, read from the run's files; writes nothing."""
    run = RunDir(config.run_dir)
    included, left_out = select_stages(run, partial)
    if left_out:
        logger.info(
            "%s: left out %d unfinished stage(s): %s (--partial includes their files as they are)",
            run.root, len(left_out), ", ".join(map(str, left_out)),
        )
    fingerprint = teacher_fingerprint(config)
    answers: dict[str, TeacherAnswer] = {r["id"]: r for r in read_jsonl(run.teacher_answers) if r.get("fingerprint") == fingerprint}
    stages = []
    for stage, finished in included:
        directory = run.at(stage.iteration)
        if stage.name == "imitation":
            stages.append(train_stage(config, stage, finished, _records(directory.train_pool, stage, finished), answers))
        else:
            stages.append(_discrimination(config, run, stage, finished))
    return RunExport(run, fingerprint, stages, left_out)


def _discrimination(config: Config, run: RunDir, stage: Stage, finished: bool) -> StageExport:
    directory = run.at(stage.iteration)
    pool = _records(directory.cache_pool, stage, finished)
    if finished or directory.judgements.exists():
        return cache_stage(stage, finished, pool, _records(directory.judgements, stage, finished), set())
    # Under way: the stage's own judge over the reviews so far; those still due are pending.
    reviews = current_reviews(read_jsonl(directory.reviews), "referee", referee_fingerprint(config, config.roles.referee.server))
    ids = [record["id"] for record in pool]
    pending = {pair_id for pair_id, _, _ in pending_reviews(ids, reviews, config.roles.referee.parse_retries)}
    return cache_stage(stage, finished, pool, judge(pool, reviews, config.discrimination.tau), pending)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def summary(export: RunExport, out: Path, data_format: str, hf: bool) -> dict:
    """export.json: counts per file, stage and iteration, the run, the stages and the formats."""
    train, cache = export.rows("imitation"), export.rows("discrimination")
    files = {name: len(train) for name in FORMATS[data_format]} | {CACHE_JUDGEMENTS: len(cache)}
    if hf:
        files |= {f"{HF_FOLDER}/train": len(train), f"{HF_FOLDER}/cache_pool": len(cache)}
    return {
        "run_dir": str(export.run.root),
        "out": str(out),
        "formats": [name for name in ("messages", "alpaca") if data_format in (name, "all")],
        "hf": hf,
        "teacher_fingerprint": export.fingerprint,
        "partial": any(not each.finished for each in export.stages),
        "files": files,
        "train_by_iteration": _by_iteration(export, "imitation"),
        "cache_pool_by_iteration": _by_iteration(export, "discrimination"),
        "stages": [
            {"stage": str(each.stage), "partial": not each.finished, "rows": len(each.rows), **each.counts}
            for each in export.stages
        ],
        "left_out": [str(stage) for stage in export.left_out],
    }


def _by_iteration(export: RunExport, name: str) -> dict[str, int]:
    return {str(each.stage.iteration): len(each.rows) for each in export.stages if each.stage.name == name}


def write_export(export: RunExport, out: Path, data_format: str, hf: bool) -> dict:
    """Write the export's files under `out`, each atomically and export.json last; return export.json."""
    train, cache = export.rows("imitation"), export.rows("discrimination")
    result = summary(export, out, data_format, hf)
    if hf:
        save_hf(out / HF_FOLDER, train, cache)
    if TRAIN_MESSAGES in FORMATS[data_format]:
        write_jsonl_atomic(out / TRAIN_MESSAGES, [messages_row(row) for row in train])
    if TRAIN_ALPACA in FORMATS[data_format]:
        write_atomic(out / TRAIN_ALPACA, json.dumps([alpaca_row(row) for row in train], indent=1, ensure_ascii=False) + "\n")
    write_jsonl_atomic(out / CACHE_JUDGEMENTS, cache)
    write_atomic(out / SUMMARY, json.dumps(result, indent=2) + "\n")
    return result


def save_hf(folder: Path, train: list[dict], cache: list[dict]) -> None:
    """A DatasetDict ("train": the rows with both forms, "cache_pool") saved beside, then renamed into place."""
    import datasets

    train_rows = [{**row, "messages": messages_row(row)["messages"]} for row in train]
    cache_rows = [{**row, "position_consistent": row.get("position_consistent")} for row in cache]  # a column for all
    temporary, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for leftover in (temporary, old):
        shutil.rmtree(leftover, ignore_errors=True)
    splits = {"train": datasets.Dataset.from_list(train_rows), "cache_pool": datasets.Dataset.from_list(cache_rows)}
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per split would drown the command's own lines
    try:
        datasets.DatasetDict(splits).save_to_disk(str(temporary))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if folder.exists():
        folder.rename(old)
    temporary.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def export_run(config: Config, out: Path, data_format: str = "all", hf: bool = False, partial: bool = False) -> dict:
    """Read, check, then write the export of config.run_dir under `out`; return export.json."""
    if data_format not in FORMATS:
        raise InputError(f"--format {data_format}: choose one of {', '.join(FORMATS)}")
    folder = check_out_dir(RunDir(config.run_dir), out)
    export = build_export(config, partial)
    if hf:
        _require_datasets()
    writable_dir(folder, "--out")  # made and proven writable, or one line, before the first file
    return write_export(export, folder, data_format, hf)


def _require_datasets() -> None:
    if importlib.util.find_spec("datasets") is None:
        raise InputError("--hf needs the datasets package (pip install datasets); export without --hf, or install it")


def summary_lines(result: dict) -> list[str]:
    """What the command prints: one line per file written, then the stages."""
    lines = [f"{result['out']}/{name}: {rows} rows" for name, rows in result["files"].items()]
    stages = ", ".join(each["stage"] + (" (partial)" if each["partial"] else "") for each in result["stages"])
    lines.append(f"stages: {stages}" + (f"; left out unfinished: {', '.join(result['left_out'])}" if result["left_out"] else ""))
    lines.append(f"wrote {result['out']}/{SUMMARY}")
    return lines
