"""The discrimination and generation stages end to end against a fake OpenAI-compatible endpoint.

The tiny real models never produce unreadable reviews, position-biased referees, garbage
generator replies or journals cut off half way; the fake endpoint of tests/fake_endpoint.py
does, on demand: the student, referee, generator and teacher each answer from a Python callable
the test sets, and the stages reach it through real EndpointClients, so everything from the
HTTP request to the journals is the stages' own code.

Covered:
- discrimination: referee retries on unreadable reviews, unjudged instructions, the journal of
  every attempt and the summary counts; position bias cancelled by the two orders; resuming
  from truncated journals asks only for what is missing (a retry chain continues at its next
  attempt) and never the teacher again.
- generation: one side without seeds, the call budget and the shortfall, every rejection
  reason (unparseable, truncated, banned_word, too_similar, duplicate, quota_reached,
  repeats_seed), determinism across run directories, resume from a truncated journal, and
  accepted instructions joining the novelty pool.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint, FakeServers, Reply

from lion_local.config import Config, load_config
from lion_local.stages.discrimination import run_discrimination
from lion_local.stages.generation import run_generation
from lion_local.run.records import instruction_id, instruction_record, request_seed
from lion_local.run.layout import Iteration, RunDir, is_checkpoint
from lion_local.run.state import read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]

# The Cache Pool of iteration 1: mutually dissimilar, each passes the generation post-filters.
POOL_TEXTS = [
    "Write a two-sentence story about a lighthouse keeper who finds a message.",
    "Compose a short haiku about morning rain on a city street.",
    "Invent a name and a one-line slogan for a bicycle repair shop.",
    "Describe a quiet forest at night in two vivid sentences.",
    "Draft an opening line for a mystery novel set on a train.",
    "Create a short riddle whose answer is a shadow.",
]
POOL = [instruction_record(text, "", "seed", 0, None) for text in POOL_TEXTS]
ID_OF = {record["instruction"]: record["id"] for record in POOL}
TEXT_OF = {record["id"]: record["instruction"] for record in POOL}

# Words for the fake generator's new instructions: none in the pool, none banned.
WORDS = [
    "amber", "basalt", "cobalt", "dolphin", "ember", "falcon", "glacier", "harbor", "iris",
    "jasmine", "kelp", "lantern", "meadow", "nebula", "orchard", "pepper", "quartz", "raven",
    "saffron", "tundra", "umber", "violet", "walnut", "yarrow", "zephyr", "anchor", "bramble",
    "canyon", "dune", "estuary", "fjord", "grotto", "heron", "igloo", "juniper", "kiln",
    "lagoon", "marble", "nutmeg", "opal", "pylon", "quiver", "reef", "sequoia", "thistle",
    "urchin", "vapor", "willow", "xylophone", "yodel", "zinnia", "atlas", "beacon", "cipher",
    "delta", "eclipse", "fresco", "gazebo", "hammock", "indigo", "jigsaw", "kayak", "lilac",
    "mosaic", "nomad", "oasis", "pagoda", "quasar", "rhubarb", "sonnet", "trellis", "utopia",
    "velvet", "wharf", "yacht", "zenith", "acorn", "bison", "cactus", "dingo", "egret",
    "ferret", "gecko", "husky", "ibis", "jackal", "koala", "lemur", "marmot", "newt", "ocelot",
    "puffin", "quokka", "rabbit", "salmon", "tapir", "vulture", "wombat"
]

PARSE_RETRIES = 2


# ----------------------------------------------------------------------------------------------
# What the fake roles read from a request
# ----------------------------------------------------------------------------------------------

_REFEREE = re.compile(
    r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n\[End of Answer of Assistant 1\]"
    r"\n\n\[Answer of Assistant 2\]\n(?P<second>.*?)\n\[End of Answer of Assistant 2\]",
    re.DOTALL,
)
_GENERATOR = re.compile(r"#Given Instruction#:\n(?P<seed>.*?)\n\n#New Instruction#:", re.DOTALL)
_STUDENT = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n### Response:", re.DOTALL)


def last_content(body: dict) -> str:
    return body["messages"][-1]["content"]


def referee_request(body: dict) -> tuple[str, str]:
    """(instruction id, order) of a referee request, from the answers' TEACHER/STUDENT marks."""
    match = _REFEREE.search(last_content(body))
    assert match, last_content(body)
    first = match["first"]
    assert first.startswith(("TEACHER:", "STUDENT:")), first
    return ID_OF[match["question"]], "teacher_first" if first.startswith("TEACHER:") else "student_first"


