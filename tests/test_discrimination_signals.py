"""discrimination.signal likelihood and none, against the fake endpoint (tests/fake_endpoint.py).

- likelihood: each Cache Pool instruction's gap is the student's mean NLL per token of the teacher's
  answer, read from the prompt logprobs of one prefill per instruction (the ids TRL trains on);
  hard above the configured quantile of the pool's gaps; no student answer, no referee request;
  journaled, so a stage resumed from a cut journal asks only for the missing gaps.
- none: nothing asked at all; every instruction is a seed of both sides, drawn uniformly from the
  whole Cache Pool with the stage's seeded RNG, under the same quotas, prompts and budgets.
- the decisions (quantile, labels, histogram), `plan`'s counts for each signal, and the signal
  recorded in the run's identity.
The runs on real servers, killed and resumed: tests/test_signal_arms.py.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy
import pytest
from fake_endpoint import FakeEndpoint, FakeServers
from test_stages_with_fake_endpoints import POOL, fake, last_content, make_config, prepare_iteration, seeded_generator  # noqa: F401

from lion_local.commands.plan import build_plan
from lion_local.stages.run_identity import run_identity
from lion_local.run.layout import Iteration
from lion_local.run.records import request_seed
from lion_local.run.state import read_jsonl, write_jsonl_atomic
from lion_local.smoke.tiny_build import train_tokenizer
from lion_local.stages.discrimination import run_discrimination
from lion_local.stages.generation import run_generation, seed_sides
from lion_local.stages.likelihood import Scored, student_scored
from lion_local.stages.likelihood_gaps import as_trained, likelihood_judgements, nll_histogram, quantile


def per_token(ids: list[int]) -> float:
    """The fake student's NLL of every token of a prompt: a value fixed by the prompt's length."""
    return 0.5 + (len(ids) % 7) * 0.25


def likelihood_student(body: dict):
    ids = body["prompt"]
    assert isinstance(ids, list) and body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
    logprobs = [None] + [{str(token): {"logprob": -per_token(ids), "rank": 1}} for token in ids[1:]]
    return "x", "length", logprobs


def with_tokenizer(run) -> object:
    """The fake checkpoint gets a real (small, trained here) tokenizer: the stage tokenizes with it."""
    tokenizer = train_tokenizer([(r["instruction"], "An answer to it.") for r in POOL], 300)
    tokenizer.save_pretrained(run.iteration(1).student)
    return tokenizer


def expected_gaps(tokenizer) -> dict[str, float]:
    gaps = {}
    for record in POOL:
        scored = student_scored(tokenizer, "alpaca", record["instruction"], "", "TEACHER: answer to " + record["instruction"])
        gaps[record["id"]] = per_token(scored.ids)
    return gaps


def test_likelihood_gaps_come_from_one_prefill_each_and_split_at_the_quantile(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "discrimination.signal=likelihood", "discrimination.likelihood_quantile=0.5")
    run = prepare_iteration(config)
    tokenizer = with_tokenizer(run)
    fake.handlers["teacher"] = lambda body: ("TEACHER: answer to " + last_content(body), "stop")
    fake.handlers["student"] = likelihood_student

    summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))

    gaps = expected_gaps(tokenizer)
    threshold = float(numpy.quantile(list(gaps.values()), 0.5))
    judgements = read_jsonl(run.iteration(1).judgements)
    assert [j["id"] for j in judgements] == [r["id"] for r in POOL]
    for judgement in judgements:
        assert judgement["gap"] == pytest.approx(gaps[judgement["id"]], abs=1e-5)
        assert judgement["label"] == ("hard" if gaps[judgement["id"]] > threshold + 1e-9 else "easy")
    assert summary["signal"] == "likelihood" and summary["threshold"] == pytest.approx(threshold, abs=1e-5)
    assert summary["hard"] + summary["easy"] == len(POOL) and summary["unjudged"] == 0
    assert sum(b["count"] for b in summary["nll_histogram"]) == len(POOL)
    # One prefill per instruction on the student's server; no student answer, no referee request.
    assert fake.roles() == {"teacher": len(POOL), "student": len(POOL)}
    records = read_jsonl(run.iteration(1).likelihoods)
    assert sorted(r["id"] for r in records) == sorted(gaps)
    assert not run.iteration(1).student_answers.exists() and not run.iteration(1).reviews.exists()


def test_a_likelihood_stage_resumed_from_a_cut_journal_asks_only_for_the_missing_gaps(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "discrimination.signal=likelihood")
    run = prepare_iteration(config)
    with_tokenizer(run)
    fake.handlers["student"] = likelihood_student
    first = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))
    labels = read_jsonl(run.iteration(1).judgements)

    journal = run.iteration(1).likelihoods
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]) + lines[2][:20])  # two whole records and a torn one
    run.iteration(1).judgements.unlink()
    fake.reset()
    again = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))

    assert fake.roles() == {"student": len(POOL) - 2}  # the teacher's answers are cached run-wide
    assert read_jsonl(run.iteration(1).judgements) == labels and again["threshold"] == first["threshold"]
    assert len(read_jsonl(journal)) == len(POOL)


def test_signal_none_asks_nothing_and_draws_every_seed_uniformly_from_the_whole_pool(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "discrimination.signal=none", "generation.expected_acceptance=1.0")
    run = prepare_iteration(config)
    servers = FakeServers(fake)
    summary = asyncio.run(run_discrimination(config, run, Iteration(1), servers))
    assert fake.roles() == {} and servers.clients == []
    assert summary["signal"] == "none" and summary["any"] == len(POOL)
    assert {j["label"] for j in read_jsonl(run.iteration(1).judgements)} == {"any"}

    fake.handlers["generator"] = seeded_generator
    generation = asyncio.run(run_generation(config, run, Iteration(1), servers))
    assert generation["quota"] == {"hard": 3, "easy": 3} and generation["seeds"] == {"hard": len(POOL), "easy": len(POOL)}
    for call in read_jsonl(run.iteration(1).generator_calls):
        draw = random.Random(request_seed(config.seed, "generator-seed", 1, call["side"], call["attempt"]))
        assert call["parent"] == POOL[draw.randrange(len(POOL))]["id"]
    # Both prompts still used, as in the referee's loop: only the seeds' choice differs.
    prompts = [last_content(body) for body in fake.bodies("generator")]
    assert any("rarer" in p for p in prompts) and any("same task type" in p for p in prompts)


def test_the_decisions_quantile_labels_histogram_and_sides():
    values = [random.Random(i).uniform(0, 9) for i in range(101)]
    for q in (0.1, 0.5, 0.73, 0.9):
        assert quantile(values, q) == pytest.approx(float(numpy.quantile(values, q)))
    pool = [{"id": str(i)} for i in range(10)]
    gaps = {str(i): float(i) for i in range(9)}  # "9": no gap (an empty teacher answer)
    judgements, threshold = likelihood_judgements(pool, gaps, 0.75)
    assert threshold == 6.0
    assert [j["label"] for j in judgements] == ["easy"] * 7 + ["hard"] * 2 + ["unjudged"]
    histogram = nll_histogram([1.0, 1.0, 2.0, 5.0], bins=4)
    assert [b["count"] for b in histogram] == [2, 1, 0, 1] and histogram[-1]["to"] == 5.0
    assert nll_histogram([]) == [] and sum(b["count"] for b in nll_histogram([3.0, 3.0])) == 2
    assert as_trained(Scored([1, 2, 3, 4, 5], 2), 4) == Scored([1, 2, 3, 4], 2)  # cut where TRL cuts
    assert as_trained(Scored([1, 2, 3, 4, 5], 4), 3) == Scored([1, 2, 3], 3)  # no answer token left
    assert as_trained(Scored([1, 2, 3], 1), None) == Scored([1, 2, 3], 1)
    labels = {"0": "hard", "1": "easy", "2": "unjudged"}
    assert seed_sides(pool[:3], labels) == {"hard": [pool[0]], "easy": [pool[1]]}
    assert seed_sides(pool[:3], {r["id"]: "any" for r in pool}) == {"hard": pool[:3], "easy": pool[:3]}


@pytest.mark.parametrize("signal, student, referee", [("referee", 6, 12), ("likelihood", 6, 0), ("none", 0, 0)])
def test_plan_counts_each_signals_calls_and_identity_records_it(tmp_path: Path, signal: str, student: int, referee: int):
    seeds = tmp_path / "seeds.jsonl"
    write_jsonl_atomic(seeds, [{"instruction": r["instruction"]} for r in POOL])
    config = make_config(tmp_path / "run", f"discrimination.signal={signal}", f"seed_data={seeds}", "iterations=1")
    rows = {(r["stage"], r["role"]): r for r in build_plan(config)["rows"]}
    assert rows[("1/discrimination", "student")]["calls"] == student
    assert rows[("1/discrimination", "referee")]["calls"] == referee
    if signal == "likelihood":  # a prefill holds the prompt and the teacher's answer
        assert rows[("1/discrimination", "student")]["prompt_tokens"] > 0
    assert run_identity(config)["discrimination.signal"] == signal


@pytest.mark.parametrize("signal", ["likelihood", "none"])
def test_doctor_shows_an_unused_referee_without_failing(tmp_path: Path, signal: str):
    from lion_local.commands.doctor import Check, unused_referee

    checks = [Check("teacher", False, "unreachable"), Check("referee", False, "unreadable"),
              Check("referee check", False, "control accuracy 0.40 below 0.75")]
    shown = unused_referee(make_config(tmp_path / "run", f"discrimination.signal={signal}"), checks)
    assert not shown[0].ok and not shown[0].informational  # the teacher still fails the doctor
    for check in shown[1:]:
        assert check.ok and check.informational
        assert check.detail.startswith(f"not used by the loop (discrimination.signal {signal}); for a referee run it fails")
    referee_run = [Check("referee", False, "unreadable")]
    assert not unused_referee(make_config(tmp_path / "run"), referee_run)[0].ok
