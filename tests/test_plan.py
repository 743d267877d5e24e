"""`lion-local plan`: predicted calls and tokens per role and stage, and actual ones once a run has started.

Run directories are built here in the real stage formats (pools through records.pools_for,
judgements through discrimination.judge), so nothing depends on a run of the demo existing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import Config, load_config
from lion_local.stages.discrimination import judge
from lion_local.commands.plan import build_plan, plan_lines
from lion_local.run.records import instruction_record, pools_for
from lion_local.run.layout import FINAL, Iteration, RunDir
from lion_local.run.state import write_atomic, write_jsonl_atomic
from lion_local.run.seed_data import SeedDataError

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SEEDS = ROOT / "lion_local/data/smoke_seed.jsonl"


def _overrides(tmp_path: Path, *more: str) -> list[str]:
    # No teacher model directory: prompt tokens are estimated at 4 characters per token.
    return [
        f"run_dir={tmp_path / 'run'}",
        f"seed_data={SMOKE_SEEDS}",
        f"servers.teacher.model={tmp_path / 'no-teacher'}",
        *more,
    ]


def _config(tmp_path: Path, *more: str) -> Config:
    """configs/tiny-cpu.yaml (48 seeds, 2 iterations of 16 new, final imitation), run in tmp_path."""
    return load_config(ROOT / "configs/tiny-cpu.yaml", _overrides(tmp_path, *more))


def _calls(plan: dict) -> dict[tuple[str, str], int]:
    return {(row["stage"], row["role"]): row["calls"] for row in plan["rows"]}


def _call(prompt: int, completion: int) -> dict:
    return {"finish_reason": "stop", "seed": 1, "prompt_tokens": prompt, "completion_tokens": completion, "seconds": 0.01}


def _fake_run(
    config: Config,
    completed: list[str],
    accepted: dict[int, int],
    generator_calls: dict[int, int],
    unreadable: dict[int, int] | None = None,
) -> RunDir:
    """Write what the stages in `completed` write, in their formats, with fixed tokens per call:
    teacher 20/10, student 50/30, referee 200/40, generator 120/8 (prompt/completion)."""
    run = RunDir(config.run_dir)
    teacher: list[dict] = []
    answered: set[str] = set()

    def ask_teacher(records: list[dict], marker: str) -> None:
        for record in records:
            if record["id"] not in answered:
                answered.add(record["id"])
                teacher.append({"id": record["id"], "answer": "an answer", "empty": False, "fingerprint": "f",
                                "stage": marker, **_call(20, 10)})

    for k in range(1, config.iterations + 1):
        if f"{k}/imitation" not in completed:
            break
        directory = run.iteration(k)
        train, cache = pools_for(config, run, Iteration(k))
        ask_teacher(train, f"{k}/imitation")
        if f"{k}/discrimination" not in completed:
            break
        ask_teacher(cache, f"{k}/discrimination")
        write_jsonl_atomic(directory / "student_answers.jsonl", [{"id": r["id"], "answer": "mine", **_call(50, 30)} for r in cache])
        reviews = []
        for index, record in enumerate(cache):
            for order in ("teacher_first", "student_first"):
                attempt = 0
                if order == "teacher_first" and index < (unreadable or {}).get(k, 0):
                    reviews.append({"id": record["id"], "order": order, "attempt": 0, "raw": "no verdict",
                                    "scores": None, **_call(200, 40)})
                    attempt = 1
                scores = [7.0, 5.0] if index % 2 else [5.0, 5.0]
                raw = f"Fine.\nScore of Assistant 1: {scores[0]:g}\nScore of Assistant 2: {scores[1]:g}"
                reviews.append({"id": record["id"], "order": order, "attempt": attempt, "raw": raw, "scores": scores,
                                **_call(200, 40)})
        write_jsonl_atomic(directory / "reviews.jsonl", reviews)
        controls = [{"id": record["id"], "kind": "empty", "order": order, "attempt": 0, "raw": "8 2",
                     "scores": [8.0, 2.0], **_call(200, 40)}
                    for record in cache[:config.discrimination.referee_check.control_pairs]
                    for order in ("teacher_first", "student_first")]
        write_jsonl_atomic(directory / "controls.jsonl", controls)
        write_jsonl_atomic(directory / "judgements.jsonl", judge(cache, reviews, config.discrimination.tau))
        if f"{k}/generation" not in completed:
            break
        calls = [{"side": ("hard", "easy")[i % 2], "attempt": i // 2, "parent": cache[0]["id"], "raw": f"task {i}",
                  **_call(120, 8)} for i in range(generator_calls[k])]
        write_jsonl_atomic(directory / "generator_calls.jsonl", calls)
        generated = [instruction_record(f"Generated task {i} of iteration {k} here", "", ("hard", "easy")[i % 2], k,
                                        cache[0]["id"]) for i in range(accepted[k])]
        write_jsonl_atomic(directory / "generated.jsonl", generated)
        write_jsonl_atomic(directory / "rejected.jsonl", [])
    if f"{FINAL}/imitation" in completed:
        train, _ = pools_for(config, run, FINAL)
        ask_teacher(train, f"{FINAL}/imitation")
    write_jsonl_atomic(run.teacher_answers, teacher)
    state = {"iteration": 1, "completed": completed, "stage_seconds": {}}
    write_atomic(run.state_json, json.dumps(state) + "\n")
    return run


DEMO_STAGES = [f"{k}/{s}" for k in (1, 2) for s in ("imitation", "discrimination", "generation")] + ["final/imitation"]
# What the real demo (configs/tiny-cpu.yaml) made: 48 seeds, 2 iterations of 16 new.
DEMO_CALLS = {
    ("1/imitation", "teacher"): 48, ("1/discrimination", "teacher"): 0, ("1/discrimination", "student"): 48,
    ("1/discrimination", "referee"): 128, ("1/generation", "generator"): 32,  # 16 control pairs in both orders too
    ("2/imitation", "teacher"): 16, ("2/discrimination", "teacher"): 0, ("2/discrimination", "student"): 64,
    ("2/discrimination", "referee"): 161, ("2/generation", "generator"): 32,
    ("final/imitation", "teacher"): 16,
}


# ----------------------------------------------------------------------------------------------
# Before the run: the formulae
# ----------------------------------------------------------------------------------------------


def test_fresh_plan_follows_the_pools(tmp_path):
    plan = build_plan(_config(tmp_path))
    assert not plan["started"] and plan["seeds"] == 48 and plan["new_per_iteration"] == 16
    assert _calls(plan) == {
        ("1/imitation", "teacher"): 48, ("1/discrimination", "teacher"): 0, ("1/discrimination", "student"): 48,
        # the referee: both orders of each Cache Pool instruction and of the 16 control pairs;
        # 16 a side: the fewest calls of which 8 pass with probability 0.99 at acceptance 0.75
        ("1/discrimination", "referee"): 128, ("1/generation", "generator"): 32,
        ("2/imitation", "teacher"): 16, ("2/discrimination", "teacher"): 0, ("2/discrimination", "student"): 64,
        ("2/discrimination", "referee"): 160, ("2/generation", "generator"): 32,
        ("final/imitation", "teacher"): 16,
    }
    assert [(p["iteration"], p["train"], p["cache"], p["generated"]) for p in plan["pools"]] == [
        ("1", 48, 48, 16), ("2", 16, 64, 16), ("final", 16, None, None)
    ]
    assert {role: t["calls"] for role, t in plan["totals"].items()} == {
        "teacher": 80, "student": 112, "referee": 288, "generator": 64, "all": 544
    }
    assert all(row["source"] == "predicted" and row["calls_so_far"] == 0 for row in plan["rows"])
    # Each referee row's bound: every review retried roles.referee.parse_retries (3) times.
    assert [row["calls_max"] for row in plan["rows"] if row["role"] == "referee"] == [128 * 4, 160 * 4]
    assert "calls_max" not in next(row for row in plan["rows"] if row["role"] == "student")


def test_generator_quotas_acceptance_and_budget(tmp_path):
    # hard_ratio 0.3 of 10: quotas 3 and 7; at acceptance 0.75 one wave of 8 and 15 calls
    # (P(Binomial(8, 0.75) >= 3) = 0.996, P(Binomial(7, 0.75) >= 3) = 0.987; 15 for 7 alike).
    plan = build_plan(_config(tmp_path, "generation.new_per_iteration=10", "generation.hard_ratio=0.3"))
    assert _calls(plan)[("1/generation", "generator")] == 23
    assert plan["generator_acceptance"] == 0.75 and plan["generator_acceptance_source"].startswith("generation.")
    certain = _config(tmp_path, "generation.new_per_iteration=10", "generation.expected_acceptance=1.0")
    assert build_plan(certain)["rows"][4]["calls"] == 10
    # Expecting 0.75 but passing 0.3: a first wave of 11 a side for quota 5 passes 3; a second,
    # sized for the 6 of 22 seen passing, is the 9 left of the budget and passes 2.
    wrong = build_plan(_config(tmp_path, "generation.new_per_iteration=10"), generator_acceptance=0.3)
    assert wrong["rows"][4]["calls"] == 2 * (11 + 9)
    assert [p["generated"] for p in wrong["pools"][:2]] == [10, 10]
    # Acceptance 0.2 with budget 2 x quota: one wave of the whole budget, 16 a side, passes 3.
    low = build_plan(_config(tmp_path, "generation.max_attempts_factor=2"), generator_acceptance=0.2)
    assert _calls(low)[("1/generation", "generator")] == 32
    assert [(p["train"], p["cache"], p["generated"]) for p in low["pools"][:2]] == [(48, 48, 6), (6, 54, 6)]
    assert _calls(low)[("final/imitation", "teacher")] == 6


def test_iterations_and_final_imitation_follow_the_config(tmp_path):
    plan = build_plan(_config(tmp_path, "iterations=3", "imitation.final_imitation=false"))
    assert [row["stage"] for row in plan["rows"] if row["role"] == "teacher" and "imitation" in row["stage"]] == [
        "1/imitation", "2/imitation", "3/imitation"
    ]
    assert _calls(plan)[("3/discrimination", "student")] == 48 + 16 + 16


def test_tokens_from_the_role_prompts_at_four_characters_a_token(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": " ".join(["word"] * 10)}) + "\n"
                     + json.dumps({"instruction": " ".join(["word"] * 20)}) + "\n")
    plan = build_plan(_config(tmp_path, f"seed_data={seeds}", "seed_limit=null"))
    per_call = plan["per_call"]
    assert "4 characters per token" in plan["token_counting"]
    # The teacher's prompt is the instruction: 49 and 99 characters, 13 and 25 tokens.
    assert per_call["teacher"]["prompt_tokens"] == 19
    assert per_call["teacher"]["completion_tokens"] == 64  # max_tokens: an upper bound
    # The generator's budget: 4 x words, at least 16, at most max_tokens 48: 40 and 48.
    assert per_call["generator"]["completion_tokens"] == 44
    # The referee is shown both answers: their completion estimates are in its prompt.
    assert per_call["referee"]["prompt_tokens"] > 64 + 64 + 19
    row = next(r for r in plan["rows"] if r["stage"] == "1/imitation")
    assert (row["calls"], row["prompt_tokens"], row["completion_tokens"]) == (2, 38, 128)


@pytest.mark.integration
def test_counts_with_the_teachers_tokenizer_when_it_is_here(tmp_path, tiny_models):
    teacher = tiny_models / "teacher"
    plan = build_plan(_config(tmp_path, f"servers.teacher.model={teacher}"))
    assert plan["token_counting"] == f"the teacher's tokenizer ({teacher})"
    assert plan["per_call"]["teacher"]["prompt_tokens"] > 5


# ----------------------------------------------------------------------------------------------
# Seeds: the file, seed_limit or --seeds; the paper's scale
# ----------------------------------------------------------------------------------------------


def test_seed_count_without_the_seed_file(tmp_path):
    missing = f"seed_data={tmp_path / 'absent.jsonl'}"
    assert build_plan(_config(tmp_path, missing, "seed_limit=30"))["seeds"] == 30
    assert build_plan(_config(tmp_path, missing, "seed_limit=30"), seeds=100)["seeds"] == 100
    with pytest.raises(SeedDataError, match="--seeds"):
        build_plan(_config(tmp_path, missing, "seed_limit=null"))
    result = CliRunner().invoke(main, ["plan", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
                                       *[x for o in _overrides(tmp_path, missing, "seed_limit=null") for x in ("--set", o)]])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_lion_7b_paper_scale(tmp_path):
    config = load_config(ROOT / "configs/lion-7b.yaml", [f"run_dir={tmp_path / 'run'}"])
    plan = build_plan(config)
    calls = _calls(plan)
    assert plan["seeds"] == 52_000 and plan["new_per_iteration"] == 6_000 and plan["iterations"] == 3
    assert [calls[(f"{k}/imitation", "teacher")] for k in ("1", "2", "3", "final")] == [52_000, 6_000, 6_000, 6_000]
    assert [calls[(f"{k}/discrimination", "student")] for k in (1, 2, 3)] == [52_000, 58_000, 64_000]
    assert {role: t["calls"] for role, t in plan["totals"].items()} == {
        # the referee: both orders of every Cache Pool instruction and of 16 control pairs per discrimination
        "teacher": 70_000, "student": 174_000, "referee": 348_096, "generator": 3 * 2 * 3_379, "all": 612_370
    }



def test_each_referee_mode_is_planned_with_its_own_tokens(tmp_path):
    planned = {}
    for mode, structured in (("explain_first", "regex"), ("scores_only", "regex"), ("expected_score", "json_schema")):
        config = load_config(ROOT / "configs/lion-7b.yaml", [f"run_dir={tmp_path / 'run'}", f"roles.referee.mode={mode}",
                                                              f"roles.referee.structured_output={structured}"])
        plan = build_plan(config)
        planned[mode] = plan["per_call"]["referee"]
        assert plan["totals"]["referee"]["calls"] == 348_096  # the mode changes the tokens, not the calls
    assert [planned[mode]["completion_tokens"] for mode in planned] == [512, 8, 32]
    assert planned["scores_only"]["completion_source"] == "max_tokens of mode scores_only, an upper bound"
    # Each mode's own prompt: the short modes' reply format is shorter than the explanation's.
    assert planned["scores_only"]["prompt_tokens"] < planned["explain_first"]["prompt_tokens"]

# ----------------------------------------------------------------------------------------------
# A started run: actual counts from the journals, the rest projected from the pools on disk
# ----------------------------------------------------------------------------------------------


def test_started_run_counts_finished_stages_and_projects_the_rest(tmp_path):
    config = _config(tmp_path)
    run = _fake_run(config, DEMO_STAGES[:3], accepted={1: 12}, generator_calls={1: 20}, unreadable={1: 3})
    # 2/imitation is under way: its pools are written and 5 teacher answers journaled.
    train, _ = pools_for(config, run, Iteration(2))
    with open(run.teacher_answers, "a") as journal:
        for record in train[:5]:
            journal.write(json.dumps({"id": record["id"], "answer": "a", "empty": False, "fingerprint": "f",
                                      "stage": "2/imitation", **_call(20, 10)}) + "\n")
    plan = build_plan(config)
    assert plan["started"] and plan["completed_stages"] == ["1/imitation", "1/discrimination", "1/generation"]
    assert plan["generator_acceptance"] == 0.6 and plan["generator_acceptance_source"].startswith("observed")
    assert plan["referee_retry_rate"] == round(3 / 128, 4)  # 3 extra replies for 2 x (48 + 16 control pairs) reviews
    rows = {(r["stage"], r["role"]): r for r in plan["rows"]}

    def numbers(stage, role):
        row = rows[(stage, role)]
        return row["calls"], row["prompt_tokens"], row["completion_tokens"], row["source"]

    assert numbers("1/imitation", "teacher") == (48, 960, 480, "actual")
    assert numbers("1/discrimination", "student") == (48, 2400, 1440, "actual")
    assert numbers("1/discrimination", "referee") == (131, 26200, 5240, "actual")  # 99 reviews, 32 control replies
    assert numbers("1/generation", "generator") == (20, 2400, 160, "actual")
    # Projected with the observed means per call, the real pools (12 generated) and acceptance 0.6.
    assert numbers("2/imitation", "teacher") == (12, 240, 120, "predicted")
    assert rows[("2/imitation", "teacher")]["calls_so_far"] == 5
    assert numbers("2/discrimination", "student") == (60, 3000, 1800, "predicted")
    assert numbers("2/discrimination", "referee") == (156, 31200, 6240, "predicted")  # 2 x (60 + 16) x (1 + 3/128)
    # A side's first wave, 16 sized for 0.75, passes 9 at 0.6: one wave a side.
    assert numbers("2/generation", "generator") == (32, 3840, 256, "predicted")
    assert numbers("final/imitation", "teacher") == (16, 320, 160, "predicted")
    assert plan["pools"][0] == {"iteration": "1", "train": 48, "cache": 48, "generated": 12,
                                "pools_source": "actual", "generated_source": "actual"}
    assert plan["pools"][1]["pools_source"] == "actual" and plan["pools"][1]["generated_source"] == "predicted"
    assert plan["per_call"]["teacher"]["prompt_source"].startswith("observed")


def test_plan_before_the_demo_predicts_its_calls_within_ten_percent(tmp_path):
    config = _config(tmp_path)
    before = build_plan(config)
    _fake_run(config, DEMO_STAGES, accepted={1: 16, 2: 16}, generator_calls={1: 32, 2: 32}, unreadable={2: 1})
    after = build_plan(config)
    assert all(row["source"] == "actual" for row in after["rows"])
    assert _calls(after) == DEMO_CALLS
    for role in ("teacher", "student", "referee", "generator"):
        predicted, actual = before["totals"][role]["calls"], after["totals"][role]["calls"]
        assert abs(predicted - actual) <= 0.1 * actual, (role, predicted, actual)
    for key, actual in DEMO_CALLS.items():
        assert abs(_calls(before)[key] - actual) <= 0.1 * actual, key


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_plan_command_json_and_table(tmp_path):
    sets = [x for o in _overrides(tmp_path) for x in ("--set", o)]
    args = ["plan", "--config", str(ROOT / "configs/tiny-cpu.yaml"), *sets]
    result = CliRunner().invoke(main, [*args, "--json", "--generator-acceptance", "0.8"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert set(plan) == {
        "run_dir", "started", "completed_stages", "seeds", "seeds_source", "new_per_iteration", "iterations", "signal",
        "final_imitation", "student_training", "generator_acceptance", "generator_acceptance_source", "referee_retry_rate",
        "referee_retry_source", "token_counting", "per_call", "pools", "rows", "totals",
    }
    assert plan["generator_acceptance"] == 0.8 and plan["generator_acceptance_source"] == "--generator-acceptance"
    assert plan["student_training"] == {"mode": "full weights", "trainable_parameters": None}
    assert set(plan["rows"][0]) == {"stage", "role", "calls", "prompt_tokens", "completion_tokens", "source", "calls_so_far"}
    assert set(plan["totals"]) == {"teacher", "student", "referee", "generator", "all"}
    assert set(plan["per_call"]["referee"]) == {"prompt_tokens", "completion_tokens", "prompt_source", "completion_source"}
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0, table.output
    assert "N0 = 48 seeds" in table.stdout and "G = 16 new per iteration" in table.stdout
    assert table.stdout.splitlines() == plan_lines(build_plan(_config(tmp_path)))
    assert any(line.startswith("total") and "all" in line and "544" in line for line in table.stdout.splitlines())