def referee_attempt(body: dict, config_seed: int = 0, k: int = 1) -> int:
    """The attempt number of a referee request, recovered from its sampling seed."""
    record_id, order = referee_request(body)
    for attempt in range(10):
        if request_seed(config_seed, "referee", k, record_id, order, attempt) == body["seed"]:
            return attempt
    raise AssertionError(f"referee seed {body['seed']} matches no attempt")


def generator_seed_text(body: dict) -> str:
    match = _GENERATOR.search(last_content(body))
    assert match, last_content(body)
    return match["seed"]


def student_instruction(body: dict) -> str:
    match = _STUDENT.search(body["prompt"])
    assert match, body["prompt"]
    return match["instruction"]


def scores_text(order: str, teacher: float, student: float) -> str:
    first, second = (teacher, student) if order == "teacher_first" else (student, teacher)
    return f"The answers differ in detail.\nScore of Assistant 1: {first:g}\nScore of Assistant 2: {second:g}"


def novel_sentence(seed: int) -> str:
    """A new instruction of 8 words that no other seed value is likely to come close to."""
    return "Describe " + " ".join(random.Random(seed).sample(WORDS, 7)) + "."


def generator_call_of(config_seed: int = 0, k: int = 1, attempts: int = 64) -> dict[int, tuple[str, int]]:
    """Sampling seed of a generator request -> (side, attempt)."""
    return {
        request_seed(config_seed, "generator", k, side, attempt): (side, attempt)
        for side in ("hard", "easy")
        for attempt in range(attempts)
    }


# ----------------------------------------------------------------------------------------------
# Fixtures and set-up
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake():
    endpoint = FakeEndpoint()
    endpoint.start()
    endpoint.handlers["teacher"] = lambda body: ("TEACHER: answer to " + last_content(body), "stop")
    endpoint.handlers["student"] = lambda body: ("STUDENT: answer to " + student_instruction(body), "stop")
    yield endpoint
    endpoint.stop()


def make_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            f"run_dir={run_dir}",
            f"roles.referee.parse_retries={PARSE_RETRIES}",
            "generation.new_per_iteration=6",
            "generation.hard_ratio=0.5",
            "generation.max_attempts_factor=2",
            # The scripted referees here answer the pool's reviews only; tests/test_referee_health.py has the controls.
            "discrimination.referee_check.control_pairs=0",
            *overrides,
        ],
    )


def prepare_iteration(config: Config, records: list[dict] = POOL, student: bool = True) -> RunDir:
    run = RunDir(config.run_dir)
    directory = run.iteration(1)
    write_jsonl_atomic(directory / "train_pool.jsonl", records)
    write_jsonl_atomic(directory / "cache_pool.jsonl", records)
    if student:
        run.iteration(1).student.mkdir(parents=True)
        (run.iteration(1).student / "config.json").write_text("{}")
        (run.iteration(1).student / "model.safetensors").write_bytes(b"")
        assert is_checkpoint(run.iteration(1).student)
    return run


def write_judgements(run: RunDir, labels: dict[str, str]) -> None:
    judgements = []
    for record in POOL:
        label = labels[record["id"]]
        if label == "unjudged":
            judgements.append({"id": record["id"], "teacher_score": None, "student_score": None, "gap": None, "label": label})
        else:
            gap = 2.0 if label == "hard" else 0.0
            judgements.append({"id": record["id"], "teacher_score": 8.0, "student_score": 8.0 - gap, "gap": gap, "label": label})
    write_jsonl_atomic(run.iteration(1) / "judgements.jsonl", judgements)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Discrimination
# ----------------------------------------------------------------------------------------------

A, B, C = POOL[0]["id"], POOL[1]["id"], POOL[2]["id"]


