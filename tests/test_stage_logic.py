"""Pure decisions of the stages, tested without servers or models.

Covered:
- generation.plan_quotas: the hard/easy split of N (Python round()), and one side filling the
  whole quota when the other has no seeds, with a note.
- generation.filter_reason with GenerationFilters defaults and variations: unparseable,
  truncated, banned_word, too_short, leading_punctuation, non_ascii_start.
- discrimination.judge: scores averaged over both orders, gap = teacher - student, "hard" iff
  gap >= tau, "unjudged" when an order lacks a readable review, a retried review counting.
- judging.pending_reviews and position consistency; discrimination.gap_histogram and summarize.
- loop.stage_markers and markers_for on the tiny-cpu config: run / iteration / stage scopes,
  StageOrderError for a stage already done or not yet runnable, the optional final imitation.
- records.instruction_id and request_seed; records.pools_for for iteration 1, iteration 2 and
  the final imitation, and pools being frozen once written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lion_local.config import GenerationFilters, load_config
from lion_local.stages.discrimination import gap_histogram, judge, summarize
from lion_local.stages.generation import filter_reason, plan_quotas
from lion_local.stages.judging import pending_reviews
from lion_local.stages.loop import run_stages, stages_for
from lion_local.run.records import instruction_id, instruction_record, pools_for, request_seed
from lion_local.errors import StageOrderError
from lion_local.run.layout import FINAL, Iteration, RunDir, Stage
from lion_local.run.state import mark_completed, read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# generation.plan_quotas
# ----------------------------------------------------------------------------------------------


def markers_for(config, run, scope, stage=None) -> list[str]:
    return [str(each) for each in stages_for(config, run, scope, stage)]


def stage_markers(config) -> list[str]:
    return [str(each) for each in run_stages(config)]


def test_plan_quotas_splits_by_ratio():
    assert plan_quotas(16, 0.5, hard_seeds=5, easy_seeds=7) == ({"hard": 8, "easy": 8}, [])
    assert plan_quotas(16, 0.25, hard_seeds=5, easy_seeds=7) == ({"hard": 4, "easy": 12}, [])


def test_plan_quotas_ratio_zero_and_one_need_no_seeds_on_the_unused_side():
    assert plan_quotas(16, 0.0, hard_seeds=3, easy_seeds=3) == ({"hard": 0, "easy": 16}, [])
    assert plan_quotas(16, 1.0, hard_seeds=3, easy_seeds=3) == ({"hard": 16, "easy": 0}, [])
    # The unused side having no seeds changes nothing and is not worth a note.
    assert plan_quotas(16, 0.0, hard_seeds=0, easy_seeds=3) == ({"hard": 0, "easy": 16}, [])
    assert plan_quotas(16, 1.0, hard_seeds=3, easy_seeds=0) == ({"hard": 16, "easy": 0}, [])


@pytest.mark.parametrize("wanted, ratio", [(5, 0.5), (7, 0.5), (9, 0.5), (15, 0.3), (1, 0.5), (3, 0.5)])
def test_plan_quotas_odd_n_uses_round_and_sums_to_n(wanted: int, ratio: float):
    quotas, notes = plan_quotas(wanted, ratio, hard_seeds=2, easy_seeds=2)
    assert quotas["hard"] == round(wanted * ratio)
    assert quotas["hard"] + quotas["easy"] == wanted
    assert notes == []


def test_plan_quotas_odd_n_literal_values():
    # Python's round() rounds halves to even: 2.5 -> 2, 3.5 -> 4.
    assert plan_quotas(5, 0.5, 1, 1)[0] == {"hard": 2, "easy": 3}
    assert plan_quotas(7, 0.5, 1, 1)[0] == {"hard": 4, "easy": 3}


def test_plan_quotas_without_hard_seeds_easy_fills_everything():
    quotas, notes = plan_quotas(16, 0.5, hard_seeds=0, easy_seeds=4)
    assert quotas == {"hard": 0, "easy": 16}
    assert len(notes) == 1 and "no hard seeds" in notes[0] and "16" in notes[0]


def test_plan_quotas_without_easy_seeds_hard_fills_everything():
    quotas, notes = plan_quotas(16, 0.5, hard_seeds=4, easy_seeds=0)
    assert quotas == {"hard": 16, "easy": 0}
    assert len(notes) == 1 and "no easy seeds" in notes[0] and "16" in notes[0]


def test_plan_quotas_without_any_seeds_generates_nothing():
    quotas, notes = plan_quotas(16, 0.5, hard_seeds=0, easy_seeds=0)
    assert quotas == {"hard": 0, "easy": 0}
    assert len(notes) == 1 and "nothing to generate" in notes[0]


# ----------------------------------------------------------------------------------------------
# generation.filter_reason
# ----------------------------------------------------------------------------------------------

DEFAULTS = GenerationFilters()


def test_filter_defaults_are_the_documented_ones():
    assert DEFAULTS.banned_words == ["instruction"]
    assert DEFAULTS.min_words == 4
    assert DEFAULTS.drop_leading_punctuation and DEFAULTS.drop_truncated
    assert not DEFAULTS.drop_non_ascii_start


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Describe the water cycle in three sentences.", "Describe the water cycle in three sentences."),
        ("  Describe the water cycle in detail.  \n", "Describe the water cycle in detail."),
        ("New Instruction: Describe the water cycle in detail.", "Describe the water cycle in detail."),
        ('"Explain how ocean tides work."', "Explain how ocean tides work."),
        ("Name three primary colors.", "Name three primary colors."),  # exactly 4 words
    ],
)
def test_filter_keeps_a_good_instruction(text: str, expected: str):
    assert filter_reason(text, "stop", DEFAULTS) == (expected, None)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_filter_empty(text: str):
    assert filter_reason(text, "stop", DEFAULTS) == (None, "empty")


def test_filter_unparseable():
    text = "1. Write a poem about the sea.\n2. Write a song about rivers.\n3. Draw a map."
    assert filter_reason(text, "stop", DEFAULTS) == (None, "unparseable")


def test_filter_truncated_only_when_cut_by_length_and_enabled():
    text = "Write a detailed essay about the history of"
    assert filter_reason(text, "length", DEFAULTS) == (text, "truncated")
    assert filter_reason(text, "stop", DEFAULTS) == (text, None)
    assert filter_reason(text, None, DEFAULTS) == (text, None)
    keep_truncated = GenerationFilters(drop_truncated=False)
    assert filter_reason(text, "length", keep_truncated) == (text, None)


@pytest.mark.parametrize(
    "text",
    [
        "Write clear assembly instructions for a bookshelf.",
        "Follow this INSTRUCTION to bake a cake.",
        "Rewrite the Instruction below in plain words.",
    ],
)
def test_filter_banned_word_in_any_case(text: str):
    assert filter_reason(text, "stop", DEFAULTS) == (text, "banned_word")


def test_filter_banned_words_are_configurable():
    filters = GenerationFilters(banned_words=["Haiku"])
    assert filter_reason("Write a haiku about autumn leaves.", "stop", filters)[1] == "banned_word"
    assert filter_reason("Write clear instructions for a bookshelf.", "stop", filters)[1] is None


def test_filter_too_short_below_min_words():
    assert filter_reason("Name three colors.", "stop", DEFAULTS) == ("Name three colors.", "too_short")  # 3 words
    assert filter_reason("Summarize.", "stop", DEFAULTS) == ("Summarize.", "too_short")
    longer = GenerationFilters(min_words=6)
    assert filter_reason("Name three primary colors.", "stop", longer)[1] == "too_short"
    assert filter_reason("Name three primary colors of light.", "stop", longer)[1] is None


@pytest.mark.parametrize(
    "text",
    [
        "- Write a poem about the sea.",
        "(Optional) Write a poem about the sea.",
        "... and then explain why rivers bend.",
    ],
)
def test_filter_leading_punctuation(text: str):
    assert filter_reason(text, "stop", DEFAULTS) == (text, "leading_punctuation")
    assert filter_reason(text, "stop", GenerationFilters(drop_leading_punctuation=False)) == (text, None)


def test_filter_non_ascii_start_only_when_enabled():
    text = "Élaborez un plan de voyage pour Lyon."
    assert filter_reason(text, "stop", DEFAULTS) == (text, None)
    assert filter_reason(text, "stop", GenerationFilters(drop_non_ascii_start=True)) == (text, "non_ascii_start")
    ascii_text = "Plan a weekend trip to Lyon."
    assert filter_reason(ascii_text, "stop", GenerationFilters(drop_non_ascii_start=True)) == (ascii_text, None)


# ----------------------------------------------------------------------------------------------
# discrimination.judge, judging.pending_reviews, gap_histogram, summarize
# ----------------------------------------------------------------------------------------------


def _pool(*names: str) -> list[dict]:
    return [instruction_record(f"Explain {name} in simple words.", "", "seed", 0, None) for name in names]


def _review(record: dict, order: str, scores: list[float] | None, attempt: int = 0) -> dict:
    return {"id": record["id"], "order": order, "attempt": attempt, "scores": scores, "raw": "..."}


def test_judge_averages_both_orders_by_model():
    (record,) = _pool("tides")
    # teacher_first scores are [teacher, student]; student_first scores are [student, teacher].
    reviews = [_review(record, "teacher_first", [7, 3]), _review(record, "student_first", [5, 9])]
    (judgement,) = judge([record], reviews, tau=1.0)
    assert judgement["id"] == record["id"]
    assert judgement["teacher_score"] == 8.0  # (7 + 9) / 2
    assert judgement["student_score"] == 4.0  # (3 + 5) / 2
    assert judgement["gap"] == 4.0
    assert judgement["label"] == "hard"
    assert judgement["teacher_first"] == [7, 3] and judgement["student_first"] == [5, 9]


def test_judge_student_ahead_is_easy_with_a_negative_gap():
    (record,) = _pool("tides")
    reviews = [_review(record, "teacher_first", [4, 8]), _review(record, "student_first", [9, 5])]
    (judgement,) = judge([record], reviews, tau=1.0)
    assert (judgement["teacher_score"], judgement["student_score"], judgement["gap"]) == (4.5, 8.5, -4.0)
    assert judgement["label"] == "easy"


def test_judge_gap_exactly_tau_is_hard_and_just_below_is_easy():
    at, below = _pool("at", "below")
    reviews = [
        _review(at, "teacher_first", [8.5, 7.5]),
        _review(at, "student_first", [7.5, 8.5]),  # gap exactly 1.0
        _review(below, "teacher_first", [8.5, 7.5]),
        _review(below, "student_first", [7.5, 8.0]),  # teacher 8.25, student 7.5: gap 0.75
    ]
    judgements = {j["id"]: j for j in judge([at, below], reviews, tau=1.0)}
    assert judgements[at["id"]]["gap"] == 1.0
    assert judgements[at["id"]]["label"] == "hard"
    assert judgements[below["id"]]["gap"] == 0.75
    assert judgements[below["id"]]["label"] == "easy"
    # tau comes from the argument, not a constant.
    assert judge([at], reviews, tau=1.25)[0]["label"] == "easy"


def test_judge_unjudged_when_an_order_is_missing_or_unreadable():
    one_order, unreadable, fine = _pool("one", "unreadable", "fine")
    reviews = [
        _review(one_order, "teacher_first", [9, 2]),
        _review(unreadable, "teacher_first", [9, 2]),
        *[_review(unreadable, "student_first", None, attempt) for attempt in range(4)],
        _review(fine, "teacher_first", [6, 6]),
        _review(fine, "student_first", [6, 6]),
    ]
    judgements = judge([one_order, unreadable, fine], reviews, tau=1.0)
    assert [j["id"] for j in judgements] == [one_order["id"], unreadable["id"], fine["id"]]
    for judgement in judgements[:2]:
        assert judgement == {
            "id": judgement["id"],
            "teacher_score": None,
            "student_score": None,
            "gap": None,
            "label": "unjudged",
        }
    assert judgements[2]["label"] == "easy" and judgements[2]["gap"] == 0.0


def test_judge_a_readable_retry_after_an_unreadable_attempt_counts():
    (record,) = _pool("retry")
    reviews = [
        _review(record, "teacher_first", None, 0),
        _review(record, "student_first", [2, 9], 0),
        _review(record, "teacher_first", [9, 3], 1),
    ]
    (judgement,) = judge([record], reviews, tau=1.0)
    assert judgement["teacher_first"] == [9, 3]
    assert (judgement["teacher_score"], judgement["student_score"], judgement["gap"]) == (9.0, 2.5, 6.5)
    assert judgement["label"] == "hard"


def test_judge_with_no_reviews_leaves_every_instruction_unjudged():
    pool = _pool("a", "b")
    assert [j["label"] for j in judge(pool, [], tau=1.0)] == ["unjudged", "unjudged"]
    assert judge([], [], tau=1.0) == []


def test_position_consistency_is_whether_both_orders_name_the_same_better_answer():
    agree, disagree, ties, one_tie = _pool("agree", "disagree", "ties", "one tie")
    reviews = [
        # teacher_first is [teacher, student], student_first [student, teacher].
        _review(agree, "teacher_first", [8, 6]), _review(agree, "student_first", [5, 9]),
        _review(disagree, "teacher_first", [8, 6]), _review(disagree, "student_first", [9, 5]),  # first answer wins
        _review(ties, "teacher_first", [7, 7]), _review(ties, "student_first", [6, 6]),
        _review(one_tie, "teacher_first", [7, 7]), _review(one_tie, "student_first", [5, 8]),
    ]
    judgements = {j["id"]: j for j in judge([agree, disagree, ties, one_tie], reviews, tau=1.0)}
    assert [judgements[r["id"]]["position_consistent"] for r in (agree, disagree, ties, one_tie)] == [
        True, False, True, False,
    ]
    summary = summarize(list(judgements.values()), reviews)
    assert summary["position_inconsistent_share"] == 0.5


def test_pending_reviews_lists_unread_orders_with_their_next_attempt():
    done, retrying, exhausted, fresh = _pool("done", "retrying", "exhausted", "fresh")
    reviews = [
        _review(done, "teacher_first", [8, 7]),
        _review(done, "student_first", None, 0),
        _review(done, "student_first", [7, 8], 1),
        _review(retrying, "teacher_first", [8, 7]),
        _review(retrying, "student_first", None, 0),
        _review(retrying, "student_first", None, 1),
        *[_review(exhausted, "teacher_first", None, attempt) for attempt in range(3)],  # parse_retries=2: 3 tries
        _review(exhausted, "student_first", [5, 5]),
    ]
    pending = pending_reviews([r["id"] for r in (done, retrying, exhausted, fresh)], reviews, retries=2)
    assert pending == [
        (retrying["id"], "student_first", 2),
        (fresh["id"], "teacher_first", 0),
        (fresh["id"], "student_first", 0),
    ]


def test_pending_reviews_with_no_retries_allows_exactly_one_attempt():
    (record,) = _pool("once")
    assert len(pending_reviews([record["id"]], [], retries=0)) == 2
    reviews = [_review(record, "teacher_first", None), _review(record, "student_first", None)]
    assert pending_reviews([record["id"]], reviews, retries=0) == []
    assert [p[1:] for p in pending_reviews([record["id"]], reviews, retries=1)] == [
        ("teacher_first", 1),
        ("student_first", 1),
    ]


def test_gap_histogram_bins():
    histogram = gap_histogram([0.0, 0.5, 1.0, -0.5, -9.0, 9.0, 8.5, 3.25])
    assert len(histogram) == 18
    assert histogram[0] == {"from": -9, "to": -8, "count": 1}
    assert histogram[-1] == {"from": 8, "to": 9, "count": 2}  # 8.5, and 9 goes in the last bin
    counts = {bin_["from"]: bin_["count"] for bin_ in histogram}
    assert counts[0] == 2 and counts[1] == 1 and counts[-1] == 1 and counts[3] == 1
    assert sum(counts.values()) == 8
    assert [b["from"] for b in histogram] == list(range(-9, 9))
    assert all(b["count"] == 0 for b in gap_histogram([]))


def test_summarize_counts_and_means_over_judged_only():
    hard, easy, unjudged = _pool("hard", "easy", "unjudged")
    reviews = [
        _review(hard, "teacher_first", [9, 5]),
        _review(hard, "student_first", [5, 9]),  # teacher 9, student 5, gap 4
        _review(easy, "teacher_first", [6, 7]),
        _review(easy, "student_first", [7, 6]),  # teacher 6, student 7, gap -1
        _review(unjudged, "teacher_first", None),
        _review(unjudged, "teacher_first", None, 1),
    ]
    summary = summarize(judge([hard, easy, unjudged], reviews, tau=1.0), reviews)
    assert (summary["hard"], summary["easy"], summary["unjudged"]) == (1, 1, 1)
    assert summary["mean_teacher_score"] == 7.5
    assert summary["mean_student_score"] == 6.0
    assert summary["mean_gap"] == 1.5
    assert summary["referee_replies"] == 6
    assert summary["unreadable_referee_replies"] == 2
    counts = {b["from"]: b["count"] for b in summary["gap_histogram"]}
    assert counts[4] == 1 and counts[-1] == 1 and sum(counts.values()) == 2


def test_summarize_rounds_means_to_four_decimals():
    records = _pool("a", "b", "c")
    reviews = []
    for record, teacher in zip(records, (7, 8, 8)):
        reviews += [_review(record, "teacher_first", [teacher, 5]), _review(record, "student_first", [5, teacher])]
    summary = summarize(judge(records, reviews, tau=1.0), reviews)
    assert summary["mean_teacher_score"] == 7.6667
    assert summary["mean_gap"] == 2.6667


def test_summarize_with_nothing_judged_has_no_means():
    (record,) = _pool("none")
    reviews = [_review(record, "teacher_first", None)]
    summary = summarize(judge([record], reviews, tau=1.0), reviews)
    assert (summary["hard"], summary["easy"], summary["unjudged"]) == (0, 0, 1)
    assert summary["mean_teacher_score"] is None
    assert summary["mean_student_score"] is None
    assert summary["mean_gap"] is None
    assert sum(b["count"] for b in summary["gap_histogram"]) == 0
    assert summarize([], [])["mean_gap"] is None


# ----------------------------------------------------------------------------------------------
# loop.stage_markers and markers_for
# ----------------------------------------------------------------------------------------------


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    monkeypatch.chdir(ROOT)  # the config's relative paths are relative to the project root
    return load_config("configs/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])


ALL_MARKERS = [
    "1/imitation",
    "1/discrimination",
    "1/generation",
    "2/imitation",
    "2/discrimination",
    "2/generation",
    "final/imitation",
]


def _complete(run: RunDir, *markers: str) -> None:
    for marker in markers:
        mark_completed(run, Stage.parse(marker), 1.0)


def test_stage_markers_of_the_tiny_config(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    assert config.iterations == 2
    assert stage_markers(config) == ALL_MARKERS


def test_stage_markers_follow_iterations_and_final_imitation(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "iterations=1", "imitation.final_imitation=false")
    assert stage_markers(config) == ["1/imitation", "1/discrimination", "1/generation"]
    config = _config(tmp_path, monkeypatch, "iterations=3")
    assert stage_markers(config)[-1] == "final/imitation"
    assert len(stage_markers(config)) == 10


def test_markers_for_a_fresh_run(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    run = RunDir(config.run_dir)
    assert markers_for(config, run, "run") == ALL_MARKERS
    assert markers_for(config, run, "iteration") == ALL_MARKERS[:3]
    assert markers_for(config, run, "stage", "imitation") == ["1/imitation"]
    with pytest.raises(StageOrderError, match="next stage is 1/imitation"):
        markers_for(config, run, "stage", "discrimination")
    with pytest.raises(StageOrderError, match="next stage is 1/imitation"):
        markers_for(config, run, "stage", "final")
    assert not run.root.exists()  # asking changes nothing on disk


def test_markers_for_mid_iteration(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    run = RunDir(config.run_dir)
    _complete(run, "1/imitation")
    assert markers_for(config, run, "run") == ALL_MARKERS[1:]
    assert markers_for(config, run, "iteration") == ["1/discrimination", "1/generation"]
    assert markers_for(config, run, "stage", "discrimination") == ["1/discrimination"]
    with pytest.raises(StageOrderError) as done:
        markers_for(config, run, "stage", "imitation")
    assert "1/imitation" in str(done.value) and "already complete" in str(done.value)
    assert "next stage is 1/discrimination" in str(done.value)
    with pytest.raises(StageOrderError) as early:
        markers_for(config, run, "stage", "generation")
    assert "1/generation" in str(early.value) and "cannot run yet" in str(early.value)
    assert "next stage is 1/discrimination" in str(early.value)


def test_markers_for_at_an_iteration_boundary(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    run = RunDir(config.run_dir)
    _complete(run, *ALL_MARKERS[:3])
    assert markers_for(config, run, "iteration") == ["2/imitation", "2/discrimination", "2/generation"]
    assert markers_for(config, run, "stage", "imitation") == ["2/imitation"]
    with pytest.raises(StageOrderError, match="next stage is 2/imitation"):
        markers_for(config, run, "stage", "generation")
    with pytest.raises(StageOrderError, match="next stage is 2/imitation"):
        markers_for(config, run, "stage", "final")


def test_markers_for_the_final_imitation(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    run = RunDir(config.run_dir)
    _complete(run, *ALL_MARKERS[:6])
    assert markers_for(config, run, "run") == ["final/imitation"]
    assert markers_for(config, run, "iteration") == ["final/imitation"]
    assert markers_for(config, run, "stage", "final") == ["final/imitation"]
    with pytest.raises(StageOrderError, match="every iteration is complete; the next stage is final/imitation"):
        markers_for(config, run, "stage", "generation")
    _complete(run, "final/imitation")
    for scope in ("run", "iteration"):
        assert markers_for(config, run, scope) == []
    assert markers_for(config, run, "stage", "imitation") == []


def test_markers_for_without_final_imitation(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.final_imitation=false")
    run = RunDir(config.run_dir)
    assert markers_for(config, run, "run") == ALL_MARKERS[:6]
    _complete(run, *ALL_MARKERS[:5])
    assert markers_for(config, run, "run") == ["2/generation"]
    assert markers_for(config, run, "iteration") == ["2/generation"]
    with pytest.raises(StageOrderError, match=r"final imitation is off .*imitation.final_imitation: false"):
        markers_for(config, run, "stage", "final")
    _complete(run, "2/generation")
    assert markers_for(config, run, "run") == []
    assert markers_for(config, run, "iteration") == []


# ----------------------------------------------------------------------------------------------
# records: ids, seeds, pools
# ----------------------------------------------------------------------------------------------


def test_instruction_id_is_a_stable_content_hash():
    assert instruction_id("Write a haiku about rain.") == "8d77071944924199db8b"
    assert instruction_id("Summarize the text.", "The cat sat.") == "1e7415eb0ce92095bb30"
    assert instruction_id("Write a haiku about rain.", "") == instruction_id("Write a haiku about rain.")
    ids = {
        instruction_id("Write a haiku about rain."),
        instruction_id("Write a haiku about rain"),
        instruction_id("write a haiku about rain."),
        instruction_id("Write a haiku about rain.", "x"),
        instruction_id("Write a haiku about", "rain."),  # the boundary between the parts matters
        instruction_id("Write a haiku about ", "rain."),
    }
    assert len(ids) == 6
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)


def test_request_seed_is_deterministic_and_in_range():
    assert request_seed(0, "teacher", "abc") == 604447125
    assert request_seed(0, "teacher", "abc") == request_seed(0, "teacher", "abc")
    seeds = {
        request_seed(run_seed, role, i) for run_seed in (0, 1) for role in ("teacher", "generator") for i in range(50)
    }
    assert len(seeds) == 200
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert request_seed(1, "teacher", "abc") != request_seed(0, "teacher", "abc")


SEEDS = [
    {"instruction": "Write a short poem about the sea.", "input": "", "output": "Waves."},
    {"instruction": "Translate the sentence into French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "List three uses of copper.", "output": "Wires, pipes, coins."},
]


@pytest.fixture
def pool_setup(tmp_path, monkeypatch):
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text("".join(json.dumps(s) + "\n" for s in SEEDS), encoding="utf-8")
    config = _config(tmp_path, monkeypatch, f"seed_data={seed_file}")
    return config, RunDir(config.run_dir), seed_file


def _generated(k: int, *instructions: str, parent: str) -> list[dict]:
    return [instruction_record(text, "", "hard", k, parent) for text in instructions]


def test_pools_of_iteration_one_are_the_seeds(pool_setup):
    config, run, _ = pool_setup
    train, cache = pools_for(config, run, Iteration(1))
    assert train == cache
    assert [(r["instruction"], r["input"]) for r in train] == [(s["instruction"], s.get("input", "")) for s in SEEDS]
    for record in train:
        assert record["origin"] == "seed" and record["parent"] is None
        assert record["id"] == instruction_id(record["instruction"], record["input"])
        assert set(record) == {"id", "instruction", "input", "origin", "iteration", "parent"}
    assert read_jsonl(run.iteration(1) / "train_pool.jsonl") == train
    assert read_jsonl(run.iteration(1) / "cache_pool.jsonl") == cache


def test_pools_of_iteration_two_replace_train_and_extend_cache(pool_setup):
    config, run, _ = pool_setup
    cache_1 = [instruction_record(s["instruction"], s.get("input", ""), "seed", 0, None) for s in SEEDS]
    generated_1 = _generated(
        1, "Write a sonnet about a lighthouse.", "Describe a storm at sea.", parent=cache_1[0]["id"]
    )
    write_jsonl_atomic(run.iteration(1) / "cache_pool.jsonl", cache_1)
    write_jsonl_atomic(run.iteration(1) / "generated.jsonl", generated_1)
    train, cache = pools_for(config, run, Iteration(2))
    assert train == generated_1
    assert cache == cache_1 + generated_1
    assert read_jsonl(run.iteration(2) / "train_pool.jsonl") == generated_1
    assert read_jsonl(run.iteration(2) / "cache_pool.jsonl") == cache_1 + generated_1


def test_pools_chain_from_iteration_one_to_two(pool_setup):
    config, run, _ = pool_setup
    _, cache_1 = pools_for(config, run, Iteration(1))
    generated_1 = _generated(1, "Compose a limerick about a cat.", parent=cache_1[1]["id"])
    write_jsonl_atomic(run.iteration(1) / "generated.jsonl", generated_1)
    train_2, cache_2 = pools_for(config, run, Iteration(2))
    assert train_2 == generated_1
    assert cache_2 == cache_1 + generated_1


def test_pools_once_written_are_read_back_even_if_the_seed_file_changes(pool_setup, monkeypatch):
    config, run, seed_file = pool_setup
    first = pools_for(config, run, Iteration(1))
    seed_file.write_text(json.dumps({"instruction": "A completely different seed."}) + "\n", encoding="utf-8")
    assert pools_for(config, run, Iteration(1)) == first
    reloaded = _config(Path(config.run_dir).parent, monkeypatch, f"seed_data={seed_file}")
    assert pools_for(reloaded, run, Iteration(1)) == first


def test_pools_of_iteration_two_are_frozen_once_written(pool_setup):
    config, run, _ = pool_setup
    _, cache_1 = pools_for(config, run, Iteration(1))
    generated_1 = _generated(1, "Compose a limerick about a cat.", parent=cache_1[0]["id"])
    write_jsonl_atomic(run.iteration(1) / "generated.jsonl", generated_1)
    first = pools_for(config, run, Iteration(2))
    write_jsonl_atomic(run.iteration(1) / "generated.jsonl", [])
    assert pools_for(config, run, Iteration(2)) == first


def test_final_pool_trains_on_the_last_iterations_generated(pool_setup):
    config, run, _ = pool_setup
    generated_1 = _generated(1, "Not used by the final imitation at all.", parent="x")
    generated_2 = _generated(2, "Plan a three-day hiking trip.", "Explain how a compass works.", parent="y")
    write_jsonl_atomic(run.iteration(1) / "generated.jsonl", generated_1)
    write_jsonl_atomic(run.iteration(2) / "generated.jsonl", generated_2)
    train, cache = pools_for(config, run, FINAL)
    assert train == generated_2
    assert cache == []
    assert run.final.path == run.root / "final"
    assert read_jsonl(run.root / "final" / "train_pool.jsonl") == generated_2
    write_jsonl_atomic(run.iteration(2) / "generated.jsonl", [])
    assert pools_for(config, run, FINAL) == (generated_2, [])  # frozen once written
