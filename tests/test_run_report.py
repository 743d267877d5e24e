"""`lion-local report` on run directories written here by hand (the real end-to-end run's report is
checked against its journals in tests/test_loop_integration.py).

- a run with nothing to report yet: one line, exit 2, nothing written;
- an iteration whose generation is missing and a final imitation: the table leaves blanks ("-");
- evaluation results (eval/<checkpoint>/result.json, as `lion-local evaluate` writes them): the
  relative score per checkpoint in the table, the evaluation section of report.md with its
  per-category columns, and evaluation.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from lion_local.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _usage(calls: int) -> dict:
    return {"calls": calls, "prompt_tokens": 10 * calls, "completion_tokens": 5 * calls, "seconds": 0.1 * calls}


def _iteration_report(k: int, cache: int, hard: int, easy: int) -> dict:
    gaps = [{"from": low, "to": low + 1, "count": hard if low == 2 else easy if low == 0 else 0} for low in range(-9, 9)]
    return {
        "iteration": k,
        "pools": {"train": 4, "cache": cache, "generated": 2, "next_train": 2, "next_cache": cache + 2},
        "imitation": {},
        "roles": {
            "teacher": {**_usage(4), "by_stage": {"imitation": _usage(4), "discrimination": _usage(0)}},
            "student": _usage(cache), "referee": _usage(2 * cache), "generator": _usage(3),
        },
        "stage_seconds": {f"{k}/imitation": 1.0, f"{k}/discrimination": 2.0, f"{k}/generation": 0.5},
        "labels": {"hard": hard, "easy": easy, "unjudged": cache - hard - easy},
        "scores": {"mean_teacher": 7.0, "mean_student": 6.0 + k / 4, "mean_gap": 1.0 - k / 4, "gap_histogram": gaps},
        "generation": {
            "accepted": {"hard": 1, "easy": 1, "total": 2}, "rejected": {"too_similar": 1}, "rejected_total": 1,
            "shortfall": {"hard": 0, "easy": 0, "total": 0},
        },
    }


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_nothing_to_report_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", "--config", str(_config(tmp_path))])
    assert result.exit_code == 3  # asked before any iteration finished
    assert result.output.splitlines() == [
        f"error: {tmp_path / 'run'}: nothing to report yet; an iteration's report.json is written when its "
        "generation stage ends (lion-local status shows where the run stands)"
    ]
    assert not (tmp_path / "run").exists()


def test_report_with_evaluations_per_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run = tmp_path / "run"
    _write(run / "state.json", {"iteration": 2, "completed": ["1/imitation", "1/discrimination", "1/generation"],
                                "stage_seconds": {}})
    _write(run / "iter_1/report.json", _iteration_report(1, cache=6, hard=2, easy=3))
    _write(run / "iter_2/report.json", _iteration_report(2, cache=8, hard=1, easy=7))
    final = {"iteration": "final", "pools": {"train": 2}, "imitation": {},
             "roles": {"teacher": {**_usage(2), "by_stage": {"imitation": _usage(2), "discrimination": _usage(0)}}},
             "stage_seconds": {"final/imitation": 1.5}}
    _write(run / "final/report.json", final)
    for checkpoint, iteration, score in (("iter_1", 1, 61.25), ("iter_2", 2, 70.5), ("final", "final", 74.0)):
        _write(run / "eval" / checkpoint / "result.json", {
            "checkpoint": checkpoint, "iteration": iteration, "judge": "teacher", "questions": 10, "judged": 9,
            "excluded_questions": 1, "unparseable_judgements": 2, "teacher_total": 63.0,
            "student_total": round(63.0 * score / 100, 4), "relative_score": score,
            "by_category": {"math": {"questions": 4, "judged": 4, "teacher_total": 28.0, "student_total": 14.0,
                                     "relative_score": 50.0}},
        })

    result = CliRunner().invoke(main, ["report", "--config", str(config)])
    assert result.exit_code == 0, result.output
    table = {line.split("  ")[0].strip(): line.split()[-3:] for line in result.output.splitlines()[1:-1]}
    assert table["Cache Pool"] == ["6", "8", "-"]
    assert table["hard"] == ["2", "1", "-"]
    assert table["unjudged"] == ["1", "0", "-"]
    assert table["student / teacher %"] == ["61.2", "70.5", "74.0"]  # Python rounds 61.25 half to even
    assert table["teacher calls (imitation)"] == ["4", "4", "2"]
    assert table["stage seconds"] == ["3.5", "3.5", "1.5"]

    markdown = (run / "report.md").read_text()
    assert ("| checkpoint | student / teacher % | judged | excluded questions | unparseable judgements | NLL (questions) "
            "| NLL (held-out seeds) | teacher NLL (questions) | math % |") in markdown
    assert "| final | 74.0 | 9/10 | 1 | 2 | - | - | - | 50.0 |" in markdown
    plots = sorted(path.name for path in (run / "plots").glob("*.png"))
    assert plots == ["cost.png", "evaluation.png", "gaps.png", "generation.png", "labels.png", "pools.png", "scores.png"]
    assert "![evaluation](plots/evaluation.png)" in markdown