def retrying_referee(body: dict) -> Reply:
    """A: never readable. B: unreadable on attempt 0, then teacher 8 / student 6. C: 9 / 5. Rest: 7 / 7."""
    record_id, order = referee_request(body)
    attempt = referee_attempt(body)
    if record_id == A or (record_id == B and attempt == 0):
        return "I cannot decide.", "stop"
    teacher, student = {B: (8, 6), C: (9, 5)}.get(record_id, (7, 7))
    return scores_text(order, teacher, student), "stop"


def test_streamed_and_sequential_discrimination_give_the_same_judgements(fake: FakeEndpoint, tmp_path: Path):
    """discrimination.stream_reviews changes when reviews are sent, never what they are: the same
    seeds, the same replies, the same judgements. Streamed, the student's server stops once its
    last answer is in, before that answer's own reviews are requested."""
    fake.handlers["referee"] = retrying_referee
    results = {}
    for stream in (True, False):
        config = make_config(tmp_path / f"run-{stream}", f"discrimination.stream_reviews={str(stream).lower()}")
        run = prepare_iteration(config)
        servers = FakeServers(fake)
        fake.reset()
        asyncio.run(run_discrimination(config, run, Iteration(1), servers))
        directory = run.iteration(1)
        reviews = {(r["id"], r["order"], r["attempt"]): (r["raw"], r["seed"]) for r in read_jsonl(directory / "reviews.jsonl")}
        results[stream] = (read_jsonl(directory / "judgements.jsonl"), reviews, servers, fake.roles()["referee"])
    (streamed, streamed_reviews, streamed_servers, referee_calls), (sequential, sequential_reviews, _, _) = (
        results[True], results[False]
    )
    assert streamed == sequential and streamed_reviews == sequential_reviews
    assert streamed_servers.stopped == ["student"]
    assert streamed_servers.requests_at_stop["student"]["student"] == len(POOL)
    assert streamed_servers.requests_at_stop["student"]["referee"] < referee_calls


