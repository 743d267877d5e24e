"""The referee measured on control pairs (lion_local/stages/referee_health.py): which pairs, the figures,
the one line that stops a discrimination, and the stop and resume of a real discrimination stage on a
fake endpoint whose referee is worthless. The same stop on the real model: tests/test_real_model.py."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint, FakeServers, answering_endpoint

from lion_local.config import RefereeCheck, load_config
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.records import instruction_record
from lion_local.run.state import read_jsonl, write_jsonl_atomic
from lion_local.stages.discrimination import run_discrimination
from lion_local.stages.referee_health import (
    CUT_WORDS,
    RefereeCheckError,
    control_figures,
    control_pairs,
    pool_problem,
    referee_problem,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = [instruction_record(f"Explain topic number {i} to a curious child.", "", "seed", 0, None) for i in range(9)]
ANSWERS = {r["id"]: f"Here is a careful and complete answer about topic {i}, with an example." for i, r in enumerate(POOL)}


def _review(pair_id: str, order: str, scores, attempt: int = 0) -> dict:
    return {"id": pair_id, "order": order, "attempt": attempt, "scores": scores}


def test_control_pairs_cycle_the_kinds_and_keep_their_order_when_more_are_asked():
    pairs = control_pairs(POOL, ANSWERS, 6, seed=0)
    assert [p.kind for p in pairs] == ["empty", "cut", "other"] * 2
    for control in pairs:
        real = ANSWERS[control.pair.id]
        assert control.pair.teacher == real
        degraded = {"empty": "", "cut": " ".join(real.split()[:CUT_WORDS])}.get(control.kind)
        if degraded is not None:
            assert control.pair.student == degraded
        else:  # another instruction's answer, never this one's
            assert control.pair.student in ANSWERS.values() and control.pair.student != real
    assert [p.pair.id for p in control_pairs(POOL, ANSWERS, 3, seed=0)] == [p.pair.id for p in pairs[:3]]
    assert [p.pair.id for p in control_pairs(POOL, ANSWERS, 6, seed=1)] != [p.pair.id for p in pairs]
    assert len(control_pairs(POOL, ANSWERS, 50, seed=0)) == len(POOL)  # at most one per instruction


def test_answers_too_short_to_cut_take_no_part():
    short = {**ANSWERS, POOL[0]["id"]: "Yes, it is.", POOL[1]["id"]: ""}
    ids = {p.pair.id for p in control_pairs(POOL, short, 50, seed=0)}
    assert POOL[0]["id"] not in ids and POOL[1]["id"] not in ids and len(ids) == len(POOL) - 2


def test_figures_count_ties_as_failures_and_unreadable_pairs_as_unjudged():
    pairs = control_pairs(POOL, ANSWERS, 4, seed=0)
    a, b, c, d = (p.pair.id for p in pairs)
    reviews = [
        _review(a, "teacher_first", [8, 2]), _review(a, "student_first", [3, 9]),  # right, consistent
        _review(b, "teacher_first", [5, 5]), _review(b, "student_first", [5, 5]),  # a tie: not right
        _review(c, "teacher_first", [2, 8]), _review(c, "student_first", [2, 8]),  # position bias: a tie
        _review(d, "teacher_first", None), _review(d, "teacher_first", None, 1), _review(d, "student_first", [1, 9]),
    ]
    figures = control_figures(pairs, reviews)
    assert figures["pairs"] == 4 and figures["judged"] == 3 and figures["unjudged_share"] == 0.25
    assert figures["accuracy"] == round(1 / 3, 4)
    assert figures["position_consistent_share"] == round(2 / 3, 4)  # the tie agrees with itself; the bias does not
    assert figures["readable_share"] == round(7 / 9, 4)
    assert figures["by_kind"]["empty"]["accuracy"] == 1.0 and figures["by_kind"]["other"]["judged"] == 1


def test_the_stop_line_names_the_figure_the_key_the_mode_and_the_remedy():
    check = RefereeCheck(min_control_accuracy=0.75, max_unjudged_share=0.2)
    unreadable = {"pairs": 10, "judged": 1, "unjudged_share": 0.9, "accuracy": 1.0}
    line = referee_problem(unreadable, check, "explain_first", "1/discrimination")
    assert line.startswith("1/discrimination: the referee left 9 of 10 control pairs unjudged (unjudged share 0.90 > "
                           "discrimination.referee_check.max_unjudged_share 0.2) in mode explain_first")
    assert "roles.referee.mode: expected_score" in line and "--accept-change" in line and "\n" not in line
    weak = {"pairs": 10, "judged": 10, "unjudged_share": 0.0, "accuracy": 0.5}
    line = referee_problem(weak, check, "scores_only", "2/discrimination")
    assert "in only 5 of 10 control pairs (control accuracy 0.50 < discrimination.referee_check.min_control_accuracy 0.75)" in line
    assert "mode scores_only" in line and "stronger referee" in line
    assert referee_problem({**weak, "accuracy": 0.8}, check, "scores_only", "x") is None
    assert referee_problem({"pairs": 0, "judged": 0, "unjudged_share": None, "accuracy": None}, check, "x", "x") is None
    assert pool_problem(2, 10, check, "explain_first", "1/discrimination") is None
    assert pool_problem(3, 10, check, "explain_first", "1/discrimination").startswith(
        "1/discrimination: 3 of 10 instructions are unjudged (unjudged share 0.30 > ")


# ----------------------------------------------------------------------------------------------
# The stage: stop, journals kept, resume in another mode
# ----------------------------------------------------------------------------------------------

_SHOWN = re.compile(
    r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n\[End of Answer of Assistant 1\]"
    r"\n\n\[Answer of Assistant 2\]\n(?P<second>.*?)\n\[End of Answer of Assistant 2\]",
    re.DOTALL,
)


def position_biased(body: dict) -> tuple[str, str]:
    """A worthless referee: the second answer always wins, whatever the answers (scores_only's reply)."""
    return "3 8", "stop"


def fair(body: dict) -> tuple[str, str]:
    """A referee that sees through position: an answer is good when it is the fake teacher's whole answer to
    this question ("TEACHER: answer to <question>"), not empty, cut, another question's or the student's."""
    shown = _SHOWN.search(body["messages"][-1]["content"])

    def score(answer: str) -> int:
        return 9 if answer.startswith("TEACHER") and shown["question"] in answer else 2

    return f"{score(shown['first'])} {score(shown['second'])}", "stop"


@pytest.fixture
def fake():
    endpoint = answering_endpoint()
    yield endpoint
    endpoint.stop()


def _stage(fake: FakeEndpoint, tmp_path: Path, *overrides: str):
    config = load_config(ROOT / "configs/tiny-cpu.yaml", [
        f"run_dir={tmp_path / 'run'}", "roles.referee.mode=scores_only", "discrimination.referee_check.control_pairs=6",
        "discrimination.referee_check.min_control_accuracy=0.75",  # the default (the tiny config does not stop)
        *overrides,
    ])
    run = RunDir(config.run_dir)
    if not run.iteration(1).student.exists():
        write_jsonl_atomic(run.iteration(1).train_pool, POOL)
        write_jsonl_atomic(run.iteration(1).cache_pool, POOL)
        run.iteration(1).student.mkdir(parents=True)
        (run.iteration(1).student / "config.json").write_text("{}")
        (run.iteration(1).student / "model.safetensors").write_bytes(b"")
    return config, run, lambda: asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))


