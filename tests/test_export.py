"""`lion-local export`: the training data and the judged Cache Pools of a run, in files of their own.

Run directories are built here in the real stage formats (pools through records.pools_for,
judgements through discrimination.judge, teacher answers with the config's teacher fingerprint),
so nothing depends on a run of the demo existing; tests/test_loop_integration.py exports a real one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.commands.export import (
    CACHE_JUDGEMENTS,
    HF_FOLDER,
    SUMMARY,
    TRAIN_ALPACA,
    TRAIN_MESSAGES,
    export_run,
)
from lion_local.config import Config, load_config
from lion_local.stages.judging import referee_fingerprint
from lion_local.errors import InputError, StageOrderError
from lion_local.roles.student import student_chat_messages
from lion_local.run.layout import FINAL, Iteration, RunDir
from lion_local.run.records import instruction_record, pools_for
from lion_local.run.seed_data import load_seed_instructions
from lion_local.run.state import read_jsonl, write_atomic, write_jsonl_atomic
from lion_local.stages.teacher_answers import teacher_fingerprint
from lion_local.stages.discrimination import judge

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tiny-cpu.yaml"
ALL_STAGES = ["1/imitation", "1/discrimination", "1/generation", "2/imitation", "2/discrimination", "2/generation",
              "final/imitation"]
EMPTY_EVERY = 7  # every 7th teacher answer is empty
UNREADABLE = 2  # the first Cache Pool instructions of each discrimination stay unjudged
GENERATED = 6  # instructions generated per iteration


def _overrides(tmp_path: Path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"seed_data={ROOT / 'lion_local/data/smoke_seed.jsonl'}", "seed_limit=12"]


def _config(tmp_path: Path) -> Config:
    return load_config(CONFIG, _overrides(tmp_path))


def _cli(tmp_path: Path, *args: str):
    sets = [x for o in _overrides(tmp_path) for x in ("--set", o)]
    return CliRunner().invoke(main, ["export", "--config", str(CONFIG), *sets, *args])


def _fake_run(config: Config, completed: list[str], under_way: int = 0) -> RunDir:
    """What the stages in `completed` write; the next stage has `under_way` of its calls journaled."""
    run = RunDir(config.run_dir)
    fingerprint = teacher_fingerprint(config)
    teacher: list[dict] = []

    def ask_teacher(records: list[dict], marker: str, limit: int | None = None) -> None:
        asked = {answer["id"] for answer in teacher}
        for record in [r for r in records if r["id"] not in asked][:limit]:
            empty = len(teacher) % EMPTY_EVERY == 3
            # A line of another fingerprint (an older teacher setting) is never used.
            teacher.append({"id": record["id"], "answer": "stale", "empty": False, "fingerprint": "other"})
            teacher.append({"id": record["id"], "answer": "" if empty else f"answer to {record['instruction']}",
                            "empty": empty, "fingerprint": fingerprint, "stage": marker})

    referee = referee_fingerprint(config, config.roles.referee.server)

    def reviews_of(cache: list[dict], limit: int | None = None) -> list[dict]:
        reviews = []
        for index, record in enumerate(cache[:limit]):
            for order in ("teacher_first", "student_first"):
                # Odd ones are hard: the teacher scores 8, the student 5, in either order.
                scores = None if index < UNREADABLE else ([8.0, 5.0] if index % 2 else [6.0, 6.0])
                scores = scores[::-1] if scores and order == "student_first" else scores
                reviews += [{"id": record["id"], "order": order, "attempt": attempt, "scores": scores, "referee": referee}
                            for attempt in range(1 + (scores is None) * config.roles.referee.parse_retries)]
        return reviews

    for k in (1, 2):
        directory = run.iteration(k)
        train, cache = pools_for(config, run, Iteration(k))
        if f"{k}/imitation" not in completed:
            ask_teacher(train, f"{k}/imitation", under_way)
            break
        ask_teacher(train, f"{k}/imitation")
        if f"{k}/discrimination" not in completed:
            write_jsonl_atomic(directory.reviews, reviews_of(cache, under_way))
            break
        write_jsonl_atomic(directory.reviews, reviews_of(cache))
        write_jsonl_atomic(directory.judgements, judge(cache, reviews_of(cache), config.discrimination.tau))
        if f"{k}/generation" not in completed:
            break
        generated = [instruction_record(f"Generated task {i} of iteration {k}", "", ("hard", "easy")[i % 2], k,
                                        cache[i]["id"]) for i in range(GENERATED)]
        write_jsonl_atomic(directory.generated, generated)
    if "final/imitation" in completed:
        ask_teacher(pools_for(config, run, FINAL)[0], "final/imitation")
    write_jsonl_atomic(run.teacher_answers, teacher)
    write_atomic(run.state_json, json.dumps({"iteration": 1, "completed": completed, "stage_seconds": {}}) + "\n")
    return run


def _answers(run: RunDir, config: Config) -> dict[str, dict]:
    fingerprint = teacher_fingerprint(config)
    return {r["id"]: r for r in read_jsonl(run.teacher_answers) if r["fingerprint"] == fingerprint}


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------------------------
# A finished run
# ----------------------------------------------------------------------------------------------


def test_export_counts_and_provenance_match_the_journals(tmp_path):
    config = _config(tmp_path)
    run = _fake_run(config, ALL_STAGES)
    result = export_run(config, tmp_path / "export")
    out = tmp_path / "export"
    answers = _answers(run, config)
    messages = read_jsonl(out / TRAIN_MESSAGES)
    alpaca = json.loads((out / TRAIN_ALPACA).read_text())
    assert len(messages) == len(alpaca) == result["files"][TRAIN_MESSAGES]
    for iteration, trained_in in ((Iteration(1), "1/imitation"), (Iteration(2), "2/imitation"), (FINAL, "final/imitation")):
        pool = read_jsonl(run.at(iteration).train_pool)
        kept = [r for r in pool if not answers[r["id"]]["empty"]]
        assert len(kept) < len(pool) or trained_in == "final/imitation"  # some answers were empty
        rows = [row for row in messages if row["trained_in"] == trained_in]
        assert [row["id"] for row in rows] == [r["id"] for r in kept]
        assert result["train_by_iteration"][str(iteration)] == len(kept)
        for row, record in zip(rows, kept):
            assert {k: row[k] for k in ("origin", "parent", "iteration")} == {
                k: record[k] for k in ("origin", "parent", "iteration")}
            assert row["messages"] == [*student_chat_messages(record["instruction"], record["input"]),
                                       {"role": "assistant", "content": answers[record["id"]]["answer"]}]
    assert {row["origin"] for row in messages} == {"seed", "hard", "easy"}
    assert all(row["output"] != "stale" and set(row) >= {"instruction", "input", "trained_in", "parent"} for row in alpaca)

    cache = read_jsonl(out / CACHE_JUDGEMENTS)
    for k in (1, 2):
        pool, judgements = read_jsonl(run.iteration(k).cache_pool), read_jsonl(run.iteration(k).judgements)
        rows = [row for row in cache if row["iteration"] == k]
        assert [row["id"] for row in rows] == [r["id"] for r in pool] and result["cache_pool_by_iteration"][str(k)] == len(pool)
        assert [row["label"] for row in rows] == [j["label"] for j in judgements]
        assert [row["gap"] for row in rows] == [j["gap"] for j in judgements]
        assert [row["iteration_added"] for row in rows] == [r["iteration"] for r in pool]
        assert all(("position_consistent" in row) == (row["label"] != "unjudged") for row in rows)
    assert {row["label"] for row in cache} == {"hard", "easy", "unjudged"}
    assert json.loads((out / SUMMARY).read_text()) == result
    assert not result["partial"] and result["left_out"] == [] and result["formats"] == ["messages", "alpaca"]
    assert [each["stage"] for each in result["stages"]] == [s for s in ALL_STAGES if "generation" not in s]
    # The Alpaca file reads back as a seed file, every row of it.
    assert len(load_seed_instructions(out / TRAIN_ALPACA)) == len(alpaca)


def test_exported_files_load_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    config = _config(tmp_path)
    _fake_run(config, ALL_STAGES)
    result = _cli(tmp_path, "--out", str(tmp_path / "export"), "--hf")
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    train_rows = len(read_jsonl(out / TRAIN_MESSAGES))
    cache_rows = len(read_jsonl(out / CACHE_JUDGEMENTS))
    loaded = datasets.load_dataset("json", data_files=str(out / TRAIN_MESSAGES), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == train_rows and loaded[0]["messages"][1]["role"] == "assistant"
    saved = datasets.load_from_disk(str(out / HF_FOLDER))
    assert set(saved) == {"train", "cache_pool"}
    assert saved["train"].num_rows == train_rows and saved["cache_pool"].num_rows == cache_rows
    assert {"messages", "instruction", "output", "trained_in"} <= set(saved["train"].column_names)
    assert "position_consistent" in saved["cache_pool"].column_names
    assert json.loads((out / SUMMARY).read_text())["files"][f"{HF_FOLDER}/train"] == train_rows


def test_format_picks_the_training_files(tmp_path):
    config = _config(tmp_path)
    _fake_run(config, ALL_STAGES)
    result = _cli(tmp_path, "--out", str(tmp_path / "export"), "--format", "alpaca")
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "export") == sorted([TRAIN_ALPACA, CACHE_JUDGEMENTS, SUMMARY])
    assert json.loads((tmp_path / "export" / SUMMARY).read_text())["formats"] == ["alpaca"]


# ----------------------------------------------------------------------------------------------
# Refusals: one line, the error's exit code, nothing written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["run", "run/exports/today"])
def test_out_inside_the_run_dir_is_refused(tmp_path, inside):
    config = _config(tmp_path)
    run = _fake_run(config, ALL_STAGES)
    before = _tree(run.root)
    result = _cli(tmp_path, "--out", str(tmp_path / inside))
    assert result.exit_code == InputError.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out")
    assert str(tmp_path / inside) in lines[0] and str(run.root) in lines[0]
    assert _tree(run.root) == before


def test_nothing_finished_is_refused_naming_the_run_dir(tmp_path):
    config = _config(tmp_path)
    run = _fake_run(config, [], under_way=3)
    result = _cli(tmp_path, "--out", str(tmp_path / "export"))
    assert result.exit_code == StageOrderError.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run.root) in lines[0]
    assert not (tmp_path / "export").exists()


def test_another_teacher_fingerprint_is_refused(tmp_path):
    _fake_run(_config(tmp_path), ALL_STAGES)
    result = _cli(tmp_path, "--out", str(tmp_path / "export"), "--set", "roles.teacher.temperature=0.123")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "1/imitation" in result.stderr
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------------------------
# An unfinished run
# ----------------------------------------------------------------------------------------------


def test_unfinished_stages_left_out_unless_partial(tmp_path, caplog):
    config = _config(tmp_path)
    # 2/imitation finished; 2/discrimination under way with 4 instructions reviewed.
    run = _fake_run(config, ALL_STAGES[:4], under_way=4)
    with caplog.at_level(logging.INFO, logger="lion_local.commands.export"):
        finished = export_run(config, tmp_path / "finished")
    left_out = [r.message for r in caplog.records if "left out" in r.message]
    assert len(left_out) == 1 and "2/discrimination" in left_out[0] and "--partial" in left_out[0]
    assert finished["left_out"] == ["2/discrimination"] and not finished["partial"]
    assert finished["cache_pool_by_iteration"] == {"1": len(read_jsonl(run.iteration(1).cache_pool))}
    assert {row["iteration"] for row in read_jsonl(tmp_path / "finished" / CACHE_JUDGEMENTS)} == {1}

    partial = export_run(config, tmp_path / "partial", partial=True)
    assert partial["partial"] and partial["left_out"] == []
    stage = {each["stage"]: each for each in partial["stages"]}["2/discrimination"]
    pool = read_jsonl(run.iteration(2).cache_pool)
    assert stage["partial"] and stage["rows"] == len(pool)
    assert stage["labels"] == {"easy": 1, "hard": 1, "pending": len(pool) - 4, "unjudged": UNREADABLE}
    assert not {each["stage"]: each for each in partial["stages"]}["2/imitation"]["partial"]


def test_partial_imitation_exports_the_answers_so_far(tmp_path):
    config = _config(tmp_path)
    run = _fake_run(config, ALL_STAGES[:3], under_way=4)  # 2/imitation: 4 teacher answers in
    assert _cli(tmp_path, "--out", str(tmp_path / "finished")).exit_code == 0
    trained = {row["trained_in"] for row in read_jsonl(tmp_path / "finished" / TRAIN_MESSAGES)}
    assert trained == {"1/imitation"}

    result = _cli(tmp_path, "--out", str(tmp_path / "partial"), "--partial")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "partial" / SUMMARY).read_text())
    stage = {each["stage"]: each for each in summary["stages"]}["2/imitation"]
    answers = _answers(run, config)
    pool = read_jsonl(run.iteration(2).train_pool)
    answered = [r for r in pool if r["id"] in answers]
    assert len(answered) == 4 and stage["partial"] and stage["unanswered"] == len(pool) - 4
    assert stage["rows"] == sum(1 for r in answered if not answers[r["id"]]["empty"])
    rows = [row for row in read_jsonl(tmp_path / "partial" / TRAIN_MESSAGES) if row["trained_in"] == "2/imitation"]
    assert len(rows) == stage["rows"] and summary["train_by_iteration"]["2"] == stage["rows"]