def test_discrimination_retries_unreadable_reviews_then_gives_up(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run")
    run = prepare_iteration(config)
    fake.handlers["referee"] = retrying_referee
    servers = FakeServers(fake)

    summary = asyncio.run(run_discrimination(config, run, Iteration(1), servers))
    directory = run.iteration(1)

    # Referee requests: A asked 1 + parse_retries times per order, B twice per order, the rest once.
    asked = Counter((*referee_request(body), referee_attempt(body)) for body in fake.bodies("referee"))
    for order in ("teacher_first", "student_first"):
        assert [asked[(A, order, attempt)] for attempt in range(PARSE_RETRIES + 2)] == [1, 1, 1, 0]
        assert [asked[(B, order, attempt)] for attempt in range(3)] == [1, 1, 0]
        for record in POOL[2:]:
            assert [asked[(record["id"], order, attempt)] for attempt in range(2)] == [1, 0]
    assert sum(count for (rid, _, _), count in asked.items() if rid == A) == 2 * (PARSE_RETRIES + 1) == 6
    assert sum(asked.values()) == 6 + 4 + 2 * (len(POOL) - 2)

    # One student answer and one teacher answer per instruction, no more.
    assert Counter(student_instruction(body) for body in fake.bodies("student")) == Counter(POOL_TEXTS)
    assert Counter(last_content(body) for body in fake.bodies("teacher")) == Counter(POOL_TEXTS)
    assert fake.roles()["generator"] == 0
    assert ("student", str(run.iteration(1).student)) in servers.clients
    assert servers.stopped == ["student"]

    # Judgements: A unjudged with null scores, B judged from its readable retry.
    judgements = {j["id"]: j for j in read_jsonl(directory / "judgements.jsonl")}
    assert [j["id"] for j in read_jsonl(directory / "judgements.jsonl")] == [r["id"] for r in POOL]
    assert judgements[A] == {"id": A, "teacher_score": None, "student_score": None, "gap": None, "label": "unjudged"}
    assert (judgements[B]["teacher_score"], judgements[B]["student_score"], judgements[B]["gap"]) == (8.0, 6.0, 2.0)
    assert judgements[B]["label"] == "hard"
    assert judgements[B]["teacher_first"] == [8.0, 6.0] and judgements[B]["student_first"] == [6.0, 8.0]
    assert (judgements[C]["gap"], judgements[C]["label"]) == (4.0, "hard")
    for record in POOL[3:]:
        assert (judgements[record["id"]]["gap"], judgements[record["id"]]["label"]) == (0.0, "easy")

    # reviews.jsonl: every attempt, with its number, scores null when unreadable.
    reviews = read_jsonl(directory / "reviews.jsonl")
    assert len(reviews) == sum(asked.values())
    for order in ("teacher_first", "student_first"):
        a_reviews = [r for r in reviews if r["id"] == A and r["order"] == order]
        assert sorted(r["attempt"] for r in a_reviews) == [0, 1, 2]
        assert all(r["scores"] is None and r["raw"] == "I cannot decide." for r in a_reviews)
        b_reviews = sorted((r for r in reviews if r["id"] == B and r["order"] == order), key=lambda r: r["attempt"])
        assert [r["attempt"] for r in b_reviews] == [0, 1]
        assert b_reviews[0]["scores"] is None
        assert b_reviews[1]["scores"] == ([8.0, 6.0] if order == "teacher_first" else [6.0, 8.0])
        for review in b_reviews:
            assert review["seed"] == request_seed(config.seed, "referee", 1, B, order, review["attempt"])
    for record in POOL[2:]:
        assert sorted((r["order"], r["attempt"]) for r in reviews if r["id"] == record["id"]) == [
            ("student_first", 0),
            ("teacher_first", 0),
        ]

    # Summary, returned and on disk.
    assert read_json(directory / "discrimination.json") == summary
    assert summary["unjudged"] == 1
    assert summary["hard"] == 2 and summary["easy"] == len(POOL) - 3
    assert summary["referee_replies"] == len(reviews) == 18
    assert summary["unreadable_referee_replies"] == 2 * (PARSE_RETRIES + 1) + 2 == 8
    assert summary["cache_pool"] == len(POOL)
    assert summary["empty_student_answers"] == summary["truncated_student_answers"] == summary["empty_teacher_answers"] == 0
    assert summary["mean_gap"] == pytest.approx((2 + 4) / (len(POOL) - 1), abs=1e-4)

    # The teacher's answers went to the run-wide cache, one per instruction.
    cached = read_jsonl(run.teacher_answers)
    assert sorted(r["id"] for r in cached) == sorted(r["id"] for r in POOL)
    assert all(r["answer"].startswith("TEACHER: ") and not r["empty"] for r in cached)


def test_discrimination_cancels_pure_position_bias(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "discrimination.tau=1")
    run = prepare_iteration(config)
    fake.handlers["referee"] = lambda body: ("Score of Assistant 1: 9\nScore of Assistant 2: 3", "stop")

    summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))

    judgements = read_jsonl(run.iteration(1) / "judgements.jsonl")
    assert len(judgements) == len(POOL)
    for judgement in judgements:
        assert judgement["teacher_first"] == [9.0, 3.0] and judgement["student_first"] == [9.0, 3.0]
        assert (judgement["teacher_score"], judgement["student_score"], judgement["gap"]) == (6.0, 6.0, 0.0)
        assert judgement["label"] == "easy"
    assert (summary["hard"], summary["easy"], summary["unjudged"]) == (0, len(POOL), 0)
    assert summary["mean_gap"] == 0.0
    assert fake.roles()["referee"] == 2 * len(POOL)


