"""Decontamination: generated instructions too close to an evaluation question are rejected.

- The index (lion_local.stages.decontamination): a paraphrase of a question above the ROUGE-L
  threshold is caught with rouge-score's own F; a 13-word run copied inside a longer instruction
  (ROUGE-L diluted below the threshold) is caught by the n-gram check; clean instructions pass;
  the boundaries: F equal to the threshold is kept, a run of n words is caught and one of n - 1
  is not, an instruction shorter than n words is checked by ROUGE-L only.
- The generation stage against the fake endpoint: contaminated replies are rejected as
  `contaminated` with the question's id, never count as passing for the waves, and are counted
  in generation.json, the iteration report and report.md's generation table; with the check
  off the same replies are accepted.
- Config: the keys validate and resolve, an unknown key or a bad value is one line, a missing
  question file is a one-line error before any generator call.
- `lion-local evaluate` warns when its question file was not part of the decontamination;
  `lion-local plan` shows the contaminated count of finished generation stages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from fake_endpoint import FakeEndpoint, FakeServers, Reply
from test_stages_with_fake_endpoints import (  # noqa: F401 (fake: the fixture)
    POOL,
    fake,
    generator_call_of,
    make_config,
    novel_sentence,
    prepare_iteration,
    read_json,
    write_judgements,
)

from lion_local.commands.evaluation import warn_if_not_decontaminated
from lion_local.commands.plan import build_plan, plan_lines
from lion_local.commands.report import collect, rejection_rows
from lion_local.config import ConfigError, load_config
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.questions import QuestionsError, default_questions, load_questions
from lion_local.run.state import read_jsonl, write_atomic, write_jsonl_atomic
from lion_local.stages.decontamination import DecontaminationIndex, decontamination_index, question_files, words
from lion_local.stages.generation import run_generation
from lion_local.stages.iteration_report import iteration_report

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {q["id"]: q["question"] for q in load_questions(default_questions())}
ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

# writing-1, reworded: most of its words, in order.
PARAPHRASE = (
    "Write a short and friendly email to your neighbour asking them to water the plants while you are away "
    "for one week."
)
# 14 words of writing-4 inside a much longer instruction.
COPIED_RUN = (
    "Write a short comic play for three actors in which a nervous office manager announces that due to the "
    "fact that the meeting was running late, it was decided by the team that lunch is cancelled, and the "
    "staff answer with jokes, complaints and finally a song about sandwiches."
)
CLEAN = [
    "Describe how a glacier carves a valley over thousands of years.",
    "Suggest three names for a bakery that sells only sourdough bread.",
    novel_sentence(7),
]


def rouge_f(question: str, instruction: str) -> float:
    return ROUGE.score(question, instruction)["rougeL"].fmeasure


def builtin_index(**settings) -> DecontaminationIndex:
    return DecontaminationIndex(load_questions(default_questions()), **settings)


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


def test_a_paraphrase_above_the_rouge_threshold_is_caught_with_rouge_scores_value():
    expected = rouge_f(BUILTIN["writing-1"], PARAPHRASE)
    assert expected > 0.7
    assert builtin_index().check(PARAPHRASE) == {"question": "writing-1", "question_similarity": round(expected, 6)}
    # A verbatim question is caught too.
    assert builtin_index().check(BUILTIN["math-5"])["question"] == "math-5"


def test_a_thirteen_word_run_inside_a_longer_instruction_is_caught():
    assert max(rouge_f(question, COPIED_RUN) for question in BUILTIN.values()) <= 0.7  # ROUGE-L alone misses it
    found = builtin_index().check(COPIED_RUN)
    assert found["question"] == "writing-4" and "question_similarity" not in found
    assert found["shared_ngram"] == "due to the fact that the meeting was running late it was decided"
    assert len(found["shared_ngram"].split()) == 13


@pytest.mark.parametrize("instruction", CLEAN)
def test_clean_instructions_pass(instruction: str):
    assert builtin_index().check(instruction) is None


def test_the_rouge_threshold_keeps_an_instruction_at_it_and_rejects_one_above():
    question = [{"id": "q", "question": "Name three rivers that flow through more than two countries."}]
    instruction = "Name three rivers that flow through Africa."
    similarity = rouge_f(question[0]["question"], instruction)
    assert DecontaminationIndex(question, rouge_threshold=similarity, ngram=50).check(instruction) is None
    below = math.nextafter(similarity, 0.0)
    found = DecontaminationIndex(question, rouge_threshold=below, ngram=50).check(instruction)
    assert found == {"question": "q", "question_similarity": round(similarity, 6)}


def test_the_ngram_boundary_case_and_punctuation_and_short_instructions():
    question = [{"id": "q", "question": "One two three four five six seven eight nine ten eleven twelve thirteen."}]
    run_of = lambda n: " ".join(words(question[0]["question"])[:n])  # noqa: E731
    padding = " ".join(f"pad{i}" for i in range(60))  # keeps ROUGE-L far below the threshold
    index = DecontaminationIndex(question, rouge_threshold=0.7, ngram=5)
    assert index.check(f"{padding} {run_of(5)} {padding}") == {"question": "q", "shared_ngram": run_of(5)}
    assert index.check(f"{padding} {run_of(4)} {padding}") is None
    # Case and punctuation do not matter.
    assert index.check(f"{padding} ONE, two; Three -- four! five {padding}")["shared_ngram"] == run_of(5)
    # Fewer words than n: no n-gram, only ROUGE-L (here off, threshold 1) checks it.
    assert DecontaminationIndex(question, rouge_threshold=1.0, ngram=13).check(run_of(12)) is None
    assert DecontaminationIndex(question, rouge_threshold=1.0, ngram=12).check(run_of(12))["question"] == "q"
    with pytest.raises(ValueError):
        DecontaminationIndex(question, ngram=0)


def test_an_empty_question_set_contaminates_nothing():
    assert DecontaminationIndex([]).check(PARAPHRASE) is None


# ----------------------------------------------------------------------------------------------
# The generation stage
# ----------------------------------------------------------------------------------------------


def write_questions(path: Path, questions: list[dict]) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return path


def contaminating_generator(body: dict) -> Reply:
    """Attempt 0 of each side copies an evaluation question (hard: a paraphrase of a built-in one;
    easy: a 13-word run of the extra file's question); every other reply is novel."""
    side, attempt = generator_call_of()[body["seed"]]
    if attempt == 0:
        if side == "hard":
            return PARAPHRASE, "stop"
        return f"Plan a surprise party at which {EXTRA_RUN}, and keep it secret.", "stop"
    return novel_sentence(body["seed"]), "stop"


EXTRA_RUN = "the guests arrive at seven and the band starts playing jazz in the garden"  # 14 words
EXTRA_QUESTION = (
    "Describe an evening at which " + EXTRA_RUN + " under the old oak tree while the neighbours complain about "
    "the noise and the cake melts."
)


def test_generation_rejects_contaminated_replies_and_counts_them(fake: FakeEndpoint, tmp_path: Path):
    extra = write_questions(tmp_path / "extra.jsonl", [{"id": "party", "question": EXTRA_QUESTION}])
    # Every reply is expected to pass: the first wave is exactly the quota, 3 a side.
    config = make_config(
        tmp_path / "run", "generation.expected_acceptance=1.0", f"generation.decontamination.question_files=[{extra}]"
    )
    run = prepare_iteration(config, student=False)
    write_judgements(run, {record["id"]: ("hard", "easy")[i % 2] for i, record in enumerate(POOL)})
    fake.handlers["generator"] = contaminating_generator

    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    directory = run.iteration(1)

    rejected = read_jsonl(directory / "rejected.jsonl")
    contaminated = [r for r in rejected if r["reason"] == "contaminated"]
    assert [(r["side"], r["attempt"], r["question"]) for r in contaminated] == [("hard", 0, "writing-1"), ("easy", 0, "party")]
    assert contaminated[0]["question_similarity"] == round(rouge_f(BUILTIN["writing-1"], PARAPHRASE), 6)
    assert len(contaminated[1]["shared_ngram"].split()) == 13 and "question_similarity" not in contaminated[1]
    assert all("similarity" not in r for r in contaminated)  # never compared with the pool
    generated = read_jsonl(directory / "generated.jsonl")
    assert len(generated) == 6 and PARAPHRASE not in {r["instruction"] for r in generated}
    assert summary["accepted"] == {"hard": 3, "easy": 3, "total": 6}
    assert summary["rejected"]["contaminated"] == 2
    # Not passed for the waves: 4 of 6 passed, so the second wave is sized at 2/3 (3 calls a
    # side, its budget's rest), not at 1.0 (1 call a side).
    assert summary["calls"] == {"hard": 6, "easy": 6}
    assert read_json(directory / "generation.json") == summary
    # Every check is recorded with what it was given and what it rejected, 0 included.
    checks = summary["checks"]
    assert checks["decontamination"] == {
        "questions": len(BUILTIN) + 1, "checked": 12, "rejected": 2, "rouge_threshold": 0.7, "ngram": 13,
    }
    assert checks["novelty"]["checked"] == 10 and checks["novelty"]["rejected"] == summary["rejected"].get("too_similar", 0)
    assert checks["filters"]["too_short"] == 0 and checks["filters"]["non_ascii_start"] == "off"

    report = iteration_report(run, Iteration(1))
    assert report["generation"]["rejected"]["contaminated"] == 2
    write_atomic(directory / "report.json", json.dumps(report) + "\n")
    header, rows = rejection_rows(collect(run))
    assert ["rejected: contaminated", "2"] in rows, rows

    # The same replies with the check off: both attempt-0 replies are accepted.
    off = make_config(tmp_path / "off", "generation.expected_acceptance=1.0", "generation.decontamination.enabled=false")
    run_off = prepare_iteration(off, student=False)
    write_judgements(run_off, {record["id"]: ("hard", "easy")[i % 2] for i, record in enumerate(POOL)})
    summary_off = asyncio.run(run_generation(off, run_off, Iteration(1), FakeServers(fake)))
    assert "contaminated" not in summary_off["rejected"] and summary_off["calls"] == {"hard": 3, "easy": 3}
    assert PARAPHRASE in {r["instruction"] for r in read_jsonl(run_off.iteration(1) / "generated.jsonl")}
    assert summary_off["checks"]["decontamination"] == "off"


def test_a_decontamination_that_rejected_nothing_is_in_the_report(fake: FakeEndpoint, tmp_path: Path):
    config = make_config(tmp_path / "run", "generation.expected_acceptance=1.0")
    run = prepare_iteration(config, student=False)
    write_judgements(run, {record["id"]: ("hard", "easy")[i % 2] for i, record in enumerate(POOL)})
    fake.handlers["generator"] = lambda body: (novel_sentence(body["seed"]), "stop")

    summary = asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))

    assert "contaminated" not in summary["rejected"]
    assert summary["checks"]["decontamination"]["questions"] == len(BUILTIN)
    assert summary["checks"]["decontamination"]["checked"] == 6 and summary["checks"]["decontamination"]["rejected"] == 0
    report = iteration_report(run, Iteration(1))
    assert report["generation"]["checks"]["decontamination"]["rejected"] == 0


