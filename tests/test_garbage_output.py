"""Garbage model output through a whole iteration: every kind is handled and counted in report.json.

Iteration 1 runs stage by stage through lion_local.stages.loop.run_stage (the function `lion-local run`
uses: run the stage, write report.json after generation, mark the stage done), against the fake
endpoint of tests/fake_endpoint.py; imitation really trains the tiny student with
`python -m lion_local.stages.sft`. The fake roles misbehave on purpose:

- teacher: empty and whitespace-only answers (not trained on), answers cut at the length limit;
- student: empty and whitespace-only answers, answers cut at the length limit;
- referee: replies with no scores (prose, nothing, a verdict cut off after one score); one
  instruction unreadable in both orders every time and one in one order (both unjudged, so
  neither hard nor easy, and never a generation seed), one unreadable only on its first attempt;
- generator: its seed repeated verbatim, several instructions at once (a numbered list, a reply
  that echoes the "#New Instruction#" template), an empty reply, then new instructions.

Every count in report.json is checked against what the fake returned and against the journals.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from pathlib import Path

import pytest
from fake_endpoint import FakeEndpoint, FakeServers, Reply

from lion_local.config import Config, load_config
from lion_local.stages.loop import run_stage
from lion_local.run.layout import Stage
from lion_local.run.records import instruction_id, request_seed
from lion_local.roles import parse_generated_instruction, parse_referee_scores
from lion_local.run.layout import RunDir
from lion_local.run.state import read_jsonl, read_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PARSE_RETRIES = 2
SIDES = ("hard", "easy")
ORDERS = ("teacher_first", "student_first")

# The seed instructions (Train Pool = Cache Pool in iteration 1), mutually dissimilar.
POOL_TEXTS = [
    "Write a two-sentence story about a lighthouse keeper who finds a message.",  # 0 teacher: ""
    "Compose a short haiku about morning rain on a city street.",  # 1 teacher: whitespace only
    "Invent a name and a one-line slogan for a bicycle repair shop.",  # 2 teacher: cut; referee: retry
    "Describe a quiet forest at night in two vivid sentences.",  # 3 teacher: cut
    "Draft an opening line for a mystery novel set on a train.",  # 4 student: ""
    "Create a short riddle whose answer is a shadow.",  # 5 student: whitespace only
    "List three practical tips for keeping houseplants alive in winter.",  # 6 student: cut
    "Explain why the sky looks orange at sunset to a curious child.",  # 7 student: cut
    "Suggest a healthy breakfast that takes five minutes to prepare.",  # 8 referee: never readable
    "Give two arguments for planting trees along busy roads.",  # 9 referee: one order unreadable
]
IDS = [instruction_id(text, "") for text in POOL_TEXTS]
INDEX_OF_TEXT = {text: i for i, text in enumerate(POOL_TEXTS)}

TEACHER_EMPTY = {0: "", 1: "  \n\t  "}
TEACHER_CUT = {2, 3}
STUDENT_EMPTY = {4: "", 5: " \n  "}
STUDENT_CUT = {6, 7}
HARD = {0, 2, 4, 6}  # teacher 8, student 5 (gap 3); the other judged ones: 8 / 8 (gap 0)
EASY = {1, 3, 5, 7}
NEVER_READABLE = 8
ONE_ORDER_UNREADABLE = 9  # teacher_first never readable, student_first readable
FIRST_ATTEMPT_UNREADABLE = 2
UNREADABLE_REPLIES = [
    ("Both answers address the question. Assistant 1 is more detailed, while Assistant 2 is shorter.", "stop"),
    ("", "stop"),
    ("Assistant 1 explains the idea well.\nScore of Assistant 1: 8\nScore of Assis", "length"),
]

# What the generator writes, by attempt number (the same on both sides).
LIST_REPLY = "1. Write a limerick about a sleepy cat.\n2. Write a limerick about a busy dog."
ECHO_REPLY = (
    "Describe the smell of rain on dry summer earth.\n\n#New Instruction#:\n"
    "Describe the sound of fresh snow falling at night."
)
KINDS = {0: "repeat", 1: "list", 2: "echo", 3: "empty"}  # attempts 4 and later: new instructions
NOVEL = {
    "hard": [
        "Write a short fable about a tortoise who teaches a falcon patience.",
        "Propose a catchy name for a floating market selling river fish.",
        "Sketch a limerick about an astronomer who loses her telescope.",
        "Outline a toast for the retirement of a village blacksmith.",
    ],
    "easy": [
        "Describe how beekeepers in mountain villages move hives before frost.",
        "Explain how medieval glassblowers colored cathedral windows.",
        "Summarize how lichens survive on bare Antarctic rocks.",
        "Recount how lamplighters worked the gas streetlamps of old London.",
    ],
}
NEW_PER_ITERATION = 4  # quota 2 hard + 2 easy
ATTEMPTS_FACTOR = 4  # budget 8 calls per side


_STUDENT = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n### Response:", re.DOTALL)
_REFEREE = re.compile(
    r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n\[End of Answer of Assistant 1\]"
    r"\n\n\[Answer of Assistant 2\]\n(?P<second>.*?)\n\[End of Answer of Assistant 2\]",
    re.DOTALL,
)
_GENERATOR = re.compile(r"#Given Instruction#:\n(?P<seed>.*?)\n\n#New Instruction#:", re.DOTALL)


def last_content(body: dict) -> str:
    return body["messages"][-1]["content"]


class GarbageRoles:
    """The four fake roles; each logs what it returned so the test can count it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.teacher: dict[int, Reply] = {}
        self.student: dict[int, Reply] = {}
        self.referee: list[dict] = []  # {"index", "order", "attempt", "first", "second", "readable"}
        self.generator: dict[tuple[str, int], dict] = {}  # (side, attempt) -> {"kind", "seed_index", "text"}
        self.referee_key = {
            request_seed(0, "referee", 1, IDS[i], order, attempt): (i, order, attempt)
            for i in range(len(IDS))
            for order in ORDERS
            for attempt in range(PARSE_RETRIES + 1)
        }
        self.generator_key = {
            request_seed(0, "generator", 1, side, attempt): (side, attempt)
            for side in SIDES
            for attempt in range(NEW_PER_ITERATION * ATTEMPTS_FACTOR)
        }

    def install(self, fake: FakeEndpoint) -> None:
        fake.handlers.update(teacher=self.answer_teacher, student=self.answer_student)
        fake.handlers.update(referee=self.review, generator=self.generate)

    def answer_teacher(self, body: dict) -> Reply:
        i = INDEX_OF_TEXT[last_content(body)]
        if i in TEACHER_EMPTY:
            reply = (TEACHER_EMPTY[i], "stop")
        elif i in TEACHER_CUT:
            reply = (f"TEACHER: the beginning of a long answer to question {i}, cut", "length")
        else:
            reply = (f"TEACHER: a complete answer to question {i}.", "stop")
        with self.lock:
            self.teacher[i] = reply
        return reply

    def answer_student(self, body: dict) -> Reply:
        match = _STUDENT.search(body["prompt"])
        assert match, body["prompt"]
        i = INDEX_OF_TEXT[match["instruction"]]
        if i in STUDENT_EMPTY:
            reply = (STUDENT_EMPTY[i], "stop")
        elif i in STUDENT_CUT:
            reply = (f"STUDENT: the start of an answer to question {i}", "length")
        else:
            reply = (f"STUDENT: an answer to question {i}.", "stop")
        with self.lock:
            self.student[i] = reply
        return reply

    def review(self, body: dict) -> Reply:
        i, order, attempt = self.referee_key[body["seed"]]
        match = _REFEREE.search(last_content(body))
        assert match and match["question"] == POOL_TEXTS[i], last_content(body)
        unreadable = (
            i == NEVER_READABLE
            or (i == ONE_ORDER_UNREADABLE and order == "teacher_first")
            or (i == FIRST_ATTEMPT_UNREADABLE and attempt == 0)
        )
        if unreadable:
            reply = UNREADABLE_REPLIES[(i + attempt) % len(UNREADABLE_REPLIES)]
        else:
            teacher, student = (8, 5) if i in HARD else (8, 8)
            first, second = (teacher, student) if order == "teacher_first" else (student, teacher)
            reply = (f"Both answers are on topic.\nScore of Assistant 1: {first}\nScore of Assistant 2: {second}", "stop")
        with self.lock:
            self.referee.append(
                {"index": i, "order": order, "attempt": attempt, "first": match["first"], "second": match["second"],
                 "readable": not unreadable, "text": reply[0]}
            )
        return reply

    def generate(self, body: dict) -> Reply:
        side, attempt = self.generator_key[body["seed"]]
        match = _GENERATOR.search(last_content(body))
        assert match, last_content(body)
        seed_text = match["seed"]
        kind = KINDS.get(attempt, "novel")
        if kind == "novel":
            text = NOVEL[side][attempt - len(KINDS)]
        else:
            repeat = seed_text if side == "hard" else seed_text + "\n"
            text = {"repeat": repeat, "list": LIST_REPLY, "echo": ECHO_REPLY, "empty": ""}[kind]
        with self.lock:
            self.generator[(side, attempt)] = {"kind": kind, "seed_index": INDEX_OF_TEXT[seed_text], "text": text}
        return text, "stop"