def test_discrimination_resumes_from_truncated_journals(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run")
    run = prepare_iteration(config)
    directory = run.iteration(1)
    fake.handlers["referee"] = retrying_referee
    first_summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))
    first_judgements = read_jsonl(directory / "judgements.jsonl")
    first_reviews = read_jsonl(directory / "reviews.jsonl")
    first_teacher_cache = run.teacher_answers.read_bytes()

    # A kill half way: no judgements yet, half of each journal written.
    (directory / "judgements.jsonl").unlink()
    review_lines = (directory / "reviews.jsonl").read_text().splitlines(keepends=True)
    kept_reviews, lost_reviews = review_lines[: len(review_lines) // 2], review_lines[len(review_lines) // 2 :]
    (directory / "reviews.jsonl").write_text("".join(kept_reviews))
    answer_lines = (directory / "student_answers.jsonl").read_text().splitlines(keepends=True)
    kept_answers, lost_answers = answer_lines[: len(answer_lines) // 2], answer_lines[len(answer_lines) // 2 :]
    (directory / "student_answers.jsonl").write_text("".join(kept_answers))
    assert lost_reviews and lost_answers

    fake.reset()
    summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))

    assert fake.roles()["teacher"] == 0  # every answer is in teacher_answers.jsonl
    assert run.teacher_answers.read_bytes() == first_teacher_cache
    lost_answer_ids = sorted(json.loads(line)["id"] for line in lost_answers)
    assert sorted(ID_OF[student_instruction(body)] for body in fake.bodies("student")) == lost_answer_ids
    lost = Counter((r["id"], r["order"], r["attempt"]) for r in map(json.loads, lost_reviews))
    asked = Counter((*referee_request(body), referee_attempt(body)) for body in fake.bodies("referee"))
    assert asked == lost

    assert read_jsonl(directory / "judgements.jsonl") == first_judgements
    assert summary == first_summary
    key = lambda r: (r["id"], r["order"], r["attempt"])
    resumed_reviews = read_jsonl(directory / "reviews.jsonl")
    assert sorted(map(key, resumed_reviews)) == sorted(map(key, first_reviews))
    assert sorted(r["id"] for r in read_jsonl(directory / "student_answers.jsonl")) == sorted(r["id"] for r in POOL)


def test_discrimination_resumes_a_retry_chain_at_its_next_attempt(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run")
    run = prepare_iteration(config)
    directory = run.iteration(1)
    fake.handlers["referee"] = retrying_referee
    first_summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))
    first_judgements = read_jsonl(directory / "judgements.jsonl")

    # Lost: A's last attempt in one order (its other order has used every attempt), B's readable
    # retry in one order, and C's only review in one order.
    lost_keys = {(A, "teacher_first", 2), (B, "student_first", 1), (C, "student_first", 0)}
    reviews = read_jsonl(directory / "reviews.jsonl")
    assert lost_keys <= {(r["id"], r["order"], r["attempt"]) for r in reviews}
    write_jsonl_atomic(
        directory / "reviews.jsonl", [r for r in reviews if (r["id"], r["order"], r["attempt"]) not in lost_keys]
    )
    (directory / "judgements.jsonl").unlink()

    fake.reset()
    summary = asyncio.run(run_discrimination(config, run, Iteration(1), FakeServers(fake)))

    asked = Counter((*referee_request(body), referee_attempt(body)) for body in fake.bodies("referee"))
    assert asked == Counter(lost_keys)
    assert fake.roles() == Counter({"referee": 3})  # student answers and teacher answers all journaled
    assert read_jsonl(directory / "judgements.jsonl") == first_judgements
    assert summary == first_summary


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def seeded_generator(body: dict) -> Reply:
    return novel_sentence(body["seed"]), "stop"


def test_generation_without_hard_seeds_fills_the_quota_from_easy_ones(fake: FakeEndpoint, tmp_path: Path):
    # Every reply passes and is expected to: one wave of exactly the quota.
    config = make_config(tmp_path / "run", "generation.expected_acceptance=1.0")
    run = prepare_iteration(config, student=False)
    labels = {record["id"]: "easy" for record in POOL}
    labels[POOL[0]["id"]] = "unjudged"
    write_judgements(run, labels)
    fake.handlers["generator"] = seeded_generator

    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    directory = run.iteration(1)

    assert summary["quota"] == {"hard": 0, "easy": 6}
    assert summary["seeds"] == {"hard": 0, "easy": len(POOL) - 1}
    assert summary["accepted"] == {"hard": 0, "easy": 6, "total": 6}
    assert summary["shortfall"] == {"hard": 0, "easy": 0, "total": 0}
    assert summary["calls"] == {"hard": 0, "easy": 6}
    assert summary["budget"] == {"hard": 0, "easy": 12}
    assert any("no hard seeds" in note for note in summary["notes"]), summary["notes"]
    assert read_json(directory / "generation.json") == summary

    generated = read_jsonl(directory / "generated.jsonl")
    assert len(generated) == 6 and read_jsonl(directory / "rejected.jsonl") == []
    assert {record["origin"] for record in generated} == {"easy"}
    assert {record["iteration"] for record in generated} == {1}
    easy_ids = {rid for rid, label in labels.items() if label == "easy"}
    assert {record["parent"] for record in generated} <= easy_ids
    for record in generated:
        assert record["id"] == instruction_id(record["instruction"], "")

    # Every request used the easy template on an easy seed, never the unjudged one.
    bodies = fake.bodies("generator")
    assert len(bodies) == 6
    for body in bodies:
        assert "rarer" in last_content(body) and "same task type" not in last_content(body)
        assert ID_OF[generator_seed_text(body)] in easy_ids


