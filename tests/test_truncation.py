"""Replies cut at max_tokens are counted, warned about above a share, and (as configured) left out of
training (lion_local/stages/truncation.py, lion_local/stages/imitation.py). The counts of a real run:
tests/test_real_model.py."""

from __future__ import annotations

import logging
from pathlib import Path

from lion_local.config import load_config
from lion_local.run.records import instruction_record
from lion_local.stages.imitation import training_examples
from lion_local.stages.truncation import truncated, truncation_warning, warn_truncated

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [instruction_record(f"Describe place number {i}.", "", "seed", 0, None) for i in range(4)]


def _answers(cut: set[int], empty: set[int] = frozenset()) -> dict[str, dict]:
    return {
        r["id"]: {"answer": "" if i in empty else f"answer {i}", "empty": i in empty,
                  "finish_reason": "length" if i in cut else "stop"}
        for i, r in enumerate(RECORDS)
    }


def test_the_warning_names_the_share_the_bound_and_the_key_to_raise():
    assert truncation_warning("1/imitation", "teacher", 1, 10, 0.1, "roles.teacher.max_tokens") is None
    line = truncation_warning("1/imitation", "teacher", 3, 10, 0.1, "roles.teacher.max_tokens")
    assert line == ("1/imitation: 3 of 10 teacher replies (30%) were cut at the length limit, more than "
                    "roles.teacher.warn_truncated_share 0.1; raise roles.teacher.max_tokens")
    assert truncation_warning("x", "generator", 0, 0, 0.1, "k") is None  # nothing asked, nothing to say


def test_counting_reads_the_journals_finish_reason(caplog):
    records = [{"finish_reason": "length"}, {"finish_reason": "stop"}, {"finish_reason": None}, {}]
    assert truncated(records) == 1
    with caplog.at_level(logging.WARNING, logger="lion_local"):
        assert warn_truncated("2/generation", "generator", records, 0.5, "roles.generator.max_tokens") == 1
        assert not caplog.records  # 1 of 4 is not above half
        warn_truncated("2/generation", "generator", records, 0.2, "roles.generator.max_tokens")
    assert "raise roles.generator.max_tokens" in caplog.text


def test_imitation_keeps_cut_answers_unless_told_to_drop_them(tmp_path: Path):
    keep = load_config(ROOT / "configs/tiny-cpu.yaml", [f"run_dir={tmp_path}"])
    drop = load_config(ROOT / "configs/tiny-cpu.yaml", [f"run_dir={tmp_path}", "imitation.drop_truncated_answers=true"])
    answers = _answers(cut={1, 2}, empty={3})
    assert [e["id"] for e in training_examples(keep, RECORDS, answers, "</s>")] == [r["id"] for r in RECORDS[:3]]
    assert [e["id"] for e in training_examples(drop, RECORDS, answers, "</s>")] == [RECORDS[0]["id"]]