@pytest.fixture
def fake():
    endpoint = FakeEndpoint()
    endpoint.start()
    yield endpoint
    endpoint.stop()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def make_config(tmp_path: Path, tiny_models: Path) -> Config:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in POOL_TEXTS))
    return load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            f"seed_data={seeds}",
            f"seed_limit={len(POOL_TEXTS)}",
            f"tiny_models.dir={tiny_models}",
            f"servers.teacher.model={tiny_models / 'teacher'}",
            f"servers.student.model={tiny_models / 'student'}",
            f"roles.referee.parse_retries={PARSE_RETRIES}",
            f"generation.new_per_iteration={NEW_PER_ITERATION}",
            "generation.hard_ratio=0.5",
            f"generation.max_attempts_factor={ATTEMPTS_FACTOR}",
            # A first wave of exactly the quota (attempts 0-1, garbage), then, at the floor of 0.2
            # for the share passing, the rest of the budget (2-7): two novel replies over quota.
            "generation.expected_acceptance=1.0",
            # The scripted referee answers the pool's reviews by their seeds; tests/test_referee_health.py has the controls.
            "discrimination.referee_check.control_pairs=0",
        ],
    )


def test_garbage_output_is_handled_and_counted_in_the_report(fake: FakeEndpoint, tiny_models: Path, tmp_path: Path):
    config = make_config(tmp_path, tiny_models)
    run = RunDir(config.run_dir)
    roles = GarbageRoles()
    roles.install(fake)
    servers = FakeServers(fake)
    markers = ["1/imitation", "1/discrimination", "1/generation"]
    for marker in markers:
        asyncio.run(run_stage(config, run, Stage.parse(marker), servers))

    directory = run.iteration(1)
    report = read_json(directory / "report.json")
    assert read_state(run)["completed"] == markers
    assert set(report["stage_seconds"]) == set(markers)
    assert report["pools"]["train"] == report["pools"]["cache"] == len(POOL_TEXTS)

    # ---- Imitation: empty and whitespace-only teacher answers are empty and not trained on.
    assert sorted(roles.teacher) == list(range(len(POOL_TEXTS)))  # once each: see the call counts below
    empty_teacher = {i for i, (text, _) in roles.teacher.items() if not text.strip()}
    cut_teacher = {i for i, (_, reason) in roles.teacher.items() if reason == "length"}
    assert (empty_teacher, cut_teacher) == (set(TEACHER_EMPTY), TEACHER_CUT)
    cached = {r["id"]: r for r in read_jsonl(run.teacher_answers)}
    assert len(cached) == len(POOL_TEXTS)
    for i, (text, reason) in roles.teacher.items():
        record = cached[IDS[i]]
        assert record["finish_reason"] == reason and record["stage"] == "1/imitation"
        assert record["empty"] == (i in empty_teacher)
        assert record["answer"] == ("" if i in empty_teacher else text)
    imitation = report["imitation"]
    assert imitation["train_pool"] == len(POOL_TEXTS) == 10
    assert imitation["empty_teacher_answers"] == len(empty_teacher) == 2
    assert imitation["truncated_teacher_answers"] == len(cut_teacher) == 2
    assert imitation["examples"] == len(POOL_TEXTS) - len(empty_teacher) == 8
    trained = read_jsonl(directory / "sft_data.jsonl")
    assert [row["id"] for row in trained] == [IDS[i] for i in range(len(POOL_TEXTS)) if i not in empty_teacher]
    for row in trained:  # cut answers are trained on as they came
        assert roles.teacher[IDS.index(row["id"])][0] in row["completion"]
    assert imitation["training"]["examples"] == 8  # what lion_local.stages.sft loaded and trained on
    assert (directory / "student" / "config.json").exists()

    # ---- Discrimination: empty and cut student answers counted; unreadable reviews retried,
    # then unjudged.
    assert sorted(roles.student) == list(range(len(POOL_TEXTS)))
    empty_student = {i for i, (text, _) in roles.student.items() if not text.strip()}
    cut_student = {i for i, (_, reason) in roles.student.items() if reason == "length"}
    assert (empty_student, cut_student) == (set(STUDENT_EMPTY), STUDENT_CUT)
    answers = {r["id"]: r for r in read_jsonl(directory / "student_answers.jsonl")}
    for i, (text, reason) in roles.student.items():
        assert (answers[IDS[i]]["answer"], answers[IDS[i]]["finish_reason"]) == (text, reason)

    for unreadable_text, _ in UNREADABLE_REPLIES:
        assert parse_referee_scores(unreadable_text) is None
    readable_keys = {(r["index"], r["order"]) for r in roles.referee if r["readable"]}
    unjudged = {i for i in range(len(POOL_TEXTS)) if not all((i, order) in readable_keys for order in ORDERS)}
    assert unjudged == {NEVER_READABLE, ONE_ORDER_UNREADABLE}
    attempts = Counter((r["index"], r["order"]) for r in roles.referee)
    for i in range(len(POOL_TEXTS)):
        for order in ORDERS:
            unreadable_every_time = i == NEVER_READABLE or (i == ONE_ORDER_UNREADABLE and order == "teacher_first")
            expected = PARSE_RETRIES + 1 if unreadable_every_time else 2 if i == FIRST_ATTEMPT_UNREADABLE else 1
            assert attempts[(i, order)] == expected, (i, order)
    unreadable_replies = sum(1 for r in roles.referee if not r["readable"])
    assert len(roles.referee) == 2 * 3 + (3 + 1) + 2 * 2 + 7 * 2 == 28
    assert unreadable_replies == 2 * 3 + 3 + 2 == 11
    # The referee saw the empty answers as they were (nothing between the markers).
    for review in roles.referee:
        teacher_seen = review["first"] if review["order"] == "teacher_first" else review["second"]
        student_seen = review["second"] if review["order"] == "teacher_first" else review["first"]
        assert teacher_seen == (roles.teacher[review["index"]][0] if review["index"] not in empty_teacher else "")
        assert student_seen == roles.student[review["index"]][0]

    reviews = read_jsonl(directory / "reviews.jsonl")
    assert len(reviews) == len(roles.referee)
    assert sum(1 for r in reviews if r["scores"] is None) == unreadable_replies
    assert Counter((r["id"], r["order"]) for r in reviews) == Counter(
        {(IDS[i], order): count for (i, order), count in attempts.items()}
    )
    judgements = {j["id"]: j for j in read_jsonl(directory / "judgements.jsonl")}
    assert list(judgements) == IDS
    labels = {i: judgements[IDS[i]]["label"] for i in range(len(POOL_TEXTS))}
    assert {i for i, label in labels.items() if label == "unjudged"} == unjudged
    assert {i for i, label in labels.items() if label == "hard"} == HARD
    assert {i for i, label in labels.items() if label == "easy"} == EASY
    for i in unjudged:
        assert judgements[IDS[i]] == {
            "id": IDS[i], "teacher_score": None, "student_score": None, "gap": None, "label": "unjudged"
        }
    assert judgements[IDS[FIRST_ATTEMPT_UNREADABLE]]["gap"] == 3.0

    discrimination = report["discrimination"]
    assert discrimination["cache_pool"] == len(POOL_TEXTS)
    assert discrimination["empty_student_answers"] == len(empty_student) == 2
    assert discrimination["truncated_student_answers"] == len(cut_student) == 2
    # The referee compared against the teacher's answers of the whole Cache Pool: counted there too.
    assert discrimination["empty_teacher_answers"] == len(empty_teacher) == 2
    assert discrimination["truncated_teacher_answers"] == len(cut_teacher) == 2
    assert discrimination["referee_replies"] == len(roles.referee) == 28
    assert discrimination["unreadable_referee_replies"] == unreadable_replies == 11
    assert report["labels"] == {"hard": len(HARD), "easy": len(EASY), "unjudged": len(unjudged)} == {
        "hard": 4, "easy": 4, "unjudged": 2
    }
    assert (discrimination["hard"], discrimination["easy"], discrimination["unjudged"]) == (4, 4, 2)
    assert report["scores"]["mean_teacher"] == 8.0
    assert report["scores"]["mean_student"] == 6.5  # (4 x 5 + 4 x 8) / 8: unjudged ones are not averaged
    assert report["scores"]["mean_gap"] == 1.5
    assert sum(b["count"] for b in report["scores"]["gap_histogram"]) == len(HARD) + len(EASY)

    # ---- Generation: seeds only from hard and easy instructions; garbage rejected by reason.
    calls = roles.generator
    per_side = Counter(side for side, _ in calls)
    assert per_side == {"hard": 8, "easy": 8}  # every side used its whole budget of ceil(4 x 2)
    for (side, _), call in calls.items():
        assert call["seed_index"] in (HARD if side == "hard" else EASY)  # never an unjudged seed
    kinds = Counter(call["kind"] for call in calls.values())
    assert kinds == {"repeat": 2, "list": 2, "echo": 2, "empty": 2, "novel": 8}
    for kind in ("list", "echo", "empty"):
        assert all(parse_generated_instruction(c["text"]) is None for c in calls.values() if c["kind"] == kind)
    quota = NEW_PER_ITERATION // 2
    novel_per_side = Counter(side for (side, _), call in calls.items() if call["kind"] == "novel")
    expected_rejected = {
        "repeats_seed": kinds["repeat"],
        "unparseable": kinds["list"] + kinds["echo"],
        "empty": kinds["empty"],
        "quota_reached": sum(novel_per_side[side] - quota for side in SIDES),
    }
    assert expected_rejected == {"repeats_seed": 2, "unparseable": 4, "empty": 2, "quota_reached": 4}

    rejected = read_jsonl(directory / "rejected.jsonl")
    generated = read_jsonl(directory / "generated.jsonl")
    reasons = {(r["side"], r["attempt"]): r["reason"] for r in rejected}
    for (side, attempt), call in calls.items():
        expected_reason = {"repeat": "repeats_seed", "list": "unparseable", "echo": "unparseable", "empty": "empty"}
        if call["kind"] in expected_reason:
            assert reasons[(side, attempt)] == expected_reason[call["kind"]]
        if call["kind"] == "repeat":
            entry = next(r for r in rejected if (r["side"], r["attempt"]) == (side, attempt))
            assert entry["instruction"] == POOL_TEXTS[call["seed_index"]] and entry["parent"] == IDS[call["seed_index"]]
    assert sorted((r["origin"], r["instruction"]) for r in generated) == sorted(
        (side, text) for side in SIDES for text in NOVEL[side][:quota]
    )
    for record in generated:
        assert record["parent"] in {IDS[i] for i in (HARD if record["origin"] == "hard" else EASY)}

    generation = report["generation"]
    assert generation["seeds"] == {"hard": len(HARD), "easy": len(EASY)}
    assert generation["quota"] == {"hard": quota, "easy": quota}
    assert generation["calls"] == dict(per_side)
    assert generation["rejected"] == expected_rejected == dict(Counter(r["reason"] for r in rejected))
    assert generation["rejected_total"] == len(rejected) == 12
    assert generation["accepted"] == {"hard": 2, "easy": 2, "total": 4} and len(generated) == 4
    assert generation["shortfall"] == {"hard": 0, "easy": 0, "total": 0}
    assert report["pools"]["generated"] == report["pools"]["next_train"] == 4
    assert report["pools"]["next_cache"] == len(POOL_TEXTS) + 4

    # ---- Calls per role: the teacher once per instruction (discrimination reused the cache).
    assert fake.roles() == {"teacher": 10, "student": 10, "referee": 28, "generator": 16}
    usage = report["roles"]
    assert usage["teacher"]["calls"] == len(roles.teacher) == 10
    assert usage["teacher"]["by_stage"]["imitation"]["calls"] == 10
    assert usage["teacher"]["by_stage"]["discrimination"]["calls"] == 0
    assert usage["student"]["calls"] == len(roles.student) == 10
    assert usage["referee"]["calls"] == len(roles.referee) == 28
    assert usage["generator"]["calls"] == len(calls) == 16
    # The fake counts one completion token per word: empty replies have none.
    assert usage["teacher"]["completion_tokens"] == sum(len(text.split()) for text, _ in roles.teacher.values())
    assert usage["student"]["completion_tokens"] == sum(len(text.split()) for text, _ in roles.student.values())