def test_a_missing_question_file_is_one_line_before_any_generator_call(fake: FakeEndpoint, tmp_path: Path):
    missing = tmp_path / "nowhere.jsonl"
    config = make_config(tmp_path / "run", f"generation.decontamination.question_files=[{missing}]")
    with pytest.raises(QuestionsError) as error:
        decontamination_index(config)
    message = str(error.value)
    assert "\n" not in message and "generation.decontamination.question_files" in message and str(missing) in message
    run = prepare_iteration(config, student=False)
    write_judgements(run, {record["id"]: "hard" for record in POOL})
    fake.handlers["generator"] = contaminating_generator
    with pytest.raises(QuestionsError):
        asyncio.run(run_generation(config, run, Iteration(1), FakeServers(fake)))
    assert fake.bodies("generator") == []
    assert error.value.exit_code == 2


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_the_decontamination_keys_validate_and_resolve(tmp_path: Path, monkeypatch):
    config = load_config(ROOT / "configs/tiny-cpu.yaml")
    settings = config.generation.decontamination
    assert (settings.enabled, settings.include_builtin_questions, settings.question_files) == (True, True, [])
    assert (settings.rouge_threshold, settings.ngram) == (0.7, 13)
    assert question_files(config) == [default_questions().resolve()]
    monkeypatch.chdir(tmp_path)
    config = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            "generation.decontamination.question_files=[mine.jsonl, sub/theirs.jsonl]",
            "generation.decontamination.include_builtin_questions=false",
            "generation.decontamination.rouge_threshold=0.5",
            "generation.decontamination.ngram=8",
        ],
    )
    resolved = [str(tmp_path / "mine.jsonl"), str(tmp_path / "sub/theirs.jsonl")]
    assert config.generation.decontamination.question_files == resolved
    assert question_files(config) == [Path(p) for p in resolved]
    off = load_config(ROOT / "configs/tiny-cpu.yaml", ["generation.decontamination.enabled=false"])
    assert question_files(off) == [] and decontamination_index(off) is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("generation.decontamination.treshold=0.5", "unknown key 'generation.decontamination.treshold'"),
        ("generation.decontamination.rouge_threshold=0", "generation.decontamination.rouge_threshold"),
        ("generation.decontamination.rouge_threshold=1.5", "generation.decontamination.rouge_threshold"),
        ("generation.decontamination.ngram=0", "generation.decontamination.ngram"),
        ("generation.decontamination.question_files=one.jsonl", "generation.decontamination.question_files"),
    ],
)
def test_bad_decontamination_keys_are_one_line(override: str, expected: str):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs/tiny-cpu.yaml", [override])
    assert expected in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# evaluate and plan