def test_generation_budget_and_shortfall_when_every_reply_repeats_its_seed(fake: FakeEndpoint, tmp_path: Path):
    factor = 1.5
    config = make_config(tmp_path / "run", f"generation.max_attempts_factor={factor}")
    run = prepare_iteration(config, student=False)
    write_judgements(run, {r["id"]: ("hard" if i % 2 else "easy") for i, r in enumerate(POOL)})
    fake.handlers["generator"] = lambda body: (generator_seed_text(body), "stop")

    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    directory = run.iteration(1)

    quota = {"hard": 3, "easy": 3}
    budget = {side: math.ceil(factor * quota[side]) for side in quota}
    assert budget == {"hard": 5, "easy": 5}
    assert summary["quota"] == quota and summary["budget"] == budget
    sides = generator_call_of()
    per_side = Counter(sides[body["seed"]][0] for body in fake.bodies("generator"))
    assert per_side == Counter(budget)
    assert summary["calls"] == budget
    assert summary["accepted"] == {"hard": 0, "easy": 0, "total": 0}
    assert summary["shortfall"] == {"hard": 3, "easy": 3, "total": 6}
    assert summary["rejected"] == {"repeats_seed": 10} and summary["rejected_total"] == 10
    for side in ("hard", "easy"):
        assert any(note.startswith(f"{side}: 3 short of 3 after 5 calls") for note in summary["notes"]), summary["notes"]
    assert read_json(directory / "generation.json") == summary

    assert read_jsonl(directory / "generated.jsonl") == []
    rejected = read_jsonl(directory / "rejected.jsonl")
    assert len(rejected) == len(fake.bodies("generator")) == 10
    assert sorted((r["side"], r["attempt"]) for r in rejected) == sorted(
        (side, attempt) for side in ("hard", "easy") for attempt in range(5)
    )
    for entry in rejected:
        assert entry["reason"] == "repeats_seed"
        assert entry["instruction"] == TEXT_OF[entry["parent"]]
    assert len(read_jsonl(directory / "generator_calls.jsonl")) == 10


GARBAGE_LIST = "1. Write a song about rivers and lakes.\n2. Write a song about tall mountains."
BANNED = "Summarize the instruction manual of a vintage sewing machine."


def garbage_generator(body: dict) -> Reply:
    """By attempt: 0 a list, 1 cut off, 2 banned word, 3 another pool text less its full stop,
    4 another pool text verbatim, then new instructions."""
    _, attempt = generator_call_of()[body["seed"]]
    seed_text = generator_seed_text(body)
    other = next(text for text in POOL_TEXTS if text != seed_text)
    if attempt == 0:
        return GARBAGE_LIST, "stop"
    if attempt == 1:
        return novel_sentence(body["seed"]), "length"
    if attempt == 2:
        return BANNED, "stop"
    if attempt == 3:
        return other.rstrip("."), "stop"
    if attempt == 4:
        return other, "stop"
    return novel_sentence(body["seed"]), "stop"


