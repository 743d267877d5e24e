"""discrimination and `evaluate` judge through one pipeline (lion_local/stages/judging.py): given the same
questions, the same answers and a referee whose replies depend only on what it is shown, both
commands produce identical judgements, in every referee mode, unreadable replies included."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint, FakeServers, Reply, answering_endpoint

from lion_local.config import load_config
from lion_local.stages.discrimination import run_discrimination
from lion_local.commands.evaluation import load_questions, run_evaluation, select_checkpoints
from lion_local.stages.judging import judged_pairs
from lion_local.run.records import instruction_record
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.state import read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Name three primary colours.",
    "Explain why ice floats on water.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Portugal?",
    "Give one tip for a job interview.",
    "Describe a rainy afternoon.",  # the referee never gives this one a readable reply
]
UNREADABLE = QUESTIONS[-1]
_PAIR = re.compile(
    r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n\[End of Answer of Assistant 1\]"
    r"\n\n\[Answer of Assistant 2\]\n(?P<second>.*?)\n\[End of Answer of Assistant 2\]",
    re.DOTALL,
)


def _score(*text: str) -> int:
    return 1 + int(hashlib.sha256("|".join(text).encode()).hexdigest(), 16) % 10


def content_referee(body: dict) -> Reply:
    """Replies that depend only on the question and the two answers shown, in the request's mode."""
    shown = _PAIR.search(body["messages"][-1]["content"])
    first, second = _score(shown["question"], shown["first"]), _score(shown["second"], shown["question"])
    if shown["question"] == UNREADABLE:  # the endpoint ignored the constraint (logprobs still come back)
        return ("Both answers have merits.", "stop", *([[]] if body.get("logprobs") else []))
    if "structured_outputs" not in body:
        return f"A short explanation.\nScore of Assistant 1: {first}\nScore of Assistant 2: {second}", "stop"
    text = f"{first} {second}"
    if not body.get("logprobs"):
        return text, "stop"
    # Each score's position: its own token most likely, its neighbours sharing the rest.
    tokens = []
    for index, score in enumerate((first, second)):
        space = " " if index else ""
        others = [s for s in (score - 1, score + 1) if 1 <= s <= 10]
        alternatives = [{"token": f"{space}{score}", "logprob": math.log(0.6)}] + [
            {"token": f"{space}{s}", "logprob": math.log(0.4 / len(others))} for s in others
        ]
        tokens.append({"token": f"{space}{score}", "logprob": math.log(0.6), "top_logprobs": alternatives})
    return text, "stop", tokens


@pytest.fixture
def fake():
    endpoint = answering_endpoint()
    endpoint.handlers["referee"] = content_referee
    yield endpoint
    endpoint.stop()


def _checkpoint(run: RunDir) -> None:
    run.iteration(1).student.mkdir(parents=True)
    (run.iteration(1).student / "config.json").write_text("{}")
    (run.iteration(1).student / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("mode", ["explain_first", "scores_only", "expected_score"])
def test_evaluate_and_discrimination_give_identical_judgements_for_identical_replies(
    fake: FakeEndpoint, tmp_path: Path, mode: str
):
    config = load_config(ROOT / "configs/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}", f"roles.referee.mode={mode}",
                                                          "roles.referee.parse_retries=1",
                                                          # the referee's replies here are hashes: no control pairs,
                                                          # and no likelihood (the checkpoint is a stand-in)
                                                          "discrimination.referee_check.control_pairs=0",
                                                          "evaluation.likelihood=false"])
    run = RunDir(config.run_dir)
    pool = [instruction_record(question, "", "seed", 0, None) for question in QUESTIONS]
    write_jsonl_atomic(run.iteration(1) / "train_pool.jsonl", pool)
    write_jsonl_atomic(run.iteration(1) / "cache_pool.jsonl", pool)
    _checkpoint(run)
    asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))
    discriminated = {j["id"]: j for j in read_jsonl(run.iteration(1) / "judgements.jsonl")}

    questions_file = tmp_path / "questions.jsonl"
    questions_file.write_text("".join(f'{{"question": "{question}"}}\n' for question in QUESTIONS))
    questions = load_questions(questions_file)
    assert [q["id"] for q in questions] == [record["id"] for record in pool]  # the same ids: the same pairs
    asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, FakeServers(fake)))
    evaluated = judged_pairs([q["id"] for q in questions], read_jsonl(run.root / "eval/iter_1/judgements.jsonl"))

    unreadable = pool[-1]["id"]
    assert discriminated[unreadable]["label"] == "unjudged" and unreadable not in evaluated
    assert set(evaluated) == set(discriminated) - {unreadable}
    for pair_id, scores in evaluated.items():
        judgement = discriminated[pair_id]
        assert {key: judgement[key] for key in scores} == scores, pair_id
    if mode == "expected_score":  # the scores are the expectations, not the sampled digits
        assert any(not float(s).is_integer() for scores in evaluated.values() for s in scores["teacher_first"])
    referee_bodies = fake.bodies("referee")
    assert len(referee_bodies) == 2 * (2 * len(QUESTIONS) + 2)  # 2 commands x 2 orders, and a retry per unreadable order
    assert all(("structured_outputs" in body) == (mode != "explain_first") for body in referee_bodies)