# ----------------------------------------------------------------------------------------------


def test_evaluate_warns_when_its_questions_were_not_decontaminated(tmp_path: Path, monkeypatch, caplog):
    mine = write_questions(tmp_path / "mine.jsonl", [{"id": "x", "question": "What is a prime number?"}])
    default = load_config(ROOT / "configs/tiny-cpu.yaml")
    covered = load_config(ROOT / "configs/tiny-cpu.yaml", [f"generation.decontamination.question_files=[{mine}]"])
    no_builtin = load_config(ROOT / "configs/tiny-cpu.yaml", ["generation.decontamination.include_builtin_questions=false"])
    off = load_config(ROOT / "configs/tiny-cpu.yaml", ["generation.decontamination.enabled=false"])
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="lion_local.commands.evaluation")
    assert not warn_if_not_decontaminated(default, default_questions())
    assert not warn_if_not_decontaminated(covered, Path("mine.jsonl"))  # compared by resolved path
    assert not caplog.records
    assert warn_if_not_decontaminated(default, Path("mine.jsonl"))
    assert warn_if_not_decontaminated(no_builtin, default_questions())
    assert warn_if_not_decontaminated(off, default_questions())
    assert len(caplog.records) == 3 and all("\n" not in r.getMessage() for r in caplog.records)
    assert "is off" in caplog.records[-1].getMessage() and "mine.jsonl" in caplog.records[0].getMessage()


def test_plan_shows_the_contaminated_replies_of_finished_generations(tmp_path: Path):
    from test_plan import DEMO_STAGES, _config, _fake_run

    config = _config(tmp_path)
    assert "generator_contaminated" not in build_plan(config)
    run = _fake_run(config, DEMO_STAGES[:3], accepted={1: 12}, generator_calls={1: 20})
    rejected = [{"instruction": f"task {i}", "reason": "contaminated", "question": "writing-1"} for i in range(3)]
    write_jsonl_atomic(RunDir(config.run_dir).iteration(1) / "rejected.jsonl", rejected)
    plan = build_plan(config)
    assert plan["generator_contaminated"] == {"contaminated": 3, "replies": 20}
    assert run.root == Path(plan["run_dir"])
    assert any("contaminated 3 of 20 replies" in line for line in plan_lines(plan)[:4])