def test_generation_rejects_garbage_with_the_right_reasons(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "generation.max_attempts_factor=3", "generation.expected_acceptance=0.9")
    run = prepare_iteration(config, student=False)
    write_judgements(run, {r["id"]: ("hard" if i % 2 else "easy") for i, r in enumerate(POOL)})
    fake.handlers["generator"] = garbage_generator

    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    directory = run.iteration(1)
    rejected = read_jsonl(directory / "rejected.jsonl")
    generated = read_jsonl(directory / "generated.jsonl")

    # Wave 1 (attempts 0-4: 5 calls fill a quota of 3 at acceptance 0.9 with probability 0.991)
    # is all garbage; wave 2 asks for the rest of the budget (5-8), whose last valid reply per
    # side arrives after the quota is full.
    reasons = {(r["side"], r["attempt"]): r["reason"] for r in rejected}
    for side in ("hard", "easy"):
        assert [reasons.get((side, attempt)) for attempt in range(9)] == [
            "unparseable", "truncated", "banned_word", "too_similar", "duplicate", None, None, None, "quota_reached",
        ]
    assert summary["calls"] == {"hard": 9, "easy": 9}
    assert summary["accepted"] == {"hard": 3, "easy": 3, "total": 6}
    assert summary["shortfall"] == {"hard": 0, "easy": 0, "total": 0}
    assert summary["rejected"] == dict(Counter(r["reason"] for r in rejected)) == {
        "banned_word": 2, "duplicate": 2, "quota_reached": 2, "too_similar": 2, "truncated": 2, "unparseable": 2,
    }
    assert summary["rejected_total"] == len(rejected) == 12
    assert read_json(directory / "generation.json") == summary
    assert len(fake.bodies("generator")) == 18

    calls = {(r["side"], r["attempt"]): r for r in read_jsonl(directory / "generator_calls.jsonl")}
    for entry in rejected:
        assert entry["raw"] == calls[(entry["side"], entry["attempt"])]["raw"]
        assert entry["parent"] == calls[(entry["side"], entry["attempt"])]["parent"]
        if entry["reason"] == "unparseable":
            assert entry["instruction"] is None and entry["raw"] == GARBAGE_LIST
        elif entry["reason"] == "truncated":
            assert calls[(entry["side"], entry["attempt"])]["finish_reason"] == "length"
            assert entry["instruction"] == novel_sentence(calls[(entry["side"], entry["attempt"])]["seed"])
        elif entry["reason"] == "banned_word":
            assert entry["instruction"] == BANNED
        elif entry["reason"] == "too_similar":
            other = next(text for text in POOL_TEXTS if text != TEXT_OF[entry["parent"]])
            assert entry["instruction"] == other.rstrip(".")
            assert entry["similar_to"] == ID_OF[other] != entry["parent"]
            assert entry["similarity"] == 1.0
        elif entry["reason"] == "duplicate":
            other = next(text for text in POOL_TEXTS if text != TEXT_OF[entry["parent"]])
            assert entry["instruction"] == other
    accepted_attempts = Counter(record["origin"] for record in generated)
    assert accepted_attempts == {"hard": 3, "easy": 3}
    hard_ids = {r["id"] for i, r in enumerate(POOL) if i % 2}
    for record in generated:
        assert (record["parent"] in hard_ids) == (record["origin"] == "hard")


def mixed_generator(body: dict) -> Reply:
    """Replies fixed by the request's seed: most are new instructions, some are garbage."""
    seed = body["seed"]
    if seed % 3 == 0:
        return BANNED, "stop"
    if seed % 7 == 0:
        return novel_sentence(seed), "length"
    return novel_sentence(seed), "stop"