@pytest.mark.parametrize("stream", [True, False])
def test_a_worthless_referee_stops_the_stage_before_the_pool_is_reviewed_and_a_resume_in_another_mode_continues(
    fake: FakeEndpoint, tmp_path: Path, stream: bool
):
    fake.handlers["referee"] = position_biased
    streaming = f"discrimination.stream_reviews={str(stream).lower()}"
    config, run, discriminate = _stage(fake, tmp_path, streaming)
    with pytest.raises(RefereeCheckError, match=r"in only 0 of 6 control pairs \(control accuracy 0.00 < .*in mode scores_only"):
        discriminate()
    directory = run.iteration(1)
    assert len(read_jsonl(directory.controls)) == 12  # every control pair, both orders, journaled
    assert read_jsonl(directory.reviews) == [] and not directory.judgements.exists()  # no pool review was sent
    student_calls = fake.roles()["student"]
    # Streamed, the control pairs go beside the student's answers; else after all of them.
    assert len(read_jsonl(directory.student_answers)) == student_calls and (stream or student_calls == len(POOL))

    fake.reset()
    fake.handlers["referee"] = fair
    config, run, discriminate = _stage(fake, tmp_path, streaming, "roles.referee.mode=expected_score")
    fake.handlers["referee"] = lambda body: (*fair(body), [])  # no usable logprobs: the sampled scores stand
    summary = discriminate()
    assert summary["referee_check"]["accuracy"] == 1.0 and summary["referee_check"]["pairs"] == 6
    assert summary["hard"] == len(POOL)  # the fair referee prefers every teacher answer by 7 points
    assert fake.roles()["student"] == len(POOL) - student_calls  # no student answer asked twice
    assert fake.roles()["referee"] == 2 * 6 + 2 * len(POOL)  # the old mode's control reviews asked again
    pool_ids = {r["id"] for r in read_jsonl(directory.cache_pool)}
    assert {j["id"] for j in read_jsonl(directory.judgements)} == pool_ids  # control pairs judge nothing in the pool
    assert all(r["referee"] for r in read_jsonl(directory.reviews))


def test_a_referee_whose_pool_reviews_are_unreadable_stops_after_them(fake: FakeEndpoint, tmp_path: Path):
    def controls_only(body: dict) -> tuple[str, str]:
        content = body["messages"][-1]["content"]
        return fair(body) if "STUDENT" not in content else ("I cannot say.", "stop")

    fake.handlers["referee"] = controls_only
    config, run, discriminate = _stage(fake, tmp_path, "roles.referee.parse_retries=0")
    with pytest.raises(RefereeCheckError, match=r"9 of 9 instructions are unjudged \(unjudged share 1.00 > "):
        discriminate()
    assert len(read_jsonl(run.iteration(1).reviews)) == 2 * len(POOL)
    assert not run.iteration(1).judgements.exists()
    config, run, discriminate = _stage(fake, tmp_path, "roles.referee.parse_retries=0",
                                       "discrimination.referee_check.max_unjudged_share=1")
    assert discriminate()["unjudged"] == len(POOL)  # a bound raised knowingly: the stage finishes
