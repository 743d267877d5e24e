"""`lion-local evaluate`: the relative score of each student checkpoint, against a fake endpoint.

The fake endpoint of tests/fake_endpoint.py answers as teacher (chat), student (completions)
and judge (a chat holding the referee template, so it is routed as the referee), each from a
script the test sets, so the exact numbers of result.json can be checked against the stored
judgements: the averaging over both orders, a retried unreadable reply that then reads, a
question excluded because one order never reads, the count of unparseable replies, and the
per-category scores. Also: resuming from truncated journals asks only what is missing; a
question edited under the same id is asked again; checkpoint selection; bad question files and
a judge_server naming no server are rejected in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_endpoint import FakeEndpoint, FakeServers, Reply, answering_endpoint

import lion_local.commands.evaluation as evaluation
from lion_local.cli import main
from lion_local.config import Config, ConfigError, load_config
from lion_local.run.questions import QuestionsError, default_questions, load_questions
from lion_local.commands.evaluation import (
    relative_scores,
    run_evaluation,
    select_checkpoints,
    summary_line,
)
from lion_local.run.records import instruction_id, request_seed
from lion_local.errors import StageOrderError
from lion_local.run.layout import FINAL, Iteration, RunDir
from lion_local.run.state import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PARSE_RETRIES = 2

# Five questions; the last has no category and no id (its id is the hash of its text).
QUESTIONS = [
    {"id": "q1", "category": "alpha", "question": "Name three primary colours."},
    {"id": "q2", "category": "alpha", "question": "Explain why ice floats on water."},
    {"id": "q3", "category": "beta", "question": "Write a haiku about autumn leaves."},
    {"id": 4, "category": "beta", "question": "What is the capital of Portugal?"},
    {"question": "Give one tip for a job interview."},
]
Q5 = instruction_id("Give one tip for a job interview.")
ID_OF = {q["question"]: str(q.get("id", Q5)) for q in QUESTIONS}

# What the judge says, as (score of Assistant 1, score of Assistant 2) per attempt; None: unreadable.
TF, SF = "teacher_first", "student_first"
SCRIPT: dict[tuple[str, str], list[tuple[float, float] | None]] = {
    ("q1", TF): [(8, 6)],  # teacher 8, student 6
    ("q1", SF): [(5, 9)],  # student 5, teacher 9       -> teacher 8.5, student 5.5
    ("q2", TF): [None, (7, 7)],  # read on the retry
    ("q2", SF): [(6, 8)],  # -> teacher 7.5, student 6.5
    ("q3", TF): [(9, 1)],
    ("q3", SF): [None, None, None],  # never readable: q3 is excluded
    ("4", TF): [(4, 6)],
    ("4", SF): [(6, 4)],  # -> teacher 4, student 6
    (Q5, TF): [(10, 5)],
    (Q5, SF): [(5, 10)],  # -> teacher 10, student 5
}
# Judged: q1, q2, 4, Q5. Teacher 8.5 + 7.5 + 4 + 10 = 30, student 5.5 + 6.5 + 6 + 5 = 23.
EXPECTED = {
    "checkpoint": "iter_1",
    "iteration": 1,
    "judge": "teacher",
    "questions": 5,
    "judged": 4,
    "excluded_questions": 1,
    "unparseable_judgements": 4,  # q2 teacher_first attempt 0, q3 student_first attempts 0-2
    # q2: a tie teacher first, the teacher better student first; the other three agree.
    "position_inconsistent_share": 0.25,
    "teacher_total": 30.0,
    "student_total": 23.0,
    "relative_score": 76.67,  # 100 * 23 / 30
    "by_category": {
        "alpha": {"questions": 2, "judged": 2, "teacher_total": 16.0, "student_total": 12.0, "relative_score": 75.0},
        "beta": {"questions": 2, "judged": 1, "teacher_total": 4.0, "student_total": 6.0, "relative_score": 150.0},
    },
}

_JUDGE = re.compile(
    r"\[Question\]\n(?P<question>.*?)\n\n\[Answer of Assistant 1\]\n(?P<first>.*?)\n\[End of Answer of Assistant 1\]",
    re.DOTALL,
)
_STUDENT = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n### Response:", re.DOTALL)


def judge_request(body: dict, checkpoint: str = "iter_1") -> tuple[str, str, int]:
    """(question id, order, attempt) of a judge request; the attempt from its sampling seed."""
    match = _JUDGE.search(body["messages"][-1]["content"])
    assert match, body
    qid = ID_OF[match["question"]]
    order = TF if match["first"].startswith("TEACHER:") else SF
    for attempt in range(PARSE_RETRIES + 1):
        if request_seed(0, "evaluation-judge", checkpoint, qid, order, attempt) == body["seed"]:
            return qid, order, attempt
    raise AssertionError(f"judge seed {body['seed']} matches no attempt")


def scripted_judge(body: dict) -> Reply:
    qid, order, attempt = judge_request(body)
    scores = SCRIPT[(qid, order)][attempt]
    if scores is None:
        return "Both answers have merits and flaws.", "stop"
    return f"A short explanation.\nScore of Assistant 1: {scores[0]:g}\nScore of Assistant 2: {scores[1]:g}", "stop"


@pytest.fixture
def fake():
    endpoint = answering_endpoint()
    endpoint.handlers["referee"] = scripted_judge
    yield endpoint
    endpoint.stop()


def make_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(
        ROOT / "configs/tiny-cpu.yaml",
        # The checkpoints here are stand-ins without weights: no likelihood (tests/test_likelihood.py has it).
        [f"run_dir={run_dir}", f"roles.referee.parse_retries={PARSE_RETRIES}", "evaluation.likelihood=false", *overrides],
    )


def add_checkpoint(run: RunDir, k: int | str) -> None:
    """A student directory that counts as a finished checkpoint (see imitation.is_checkpoint)."""
    student = run.at(Iteration.parse(str(k))).student
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    (student / "model.safetensors").write_bytes(b"")


def write_questions(path: Path, questions: list[dict] = QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def asked_judgements(fake: FakeEndpoint) -> Counter:
    return Counter(judge_request(body) for body in fake.bodies("referee"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path: Path):
    config = make_config(tmp_path / "run")
    run = RunDir(config.run_dir)
    add_checkpoint(run, 1)
    questions = load_questions(write_questions(tmp_path / "questions.jsonl"))
    return config, run, questions


# ----------------------------------------------------------------------------------------------
# The arithmetic, against the stored judgements
# ----------------------------------------------------------------------------------------------


def test_relative_score_arithmetic_matches_the_stored_judgements(fake: FakeEndpoint, setup):
    config, run, questions = setup
    servers = FakeServers(fake)

    [result] = asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, servers))

    directory = run.root / "eval" / "iter_1"
    assert result == EXPECTED
    assert json.loads((directory / "result.json").read_text()) == EXPECTED
    assert summary_line(result) == "iter_1: student at 76.67% of the teacher (4 of 5 questions judged, 4 unparseable judgements)"

    # Every judge reply is journaled, readable or not, with its attempt; a readable one ends its order.
    judgements = read_jsonl(directory / "judgements.jsonl")
    expected_calls = Counter({(qid, order, a): 1 for (qid, order), replies in SCRIPT.items() for a in range(len(replies))})
    assert asked_judgements(fake) == expected_calls
    assert Counter((j["id"], j["order"], j["attempt"]) for j in judgements) == expected_calls
    for j in judgements:
        scripted = SCRIPT[(j["id"], j["order"])][j["attempt"]]
        assert j["scores"] == (None if scripted is None else [float(s) for s in scripted])
        assert j["raw"] and j["finish_reason"] == "stop"
        assert j["seed"] == request_seed(config.seed, "evaluation-judge", "iter_1", j["id"], j["order"], j["attempt"])

    # Recomputed by hand from the stored judgements: first readable reply per order, both orders needed.
    readable = {(j["id"], j["order"]): j["scores"] for j in judgements if j["scores"] is not None}
    teacher = {q["id"]: (readable[(q["id"], TF)][0] + readable[(q["id"], SF)][1]) / 2
               for q in questions if (q["id"], TF) in readable and (q["id"], SF) in readable}
    student = {q["id"]: (readable[(q["id"], TF)][1] + readable[(q["id"], SF)][0]) / 2 for q in questions if q["id"] in teacher}
    assert sorted(teacher) == sorted(["q1", "q2", "4", Q5])
    assert (teacher["q1"], student["q1"]) == (8.5, 5.5)
    assert (teacher["q2"], student["q2"]) == (7.5, 6.5)
    assert (teacher["4"], student["4"]) == (4.0, 6.0)
    assert result["teacher_total"] == sum(teacher.values()) and result["student_total"] == sum(student.values())
    assert result["relative_score"] == round(100 * sum(student.values()) / sum(teacher.values()), 2)
    assert result["unparseable_judgements"] == sum(1 for j in judgements if j["scores"] is None)
    assert {k: v for k, v in result.items() if k not in ("checkpoint", "iteration", "judge")} == relative_scores(
        questions, judgements
    )

    # One teacher and one student answer per question, the student served from its checkpoint.
    assert len(fake.bodies("teacher")) == len(fake.bodies("student")) == len(QUESTIONS)
    assert sorted(r["id"] for r in read_jsonl(run.root / "eval" / "teacher_answers.jsonl")) == sorted(ID_OF.values())
    assert ("student", str(run.iteration(1).student)) in servers.clients and "student" in servers.stopped
    assert ("teacher", None) in servers.clients  # the judge defaults to the referee's server
    # Nothing outside eval/ was written.
    assert sorted(p.name for p in run.root.iterdir()) == ["eval", "iter_1"]


def test_relative_scores_edge_cases():
    questions = [{"id": "a", "question": "A?", "category": None}, {"id": "b", "question": "B?", "category": "x"}]
    nothing = relative_scores(questions, [{"id": "a", "order": TF, "attempt": 0, "scores": None}])
    assert nothing == {
        "questions": 2, "judged": 0, "excluded_questions": 2, "unparseable_judgements": 1,
        "position_inconsistent_share": None, "teacher_total": 0, "student_total": 0, "relative_score": None,
        "by_category": {"x": {"questions": 1, "judged": 0, "teacher_total": 0, "student_total": 0, "relative_score": None}},
    }
    assert summary_line({"checkpoint": "final", **nothing}) == (
        "final: no relative score (0 of 2 questions judged, 1 unparseable judgements)"
    )
    # The first readable reply of an order counts; a later one (a stray duplicate) does not.
    judgements = [
        {"id": "a", "order": TF, "attempt": 0, "scores": [6.0, 3.0]},
        {"id": "a", "order": TF, "attempt": 1, "scores": [1.0, 10.0]},
        {"id": "a", "order": SF, "attempt": 0, "scores": [5.0, 7.0]},
    ]
    result = relative_scores(questions, judgements)
    assert (result["teacher_total"], result["student_total"], result["relative_score"]) == (6.5, 4.0, 61.54)
    assert result["by_category"]["x"]["judged"] == 0


def test_judge_server_from_config(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(
        tmp_path / "run",
        "servers.judge={engine: external, base_urls: ['http://127.0.0.1:9/v1'], served_model_name: big}",
        "evaluation.judge_server=judge",
        "evaluation.parse_retries=0",
    )
    run = RunDir(config.run_dir)
    add_checkpoint(run, "final")
    questions = load_questions(write_questions(tmp_path / "q.jsonl", QUESTIONS[:3]))
    servers = FakeServers(fake)

    def judge(body: dict) -> Reply:
        question = _JUDGE.search(body["messages"][-1]["content"])["question"]
        return "Hmm." if ID_OF[question] == "q2" else "Score of Assistant 1: 6\nScore of Assistant 2: 6", "stop"

    fake.handlers["referee"] = judge

    [result] = asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, servers))

    assert ("judge", None) in servers.clients
    assert (result["checkpoint"], result["iteration"], result["judge"]) == ("final", "final", "judge")
    # parse_retries 0: q2's two unreadable replies are not asked again.
    assert fake.roles()["referee"] == 6
    assert (result["judged"], result["excluded_questions"], result["unparseable_judgements"]) == (2, 1, 2)
    assert result["relative_score"] == 100.0


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------


def test_resume_from_truncated_journals_asks_only_what_is_missing(fake: FakeEndpoint, setup):
    config, run, questions = setup
    [first] = asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, FakeServers(fake)))
    eval_dir = run.root / "eval"
    first_judgements = read_jsonl(eval_dir / "iter_1" / "judgements.jsonl")

    # A kill half way: no result yet, half of each journal kept, the judgements' last line torn.
    (eval_dir / "iter_1" / "result.json").unlink()
    lost: dict[str, list[dict]] = {}
    for name in ("teacher_answers.jsonl", "iter_1/student_answers.jsonl", "iter_1/judgements.jsonl"):
        lines = (eval_dir / name).read_text().splitlines(keepends=True)
        keep = len(lines) // 2
        torn = lines[keep][: len(lines[keep]) // 2] if name.endswith("judgements.jsonl") else ""
        (eval_dir / name).write_text("".join(lines[:keep]) + torn)
        lost[name] = [json.loads(line) for line in lines[keep:]]
        assert lost[name]

    fake.reset()
    [result] = asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, FakeServers(fake)))

    assert result == first == EXPECTED
    assert sorted(ID_OF[b["messages"][-1]["content"]] for b in fake.bodies("teacher")) == sorted(
        r["id"] for r in lost["teacher_answers.jsonl"]
    )
    assert sorted(ID_OF[_STUDENT.search(b["prompt"])["instruction"]] for b in fake.bodies("student")) == sorted(
        r["id"] for r in lost["iter_1/student_answers.jsonl"]
    )
    assert asked_judgements(fake) == Counter((r["id"], r["order"], r["attempt"]) for r in lost["iter_1/judgements.jsonl"])
    key = lambda r: (r["id"], r["order"], r["attempt"])  # noqa: E731
    assert sorted(map(key, read_jsonl(eval_dir / "iter_1" / "judgements.jsonl"))) == sorted(map(key, first_judgements))

    # Everything journaled: a third run asks nothing and starts no server.
    fake.reset()
    servers = FakeServers(fake)
    assert asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, servers)) == [EXPECTED]
    assert fake.roles() == Counter() and servers.clients == []


def test_a_question_edited_under_the_same_id_is_asked_again(fake: FakeEndpoint, setup, tmp_path: Path):
    config, run, questions = setup
    asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, FakeServers(fake)))
    edited_text = "Name three secondary colours."
    edited = [{**QUESTIONS[0], "question": edited_text}, *QUESTIONS[1:]]

    def judge(body: dict) -> Reply:
        match = _JUDGE.search(body["messages"][-1]["content"])
        if match["question"] != edited_text:
            return scripted_judge(body)
        teacher_first = match["first"].startswith("TEACHER:")
        return f"Score of Assistant 1: {8 if teacher_first else 5}\nScore of Assistant 2: {6 if teacher_first else 9}", "stop"

    fake.reset()
    fake.handlers["referee"] = judge
    questions = load_questions(write_questions(tmp_path / "edited.jsonl", edited))
    [result] = asyncio.run(run_evaluation(config, run, select_checkpoints(run), questions, FakeServers(fake)))

    # Only q1 is asked again, of the teacher, the student and the judge (both orders).
    assert fake.roles() == Counter({"teacher": 1, "student": 1, "referee": 2})
    assert [b["messages"][-1]["content"] for b in fake.bodies("teacher")] == [edited_text]
    assert all(_JUDGE.search(b["messages"][-1]["content"])["question"] == edited_text for b in fake.bodies("referee"))
    assert result == EXPECTED  # the same scores for the new q1


# ----------------------------------------------------------------------------------------------
# Checkpoints, question files and config
# ----------------------------------------------------------------------------------------------


def test_checkpoint_selection(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(StageOrderError, match="no student checkpoint to evaluate yet; run imitation first"):
        select_checkpoints(run)
    for k in (1, 2, 10, "final"):
        add_checkpoint(run, k)
    (run.iteration(3) / "student.partial").mkdir(parents=True)  # training under way: not a checkpoint
    (run.iteration(2).student / "model.safetensors").unlink()  # incomplete: not a checkpoint
    assert [(c.name, c.iteration, c.path) for c in select_checkpoints(run)] == [
        ("iter_1", Iteration(1), run.iteration(1).student),
        ("iter_10", Iteration(10), run.iteration(10).student),
        ("final", FINAL, run.final.student),
    ]
    assert [c.name for c in select_checkpoints(run, Iteration(10))] == ["iter_10"]
    assert [c.name for c in select_checkpoints(run, FINAL)] == ["final"]
    for missing in (2, 3):
        with pytest.raises(StageOrderError, match=f"no student checkpoint of iteration {missing} to evaluate"):
            select_checkpoints(run, Iteration(missing))


def test_the_default_question_set_ships_with_the_package():
    questions = load_questions(default_questions())
    assert len(questions) == 40
    assert Counter(q["category"] for q in questions) == {c: 5 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "knowledge", "common-sense", "generic")}
    assert (ROOT / "lion_local/data/EVAL_QUESTIONS.md").read_text().count("CC0") >= 1
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"data/*.jsonl"' in pyproject


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "A?"}', '{"question": "B?"'], ":2: invalid JSON"),
        (['["A?"]'], ":1: expected an object with a 'question' field, got list"),
        (['{"question": "A?"}', "", '{"prompt": "B?"}'], ":3: field 'question' is missing"),
        (['{"question": "  "}'], ":1: field 'question' is empty"),
        (['{"question": 3}'], ":1: field 'question' is not a string"),
        (['{"question": "A?", "category": 1}'], ":1: field 'category' must be a string, not int"),
        (['{"question": "A?", "id": true}'], ":1: field 'id' must be a non-empty string or an integer"),
        (['{"question": "A?", "id": 7}', '{"question": "B?", "id": "7"}'], ":2: id '7' repeats the one at line 1"),
        (['{"question": "A?"}', '{"question": " A? "}'], ":2: id '"),
        (["", "  "], ": the question file holds no questions"),
    ],
)
def test_bad_question_files_name_the_file_and_line(tmp_path: Path, lines: list[str], message: str):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QuestionsError) as caught:
        load_questions(path)
    assert str(caught.value).startswith(f"{path}{message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_question_file(tmp_path: Path):
    with pytest.raises(QuestionsError, match="question file not found"):
        load_questions(tmp_path / "none.jsonl")


def cli(*args: str):
    return CliRunner().invoke(main, ["evaluate", "--config", str(ROOT / "configs/tiny-cpu.yaml"), *args])


def test_cli_rejects_bad_inputs_in_one_line_before_writing(tmp_path: Path):
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "A?"}\n{"question": ""}\n')
    add_checkpoint(RunDir(run_dir), 1)
    before = snapshot(tmp_path)
    # exit 2: a bad input; exit 3: a checkpoint asked for before its imitation ran
    cases = [
        (["--questions", str(bad)], 2, f"error: {bad}:2: field 'question' is empty"),
        (["--set", f"evaluation.questions={bad}"], 2, f"error: {bad}:2: field 'question' is empty"),
        (["--iteration", "2"], 3, f"error: {RunDir(run_dir).iteration(2).student}: no student checkpoint of iteration 2"),
        (["--set", "evaluation.judge_server=teachr"], 2, "error: --set: evaluation.judge_server: no server named 'teachr'"),
    ]
    for args, code, start in cases:
        result = cli("--set", f"run_dir={run_dir}", *args)
        assert result.exit_code == code, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
    result = cli("--set", f"run_dir={tmp_path / 'empty'}")
    assert result.exit_code == 3 and "no student checkpoint to evaluate yet" in result.output
    result = cli("--set", f"run_dir={run_dir}", "--iteration", "two")
    assert result.exit_code == 2 and "'two' is not an iteration" in result.output
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line, not click's usage text
    assert snapshot(tmp_path) == before


def test_cli_evaluates_every_checkpoint_and_prints_one_line_each(fake: FakeEndpoint, tmp_path: Path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lion_local")  # under pytest, the CLI's basicConfig does nothing
    run = RunDir(tmp_path / "run")
    add_checkpoint(run, 1)
    add_checkpoint(run, "final")
    questions = write_questions(tmp_path / "questions.jsonl")
    fake.handlers["referee"] = lambda body: ("Score of Assistant 1: 8\nScore of Assistant 2: 4", "stop")

    @asynccontextmanager
    async def fake_server_set(config, log_dir):
        yield FakeServers(fake)

    monkeypatch.setattr(evaluation, "ServerSet", fake_server_set)
    teacher = tmp_path / "teacher"  # a stand-in: what the checks before a start look at (the fake serves it)
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "llama"}')
    (teacher / "model.safetensors").write_bytes(b"")
    result = cli(
        "--set", f"run_dir={run.root}", "--set", "tiny_models=null", "--set", f"servers.teacher.model={teacher}",
        "--set", "evaluation.likelihood=false", "--questions", str(questions),
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "iter_1: student at 100% of the teacher (5 of 5 questions judged, 0 unparseable judgements)",
        "final: student at 100% of the teacher (5 of 5 questions judged, 0 unparseable judgements)",
    ]
    assert json.loads((run.root / "eval/final/result.json").read_text())["iteration"] == "final"
    assert fake.roles() == Counter({"teacher": 5, "student": 10, "referee": 20})  # teacher answers shared
    assert "evaluation: iter_1: student at 100%" in (run.logs / "lion-local.log").read_text()
    assert sorted(p.name for p in run.root.iterdir()) == [".lock", "eval", "final", "iter_1", "logs"]


def test_config_judge_server_must_name_a_server_other_than_the_students(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"evaluation.judge_server: no server named 'teachr' \(did you mean 'teacher'\?\)"):
        make_config(tmp_path, "evaluation.judge_server=teachr")
    with pytest.raises(ConfigError, match="evaluation.judge_server: 'student' serves the student's checkpoints"):
        make_config(tmp_path, "evaluation.judge_server=student")
    with pytest.raises(ConfigError, match="did you mean 'evaluation.judge_server'"):
        make_config(tmp_path, "evaluation.judge=teacher")
    config = make_config(tmp_path, "evaluation.questions=some/questions.jsonl")
    assert config.evaluation.questions == str(Path("some/questions.jsonl").resolve())
    assert config.evaluation.judge_server is None and config.evaluation.parse_retries is None