def test_generation_is_deterministic_and_resumes_from_its_journal(fake: FakeEndpoint, tmp_path: Path):
    labels = {r["id"]: ("hard" if i % 2 else "easy") for i, r in enumerate(POOL)}
    fake.handlers["generator"] = mixed_generator
    runs = []
    summaries = []
    for name in ("run_a", "run_b"):
        config = make_config(tmp_path / name)
        run = prepare_iteration(config, student=False)
        write_judgements(run, labels)
        summaries.append(asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake))))
        runs.append((config, run))
    (config_a, run_a), (_, run_b) = runs
    dir_a, dir_b = run_a.iteration(1), run_b.iteration(1)
    generated = (dir_a / "generated.jsonl").read_bytes()
    rejected = (dir_a / "rejected.jsonl").read_bytes()
    assert generated == (dir_b / "generated.jsonl").read_bytes()
    assert rejected == (dir_b / "rejected.jsonl").read_bytes()
    assert summaries[0] == summaries[1]
    assert summaries[0]["accepted"]["total"] > 0 and summaries[0]["rejected_total"] > 0  # both paths taken

    # A kill after most calls: the last 3 journal lines lost, the outputs not yet written.
    lines = (dir_a / "generator_calls.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) > 3
    (dir_a / "generator_calls.jsonl").write_text("".join(lines[:-3]))
    lost_seeds = sorted(json.loads(line)["seed"] for line in lines[-3:])
    (dir_a / "generated.jsonl").unlink()
    (dir_a / "rejected.jsonl").unlink()

    fake.reset()
    summary = asyncio.run(run_generation(config_a, run_a, Iteration(1), FakeServers(fake)))
    assert sorted(body["seed"] for body in fake.bodies("generator")) == lost_seeds
    assert fake.roles() == Counter({"generator": 3})
    assert (dir_a / "generated.jsonl").read_bytes() == generated
    assert (dir_a / "rejected.jsonl").read_bytes() == rejected
    assert summary == summaries[0]


REPEATED = "Explain how migrating arctic terns navigate across open oceans."


def test_generation_accepted_instructions_join_the_novelty_pool(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run")
    run = prepare_iteration(config, student=False)
    write_judgements(run, {r["id"]: ("hard" if i % 2 else "easy") for i, r in enumerate(POOL)})

    def generator(body: dict) -> Reply:
        side, attempt = generator_call_of()[body["seed"]]
        if side == "hard" and attempt in (0, 2):
            return REPEATED, "stop"  # the same new instruction twice
        if side == "hard" and attempt == 1:
            return REPEATED.rstrip("."), "stop"  # the same words, another id
        return novel_sentence(body["seed"]), "stop"

    fake.handlers["generator"] = generator
    asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    directory = run.iteration(1)

    generated = read_jsonl(directory / "generated.jsonl")
    first = next(record for record in generated if record["instruction"] == REPEATED)
    assert first["origin"] == "hard"
    assert sum(1 for record in generated if record["instruction"] == REPEATED) == 1
    assert first["id"] not in {r["id"] for r in POOL}

    rejected = {(r["side"], r["attempt"]): r for r in read_jsonl(directory / "rejected.jsonl")}
    near_copy = rejected[("hard", 1)]
    assert near_copy["reason"] == "too_similar"
    assert near_copy["similar_to"] == first["id"]
    assert near_copy["similarity"] == 1.0
    # The exact same text again has a known id: "duplicate" is decided before the ROUGE-L check.
    assert rejected[("hard", 2)]["reason"] == "duplicate"
    assert rejected[("hard", 2)]["instruction"] == REPEATED
    assert ("hard", 0) not in rejected


def test_generation_waves_are_sized_by_the_expected_then_the_passing_share(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(
        tmp_path / "run", "generation.expected_acceptance=0.75", "generation.max_attempts_factor=8"
    )
    run = prepare_iteration(config, student=False)
    write_judgements(run, {r["id"]: ("hard" if i % 2 else "easy") for i, r in enumerate(POOL)})

    def hard_passes_easy_fails_seven_times(body: dict) -> Reply:
        side, attempt = generator_call_of()[body["seed"]]
        if side == "easy" and attempt < 7:
            return GARBAGE_LIST, "stop"
        return novel_sentence(body["seed"]), "stop"

    fake.handlers["generator"] = hard_passes_easy_fails_seven_times
    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))

    # Wave 1: 8 calls a side (P(Binomial(8, 0.75) >= 3) = 0.996, with 7 calls 0.987). Hard passes
    # 8 and keeps 3; easy passes 1. 9 of 16 passed, so easy's wave 2 for the 2 it lacks is 9 calls
    # (P(Binomial(9, 9/16) >= 2) = 0.993); sized by the 4 of 16 accepted it would be all 16 left.
    assert summary["calls"] == {"hard": 8, "easy": 17}
    assert summary["accepted"] == {"hard": 3, "easy": 3, "total": 6}
    assert summary["rejected"] == {"quota_reached": 5 + 7, "unparseable": 7}
    assert len(fake.bodies("generator")) == 25
