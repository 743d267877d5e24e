"""`lion-local compare` on run directories written here by hand, as tests/test_run_report.py does.

- three arms of one teacher and one seed file (referee seed 1, likelihood seed 2, none seed 1),
  unfinished to different depths: the table's numbers, compare.json, compare.md and the plots;
- refusals, each one line with exit 2 and nothing written: fewer than 2 runs, a folder that is
  not a run, a run given twice, --out inside a run, other seed data, another teacher;
- runs not evaluated yet: no nll.png, and the log says why.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.commands.compare import hard_shares, mismatch, teacher_settings

SEED_IDS = [f"seed{i:02d}" for i in range(8)]
TEACHER = {
    "roles.teacher.server": "teacher", "roles.teacher.temperature": 0.7, "roles.teacher.max_tokens": 64,
    "servers.teacher.model": "/models/tiny/teacher", "servers.teacher.engine": "vllm",
    "servers.teacher.vllm.dtype": "float32", "prompts.teacher.txt": "{{ instruction }}",
}


def _usage(calls: int) -> dict:
    return {"calls": calls, "prompt_tokens": 10 * calls, "completion_tokens": 5 * calls, "seconds": 0.1 * calls}


def _iteration_report(k: int, cache: int, hard: int, easy: int, accuracy: float | None) -> dict:
    return {
        "iteration": k,
        "pools": {"train": 8, "cache": cache, "generated": 4},
        "imitation": {"examples": 8, "train_pool": 8},
        "roles": {
            "teacher": {**_usage(8), "by_stage": {"imitation": _usage(8), "discrimination": _usage(0)}},
            "student": _usage(cache), "referee": _usage(2 * cache), "generator": _usage(3),
        },
        "labels": {"hard": hard, "easy": easy, "unjudged": cache - hard - easy},
        "discrimination": {"hard": hard, "easy": easy},
        "referee_check": None if accuracy is None else {"pairs": 4, "accuracy": accuracy},
    }


def _final_report() -> dict:
    return {"iteration": "final", "pools": {"train": 4}, "imitation": {"examples": 4, "train_pool": 4},
            "roles": {"teacher": {**_usage(4), "by_stage": {"imitation": _usage(4), "discrimination": _usage(0)}}}}


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _run(root: Path, seed: int, signal: str | None, reports: list[dict], final: bool = False,
         evaluations: dict | None = None, seed_ids: list[str] = SEED_IDS, teacher: dict | None = None) -> Path:
    """A run directory: state.json, identity.json, the seed Cache Pool, report.json per iteration, eval results."""
    completed = [f"{r['iteration']}/{stage}" for r in reports for stage in ("imitation", "discrimination", "generation")]
    _write(root / "state.json", {"iteration": len(reports), "completed": completed + ["final/imitation"] * final,
                                 "stage_seconds": {}})
    settings = {"seed": seed, **(teacher or TEACHER), "servers.student.model": "/models/tiny/student",
                "discrimination.tau": 1.0}
    if signal is not None:  # older runs record no signal: the referee
        settings["discrimination.signal"] = signal
    _write(root / "identity.json", {"settings": settings, "accepted_changes": []})
    (root / "iter_1").mkdir(parents=True, exist_ok=True)
    (root / "iter_1/cache_pool.jsonl").write_text("".join(json.dumps({"id": i, "instruction": i}) + "\n" for i in seed_ids))
    for report in reports:
        _write(root / f"iter_{report['iteration']}/report.json", report)
    if final:
        _write(root / "final/report.json", _final_report())
    for checkpoint, (iteration, score, questions, held_out) in (evaluations or {}).items():
        result = {"checkpoint": checkpoint, "iteration": iteration,
                  "likelihood": {"questions": {"mean_nll": questions, "tokens": 100, "answers": 10},
                                 "held_out": {"mean_nll": held_out, "tokens": 50, "answers": 5}}}
        _write(root / "eval" / checkpoint / "result.json", result | ({} if score is None else {"relative_score": score}))
    return root


@pytest.fixture
def arms(tmp_path: Path) -> list[Path]:
    """arm-a: referee (no signal recorded), 2 iterations and the final imitation, evaluated throughout;
    arm-b: likelihood, 2 iterations, the initial student and iteration 1 evaluated;
    arm-c: signal none (nothing labelled hard), 1 iteration, not evaluated."""
    a = _run(tmp_path / "arm-a", 1, None,
             [_iteration_report(1, 8, 2, 5, 0.75), _iteration_report(2, 12, 3, 9, 1.0)], final=True,
             evaluations={"initial": ("initial", None, 3.0, 3.2), "iter_1": (1, 60.0, 2.5, 2.75),
                          "iter_2": (2, 70.0, 2.25, 2.5), "final": ("final", 75.5, 2.0, 2.25)})
    b = _run(tmp_path / "arm-b", 2, "likelihood",
             [_iteration_report(1, 8, 4, 4, None), _iteration_report(2, 12, 6, 6, None)],
             evaluations={"initial": ("initial", None, 3.0, 3.2), "iter_1": (1, 65.0, 2.4, None)})
    c = _run(tmp_path / "arm-c", 1, "none", [_iteration_report(1, 8, 0, 0, None)])
    _write(c / "iter_1/report.json", {**_iteration_report(1, 8, 0, 0, None), "labels": {"hard": 0, "easy": 0, "unjudged": 0}})
    return [a, b, c]


def _cells(line: str) -> list[str]:
    """A line of the printed table, split where its columns are (two spaces or more)."""
    return re.split(r"\s{2,}", line.strip())


def _table(output: str) -> dict[str, list[str]]:
    """The printed table as {row label: its cells}, from the lines between the header and the last line."""
    return {cells[0]: cells[1:] for cells in map(_cells, output.splitlines()[1:-1])}


def test_table_json_markdown_and_plots(arms: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "compare"  # made with its parents
    result = CliRunner().invoke(main, ["compare", *map(str, arms), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert _cells(lines[0]) == ["arm-a (referee, seed 1)", "arm-b (likelihood, seed 2)", "arm-c (none, seed 1)"]
    assert lines[-1] == f"wrote compare.md, compare.json and 3 plots in {out}"
    table = _table(result.output)
    expected = {
        "signal": ["referee", "likelihood", "none"],
        "seed": ["1", "2", "1"],
        "iterations completed": ["2", "2", "1"],
        "final imitation": ["done", "no", "no"],
        "teacher answers used": ["20", "16", "8"],  # 8 per iteration, 4 in the final imitation
        "training examples": ["20", "16", "8"],
        "hard share, iter 1": ["0.250", "0.500", "-"],  # labels.hard / pools.cache; none labels nothing
        "hard share, iter 2": ["0.250", "0.500", "-"],
        "control accuracy, iter 1": ["0.750", "-", "-"],
        "control accuracy, iter 2": ["1.000", "-", "-"],
        "NLL questions, initial": ["3.000", "3.000", "-"],
        "NLL questions, iter 1": ["2.500", "2.400", "-"],
        "NLL questions, final": ["2.000", "-", "-"],
        "NLL held-out, iter 1": ["2.750", "-", "-"],
        "student / teacher %, iter 1": ["60.0", "65.0", "-"],
        "student / teacher %, final": ["75.5", "-", "-"],
        "teacher calls": ["20", "16", "8"],
        "student calls": ["20", "20", "8"],
        "referee prompt tokens": ["400", "400", "160"],
        "generator completion tokens": ["30", "30", "15"],
    }
    for row, cells in expected.items():
        assert table[row] == cells, row
    assert "student / teacher %, initial" not in table  # no run has a number there

    data = json.loads((out / "compare.json").read_text())
    assert [run["column"] for run in data["runs"]] == _cells(lines[0])
    rows = {row["row"]: row["values"] for row in data["rows"]}
    assert rows["hard share, iter 1"] == [0.25, 0.5, None]
    assert rows["NLL held-out, final"] == [2.25, None, None]
    assert list(rows) == list(table)  # the same rows as the table

    markdown = (out / "compare.md").read_text()
    assert "|  | arm-a (referee, seed 1) | arm-b (likelihood, seed 2) | arm-c (none, seed 1) |" in markdown
    assert "| hard share, iter 1 | 0.250 | 0.500 | - |" in markdown
    for name in ("nll", "hard_share", "cost"):
        assert f"![{name}](plots/{name}.png)" in markdown
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_json_flag_prints_what_compare_json_holds(arms: list[Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compare", *map(str, arms[:2]), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads((tmp_path / "out/compare.json").read_text())


def test_without_evaluations_nll_png_is_left_out(arms: list[Path], tmp_path: Path, caplog) -> None:
    other = _run(tmp_path / "arm-d", 3, "referee", [_iteration_report(1, 8, 1, 7, 0.5)])
    with caplog.at_level(logging.INFO, logger="lion_local.commands.compare_plots"):
        result = CliRunner().invoke(main, ["compare", str(arms[2]), str(other), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out/plots").iterdir()) == ["cost.png", "hard_share.png"]
    assert "nll.png left out: no run has likelihood results yet" in caplog.text
    assert not any(line.startswith("NLL") for line in result.output.splitlines())
    assert "No run has evaluation results yet" in (tmp_path / "out/compare.md").read_text()


def test_same_folder_names_get_their_parent(tmp_path: Path) -> None:
    runs = [_run(tmp_path / name / "run", 1, None, [_iteration_report(1, 8, 2, 6, None)]) for name in ("c1", "c2")]
    result = CliRunner().invoke(main, ["compare", *map(str, runs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert _cells(result.output.splitlines()[0]) == ["c1/run (referee, seed 1)", "c2/run (referee, seed 1)"]


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1
    return result.output.strip()


def test_refusals_are_one_line_and_write_nothing(arms: list[Path], tmp_path: Path) -> None:
    a, b, _ = map(str, arms)
    out = tmp_path / "out"
    assert _refused([a, "--out", str(out)]) == (
        f"error: compare needs at least 2 run directories (got only {a}); give two or more RUN_DIRs")
    assert _refused([a, str(tmp_path), "--out", str(out)]) == (
        f"error: {tmp_path}: not a run directory (no state.json); give the run_dir of a run lion-local has started")
    assert _refused([a, b, a, "--out", str(out)]) == f"error: {a}: given twice; give each run directory once"
    assert _refused([a, b, "--out", f"{b}/cmp"]) == (
        f"error: --out {b}/cmp: inside the run directory {b}; compare reads runs only: give a folder outside every run")
    assert not out.exists() and not Path(b, "cmp").exists()
    missing = CliRunner().invoke(main, ["compare", "--out", str(out)])
    assert missing.exit_code == 2 and "Missing argument 'RUN_DIRS...'" in missing.output  # click's own


def test_other_seed_data_is_refused(arms: list[Path], tmp_path: Path) -> None:
    other = _run(tmp_path / "other", 1, None, [_iteration_report(1, 8, 2, 6, None)], seed_ids=SEED_IDS[:6] + ["x"])
    assert _refused([str(arms[0]), str(other), "--out", str(tmp_path / "out")]) == (
        f"error: {arms[0]} and {other} started from different seed data: 3 seed instructions differ "
        "(of 8 and 7 in iter_1/cache_pool.jsonl); compare runs made from the same seed file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, named", [
    ({"servers.teacher.model": "/models/" + "x" * 60},  # values shown up to 40 characters
     'servers.teacher.model is "/models/tiny/teacher" and "/models/' + "x" * 28 + "..."),
    ({"roles.teacher.temperature": 1.0}, "roles.teacher.temperature is 0.7 and 1.0"),
    ({"prompts.teacher.txt": "Answer: {{ instruction }}"},
     'prompts.teacher.txt is "{{ instruction }}" and "Answer: {{ instruction }}"'),
    ({"roles.teacher.server": "big"}, 'roles.teacher.server is "teacher" and "big"'),
])
def test_another_teacher_is_refused(arms: list[Path], tmp_path: Path, change: dict, named: str) -> None:
    other = _run(tmp_path / "other", 1, None, [_iteration_report(1, 8, 2, 6, None)], teacher={**TEACHER, **change})
    assert _refused([str(arms[0]), str(other), "--out", str(tmp_path / "out")]) == (
        f"error: {arms[0]} and {other} have different teachers: {named}; "
        "compare runs of the same teacher (only the seed and discrimination.* may differ)")


def test_a_dropped_teacher_key_is_named_unset() -> None:
    first = {"path": "a", "seed_ids": SEED_IDS, "settings": TEACHER}
    dropped = {key: value for key, value in TEACHER.items() if key != "servers.teacher.engine"}
    other = {"path": "b", "seed_ids": SEED_IDS, "settings": dropped}
    assert mismatch(first, other) == ('a and b have different teachers: servers.teacher.engine is "vllm" and (unset); '
                                      "compare runs of the same teacher (only the seed and discrimination.* may differ)")


def test_teacher_settings_leave_out_other_servers_and_the_seed() -> None:
    settings = {**TEACHER, "seed": 3, "servers.student.model": "s", "roles.referee.temperature": 0.2,
                "discrimination.signal": "likelihood", "prompts.teacher_extra.txt": "not the teacher's"}
    assert teacher_settings(settings) == TEACHER


def test_hard_share_is_none_without_labels() -> None:
    run = {"reports": {"1": {"labels": {"hard": 0, "easy": 0, "unjudged": 0}, "pools": {"cache": 8}},
                       "2": {"labels": {"hard": 0, "easy": 6, "unjudged": 2}, "pools": {"cache": 8}},
                       "3": {"pools": {"cache": 8}}, "final": {}}}
    assert hard_shares(run) == {1: None, 2: 0.0, 3: None}


def test_a_run_without_identity_is_refused(arms: list[Path], tmp_path: Path) -> None:
    (arms[1] / "identity.json").unlink()
    assert _refused([str(arms[0]), str(arms[1]), "--out", str(tmp_path / "out")]) == (
        f"error: {arms[1]}: no identity.json, so its teacher cannot be checked; "
        "compare only runs lion-local made (it writes identity.json when a run starts)")
