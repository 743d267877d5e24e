"""Tests for the referee-output parser (lion_local.roles.referee)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lion_local.roles.referee import parse_referee_scores, read_explained_review

# Real judge reviews with the score pairs their sources recorded (see REAL_REVIEWS.md beside it).
REAL_REVIEWS = Path(__file__).resolve().parents[2] / "shared/data/real_reviews.jsonl"

LLAMA_INTRO = (
    "Both assistants address the user's question about sorting a list in Python.\n\n"
    "Assistant 1 explains the difference between `sorted()` and `list.sort()` and gives "
    "3 short examples, including the `key=` argument. The explanation is accurate and "
    "well organised.\n\n"
    "Assistant 2 only shows `list.sort()` and does not mention that it returns None, "
    "which is a common pitfall. It is correct but much less helpful.\n\n"
)

QWEN_INTRO = (
    "### Evaluation\n\n"
    "**Helpfulness**: Assistant 1 provides a step-by-step plan (5 steps) that directly "
    "answers the question. Assistant 2 is more generic.\n\n"
    "**Accuracy**: Both answers are factually correct; the figure from 2020 quoted by "
    "Assistant 2 is right.\n\n"
    "**Level of detail**: Assistant 1 is more detailed.\n\n"
    "### Scores\n\n"
)

MIXTRAL_INTRO = (
    "Assistant 1: The answer is good. It gives 3 examples and covers edge cases.\n"
    "Assistant 2: The answer is short. It gives 1 example and skips error handling.\n\n"
)

GPT35_INTRO = (
    "Assistant 1 provided a relevant and accurate answer, listing 4 of the 7 wonders. "
    "Assistant 2 listed all 7 but two of them were wrong.\n\n"
)

ACCEPTED = [
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 8\nScore of Assistant 2: 6", (8, 6),
                 id="canonical"),
    pytest.param(GPT35_INTRO + "Score of the Assistant 1: 7\nScore of the Assistant 2: 9", (7, 9),
                 id="score_of_the"),
    pytest.param(QWEN_INTRO + "Assistant 1: 7/10\nAssistant 2: 5/10", (7, 5), id="slash_10"),
    pytest.param(GPT35_INTRO + "Assistant 1 score: 7\nAssistant 2 score: 8", (7, 8),
                 id="label_then_score_word"),
    pytest.param(LLAMA_INTRO + "Assistant 1's score: 7 out of 10\nAssistant 2's score: 9 out of 10",
                 (7, 9), id="possessive_out_of_10"),
    pytest.param(GPT35_INTRO + "Assistant 1 = 8\nAssistant 2 = 6", (8, 6), id="equals_sign"),
    pytest.param(LLAMA_INTRO + "Answer 1: 6\nAnswer 2: 8", (6, 8), id="answer_labels"),
    pytest.param(QWEN_INTRO + "Response 1: 9\nResponse 2: 4", (9, 4), id="response_labels"),
    pytest.param(GPT35_INTRO.replace("Assistant 1", "Assistant A").replace("Assistant 2", "Assistant B")
                 + "Assistant A: 8\nAssistant B: 7", (8, 7), id="letter_labels"),
    pytest.param(LLAMA_INTRO + "SCORE OF ASSISTANT 1: 8\nscore of assistant 2: 5", (8, 5),
                 id="case_insensitive"),
    pytest.param(LLAMA_INTRO + "**Score of Assistant 1:** 8\n**Score of Assistant 2:** 6", (8, 6),
                 id="bold_label"),
    pytest.param(QWEN_INTRO + "**Assistant 1**: **8**\n**Assistant 2**: **6**", (8, 6),
                 id="bold_label_and_score"),
    pytest.param(GPT35_INTRO + "__Assistant 1__: __8__\n__Assistant 2__: __3__", (8, 3),
                 id="underscore_bold"),
    pytest.param(GPT35_INTRO + "*Assistant 1*: *7*\n*Assistant 2*: *6*", (7, 6), id="italic"),
    pytest.param(QWEN_INTRO + "- Assistant 1: 8\n- Assistant 2: 6", (8, 6), id="dash_bullets"),
    pytest.param(LLAMA_INTRO + "* Score of Assistant 1: 8\n* Score of Assistant 2: 6", (8, 6),
                 id="star_bullets"),
    pytest.param(QWEN_INTRO + "1. Assistant 1: 4\n2. Assistant 2: 9", (4, 9),
                 id="numbered_list_not_read_as_score"),
    pytest.param(QWEN_INTRO + "#### Assistant 1: 8/10\n#### Assistant 2: 7/10", (8, 7),
                 id="heading_prefix"),
    pytest.param(GPT35_INTRO + "Score of Assistant 1: 8.\nScore of Assistant 2: 6.", (8, 6),
                 id="trailing_periods"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 8.5\nScore of Assistant 2: 7.5", (8.5, 7.5),
                 id="decimals"),
    pytest.param(QWEN_INTRO + "- **Assistant 1**: 9.5/10\n- **Assistant 2**: 6.5/10", (9.5, 6.5),
                 id="decimal_slash_bold_bullets"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 2: 6\nScore of Assistant 1: 9", (9, 6),
                 id="reversed_order"),
    pytest.param(GPT35_INTRO + "Assistant B: 3\nAssistant A: 7", (7, 3), id="reversed_letters"),
    pytest.param(MIXTRAL_INTRO + "Assistant 1: 8, Assistant 2: 6", (8, 6), id="one_line_comma"),
    pytest.param(MIXTRAL_INTRO + "Assistant 1: 8; Assistant 2: 6", (8, 6), id="one_line_semicolon"),
    pytest.param(MIXTRAL_INTRO + "Assistant 1 - 8 | Assistant 2 - 6", (8, 6), id="one_line_dash_pipe"),
    pytest.param(MIXTRAL_INTRO + "Assistant 1: 8. Assistant 2: 6.", (8, 6), id="one_line_period"),
    pytest.param(QWEN_INTRO + "**Assistant 1:** 7 vs. **Assistant 2:** 4", (7, 4), id="one_line_vs_bold"),
    pytest.param(GPT35_INTRO + "Assistant 2: 5/10, Assistant 1: 9/10.", (9, 5),
                 id="one_line_reversed"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 7 and Score of Assistant 2: 8", (7, 8),
                 id="one_line_and"),
    pytest.param(GPT35_INTRO + "Assistant 1's score is 7, and Assistant 2's score is 9.", (7, 9),
                 id="score_is"),
    pytest.param(LLAMA_INTRO + "Assistant 1 scored 6 out of 10.\nAssistant 2 scored 8 out of 10.",
                 (6, 8), id="scored"),
    pytest.param(GPT35_INTRO + "Assistant 1 gets a score of 8.\nAssistant 2 receives a score of 5.",
                 (8, 5), id="gets_receives_a_score_of"),
    pytest.param(MIXTRAL_INTRO + "Assistant 1 – 7\nAssistant 2 – 8", (7, 8), id="en_dash"),
    pytest.param(QWEN_INTRO + "Assistant 1: 10/10\nAssistant 2: 1/10", (10, 1), id="extremes"),
    pytest.param(QWEN_INTRO + "Assistant 1 rating: 8/10\nAssistant 2 rating: 4/10", (8, 4),
                 id="rating_word"),
    pytest.param("8 6\n\n" + LLAMA_INTRO, (8, 6), id="vicuna_first_line"),
    pytest.param(GPT35_INTRO + "7, 9", (7, 9), id="vicuna_last_line_comma"),
    pytest.param("8/10 6/10\n" + MIXTRAL_INTRO, (8, 6), id="vicuna_slash_10"),
    pytest.param("7.5 8\n\n" + GPT35_INTRO, (7.5, 8), id="vicuna_decimal"),
    pytest.param("Score of Assistant 1: 8\nScore of Assistant 2: 6\n\n" + LLAMA_INTRO
                 + "In summary, Assistant 1: 8, Assistant 2: 6.", (8, 6),
                 id="same_score_stated_twice"),
    pytest.param(MIXTRAL_INTRO + "Score of Assistant 1: 9\nScore of Assistant 2: 4", (9, 4),
                 id="labelled_prose_with_numbers_ignored"),
    pytest.param((LLAMA_INTRO + "Score of Assistant 1: 8\nScore of Assistant 2: 6\n")
                 .replace("\n", "\r\n"), (8, 6), id="crlf"),
    pytest.param(QWEN_INTRO + "Score of Assistant 1: **8**/10\nScore of Assistant 2: **7**/10",
                 (8, 7), id="bold_score_with_slash"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 8\nScore of Assistant 2: 6\n8 6", (8, 6),
                 id="labelled_and_agreeing_bare_line"),
    # The styles of real GPT-4 and GPT-3.5 reviews (../shared/data/real_reviews.jsonl):
    pytest.param("8 9\n" + GPT35_INTRO + "Therefore, Assistant 2 receives a higher score of 9, while "
                 "Assistant 1 receives a score of 8.", (8, 9), id="first_line_restated_in_prose"),
    pytest.param("9 8.5\n" + LLAMA_INTRO + "Therefore, Assistant 1 receives a score of 9, while Assistant 2 "
                 "receives a score o", (9, 8.5), id="first_line_one_side_restated_then_cut"),
    pytest.param(GPT35_INTRO + "Scores:\nAssistant 1: 2 (incorrect steps and answer)\nAssistant 2: 1 (no steps)",
                 (2, 1), id="parenthesised_reason"),
    pytest.param(GPT35_INTRO + "Assistant 1: 2/10 - wrong formula\nAssistant 2: 10/10 - the steps are right",
                 (2, 10), id="dashed_reason"),
    pytest.param(GPT35_INTRO + "I would give Assistant 1 a score of 8 and Assistant 2 a score of 9.", (8, 9),
                 id="give_a_score_of"),
    pytest.param(GPT35_INTRO + "Assistant 1's score is 3 out of 10, and Assistant 2's score is 10 out of 10. "
                 "The reason is that Assistant 1 is wrong.", (3, 10), id="score_is_then_more_prose"),
    pytest.param(GPT35_INTRO + "Output: (1, 10)", (1, 10), id="output_tuple"),
    pytest.param(GPT35_INTRO + "(10, 2)", (10, 2), id="tuple_alone"),
    pytest.param(GPT35_INTRO + "The output tuple is (9, 10). Assistant 2 performed better.", (9, 10),
                 id="tuple_in_a_sentence"),
    pytest.param("Assistant 1: 9 (small mistake)\nAssistant 2: 1 (no answer)\nOutput: (9, 1)", (9, 1),
                 id="labelled_and_agreeing_tuple"),
]

UNREADABLE = [
    pytest.param("", id="empty"),
    pytest.param("   \n\n  ", id="whitespace_only"),
    pytest.param(LLAMA_INTRO + "Overall, Assistant 1 is clearly better.", id="no_scores"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 8", id="missing_second"),
    pytest.param(GPT35_INTRO + "Score of Assistant 2: 6\n", id="missing_first"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1:\nScore of Assistant 2:", id="labels_without_numbers"),
    pytest.param(QWEN_INTRO + "Assistant 1: 8\nAssistant 2: 6\nAssistant 3: 5", id="three_assistants"),
    pytest.param(QWEN_INTRO + "Assistant A: 8\nAssistant B: 6\nAssistant C: 5", id="three_letters"),
    pytest.param("8 6 7\n\n" + LLAMA_INTRO, id="bare_line_three_numbers"),
    pytest.param("Assistant 1: 7\n" + GPT35_INTRO + "Score of Assistant 1: 8\nScore of Assistant 2: 6",
                 id="conflicting_scores"),
    pytest.param(GPT35_INTRO + "Assistant A: 7\nAssistant 1: 8\nAssistant 2: 6",
                 id="conflicting_letter_and_number"),
    pytest.param(GPT35_INTRO + "Assistant 1: 8, Assistant 2: 6\nAssistant 2: 7", id="conflict_one_line"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 0\nScore of Assistant 2: 6", id="score_zero"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: 11\nScore of Assistant 2: 6", id="score_eleven"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1: -3\nScore of Assistant 2: 6", id="score_negative"),
    pytest.param(QWEN_INTRO + "Assistant 1: 12/10\nAssistant 2: 6/10", id="twelve_out_of_ten"),
    pytest.param(QWEN_INTRO + "Assistant 1: 8/100\nAssistant 2: 60/100", id="scale_100"),
    pytest.param(QWEN_INTRO + "Assistant 1: 4 out of 5\nAssistant 2: 3 out of 5", id="scale_5"),
    pytest.param("Assistant 1 lists 3 steps while Assistant 2 lists 5.", id="prose_numbers"),
    pytest.param(GPT35_INTRO + "Both assistants get 8.", id="both_get_same"),
    pytest.param(MIXTRAL_INTRO.strip(), id="labelled_prose_only"),
    pytest.param(GPT35_INTRO + "Assistant 1: 3 steps, Assistant 2: 5 steps.", id="counts_not_scores"),
    pytest.param(GPT35_INTRO + "Assistant 1: 3, Assistant 2 lists 5.\nAssistant 2: 6",
                 id="number_before_prose_label"),
    pytest.param(LLAMA_INTRO + "8 6\n" + GPT35_INTRO, id="bare_line_in_middle"),
    pytest.param("8,6\n" + LLAMA_INTRO, id="bare_line_decimal_comma"),
    pytest.param("8 11\n" + LLAMA_INTRO, id="bare_line_out_of_range"),
    pytest.param("8 6\n" + LLAMA_INTRO + "5 7", id="bare_lines_disagree"),
    pytest.param("7 5\n" + LLAMA_INTRO + "Score of Assistant 1: 8\nScore of Assistant 2: 6",
                 id="bare_line_contradicts_labels"),
    pytest.param(LLAMA_INTRO + "Score of Assistant 1:\n8\nScore of Assistant 2:\n6", id="score_on_next_line"),
    pytest.param(GPT35_INTRO + "Assistant 1: 2020\nAssistant 2: 6", id="year_as_score"),
    pytest.param("The answer a child understands: 8\nAssistant 2: 6", id="lowercase_letter_not_label"),
    pytest.param("0 9\n" + GPT35_INTRO, id="bare_line_zero"),
    pytest.param("8 9\n" + GPT35_INTRO + "Assistant 1 receives a score of 7.", id="prose_contradicts_first_line"),
    pytest.param("Here (x1, y1) = (2, 3) and (x2, y2) = (10, 4).\n" + GPT35_INTRO, id="coordinates_not_a_tuple"),
    pytest.param(GPT35_INTRO + "Output: (8, 6)\nThe final scores are (6, 8).", id="tuples_disagree"),
    pytest.param("8 6\n" + GPT35_INTRO + "Output: (6, 8)", id="tuple_contradicts_first_line"),
    pytest.param(GPT35_INTRO + "Output: (0, 10)", id="tuple_zero"),
    pytest.param(GPT35_INTRO + "I would give Assistant 1 a score of 9 and Assistant 2 a score of 9. Assistant 2 "
                 "warrants a higher score of 9 compared to Assistant 1's score of 8.", id="score_of_restated_differently"),
    pytest.param(GPT35_INTRO + "Assistant 1 receives a score of 8 for relevance and Assistant 2 receives a score "
                 "of 6 for relevance.", id="per_criterion_scores"),
    pytest.param(GPT35_INTRO + "Assistant 1: 3 (steps)\n", id="one_parenthesised_score"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepted_outputs(text: str, expected: tuple[float, float]) -> None:
    result = parse_referee_scores(text)
    assert result == expected
    assert all(isinstance(score, float) for score in result)


@pytest.mark.parametrize("text", UNREADABLE)
def test_unreadable_outputs_give_none(text: str) -> None:
    assert parse_referee_scores(text) is None


@pytest.mark.parametrize("value", [None, 8, 8.0, b"Score of Assistant 1: 8", ["8 6"]])
def test_non_string_raises_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        parse_referee_scores(value)  # type: ignore[arg-type]


# --- property tests -----------------------------------------------------------------

# Explanation prose with numbers and labels but no score statement. {p}/{q} are the
# labels of the first/second assistant, {n}/{m} small numbers.
PROSE = [
    "{p} lists {n} steps while {q} lists {m}.",
    "The law was passed in 2020 and amended in 20{n}{m}.",
    "{p}: The answer is good. It gives {n} examples.",
    "{q} mentions {n} key points but misses {m} of them.",
    "Overall, {p} is more helpful than {q}.",
    "There are {n} factual errors in {q}'s response.",
    "{p} scored higher on accuracy, {q} on brevity.",
    "1. Accuracy: {p} is accurate.\n2. Detail: {q} gives {n} details.",
    "{p} - {n} steps; {q} - {m} steps.",
    "About 4 out of 5 readers, i.e. 80/100 of them, would prefer {p}.",
    "Both assistants get {n} things right.",
    "Step {n} of {p} is wrong, and {q} skips step {m}.",
]

# (template for one assistant's line, whether the label is a letter)
LINE_STYLES = [
    "Score of Assistant {i}: {s}",  # canonical: index 0
    "Score of the Assistant {i}: {s}",
    "Assistant {i}: {s}/10",
    "Assistant {i} score: {s}",
    "Assistant {i}'s score: {s} out of 10",
    "Assistant {i} = {s}",
    "Answer {i}: {s}",
    "Response {i}: {s}",
    "Assistant {c}: {s}",
    "**Score of Assistant {i}:** {s}",
    "**Assistant {i}**: **{s}**",
    "- Assistant {i}: {s}.",
    "{k}. Assistant {c}: {s}",
    "### Assistant {i}: {s}/10",
    "Assistant {i}'s score is {s}.",
    "Assistant {i} scored {s} out of 10.",
    "Assistant {i} gets a score of {s}.",
    "Assistant {i} – {s}",
]
PAIR_STYLES = [
    "Assistant {i1}: {s1}, Assistant {i2}: {s2}",
    "Assistant {i1}: {s1}; Assistant {i2}: {s2}",
    "Assistant {c1} - {s1} | Assistant {c2} - {s2}",
]
BARE_STYLES = ["{s1} {s2}", "{s1}, {s2}", "{s1}/10 {s2}/10"]
STYLES = (
    [("line", t) for t in LINE_STYLES]
    + [("pair", t) for t in PAIR_STYLES]
    + [("bare_first", t) for t in BARE_STYLES]
    + [("bare_last", t) for t in BARE_STYLES]
)

scores = st.one_of(st.integers(1, 10), st.integers(10, 100).map(lambda k: k / 10))


def fmt(score: float) -> str:
    return str(score) if isinstance(score, int) else f"{score:.1f}"


def render(style: tuple[str, str], a: float, b: float, prose: list[str], reverse: bool,
           swap: bool = False) -> str:
    """A referee output giving `a` to the first assistant and `b` to the second.

    `reverse` writes the second assistant's score first; `swap` labels the first
    assistant "2"/"B" and the second "1"/"A" (for bare lines: the order of the numbers).
    """
    ids, letters = (("2", "1"), ("B", "A")) if swap else (("1", "2"), ("A", "B"))
    kind, template = style
    body = "\n\n".join(
        s.format(p=f"Assistant {ids[0]}", q=f"Assistant {ids[1]}", n=i % 9 + 1, m=(i * 7) % 9 + 1)
        for i, s in enumerate(prose)
    )
    entries = [(ids[0], letters[0], fmt(a)), (ids[1], letters[1], fmt(b))]
    if reverse:
        entries.reverse()
    if kind.startswith("bare"):
        s1, s2 = (fmt(b), fmt(a)) if swap else (fmt(a), fmt(b))
        line = template.format(s1=s1, s2=s2)
        return f"{line}\n\n{body}" if kind == "bare_first" else f"{body}\n\n{line}"
    if kind == "pair":
        (i1, c1, s1), (i2, c2, s2) = entries
        return body + "\n\n" + template.format(i1=i1, c1=c1, s1=s1, i2=i2, c2=c2, s2=s2)
    lines = [template.format(i=i, c=c, s=s, k=k) for k, (i, c, s) in enumerate(entries, 1)]
    return body + "\n\n" + "\n".join(lines)


prose_lists = st.lists(st.sampled_from(PROSE), max_size=6)


@settings(max_examples=500, deadline=None)
@given(a=scores, b=scores, prose=prose_lists, style=st.sampled_from(STYLES), reverse=st.booleans())
def test_property_every_style_reads_exact_pair(a, b, prose, style, reverse) -> None:
    result = parse_referee_scores(render(style, a, b, prose, reverse))
    assert result in {(float(a), float(b)), None}  # never a wrong pair
    assert result == (float(a), float(b))  # and every supported style is read


@settings(max_examples=200, deadline=None)
@given(a=scores, b=scores, prose=prose_lists, reverse=st.booleans())
def test_property_canonical_style(a, b, prose, reverse) -> None:
    text = render(("line", LINE_STYLES[0]), a, b, prose, reverse)
    assert parse_referee_scores(text) == (float(a), float(b))


@settings(max_examples=300, deadline=None)
@given(a=scores, b=scores, style=st.sampled_from(STYLES), reverse=st.booleans(),
       noise=st.lists(st.one_of(st.sampled_from(PROSE), st.text(max_size=80)), max_size=5))
def test_property_random_noise_never_gives_wrong_pair(a, b, style, reverse, noise) -> None:
    # st.text() may contain braces, so it is inserted after formatting.
    text = render(style, a, b, [], reverse)
    noise_text = "\n".join(n.format(p="Assistant 1", q="Assistant 2", n=3, m=5)
                           if n in PROSE else n for n in noise)
    text = f"{noise_text}\n{text}" if style[0] != "bare_first" else f"{text}\n{noise_text}"
    assert parse_referee_scores(text) in {(float(a), float(b)), None}


@settings(max_examples=300, deadline=None)
@given(a=scores, b=scores, prose=prose_lists, style=st.sampled_from(STYLES), reverse=st.booleans())
def test_property_swapping_labels_swaps_result(a, b, prose, style, reverse) -> None:
    plain = parse_referee_scores(render(style, a, b, prose, reverse))
    swapped = parse_referee_scores(render(style, a, b, prose, reverse, swap=True))
    assert swapped == (None if plain is None else (plain[1], plain[0]))
    assert swapped == (float(b), float(a))


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        ("Good answers.\nScore of Assistant 1: 9\nScore of Assistant 2: 1", "length", None),  # "10" cut to "1"
        ("Good answers.\nScore of Assistant 1: 9\nScore of Assistant 2: 7.", "length", None),  # "7.5" cut to "7."
        ("Good answers.\nScore of Assistant 1: 9\nScore of Assistant 2: 1", "stop", (9.0, 1.0)),
        ("Score of Assistant 1: 9\nScore of Assistant 2: 6\nAssistant 1 was more det", "length", (9.0, 6.0)),
        ("Assistant 1 was more detailed", "length", None),
    ],
)
def test_read_review_distrusts_a_reply_cut_right_after_a_number(text, finish_reason, expected):
    assert read_explained_review(text, finish_reason) == expected


def test_real_reviews_are_read_with_no_wrong_pair() -> None:
    """8,524 real reviews with the score pairs their sources recorded: none read wrong, at least
    99% read. The pairs with a 0 are refused (the prompts asked for scores from 1 to 10)."""
    if not REAL_REVIEWS.exists():
        pytest.skip(f"{REAL_REVIEWS} is not present (real data is only beside the project, not in it)")
    reviews = [json.loads(line) for line in REAL_REVIEWS.open(encoding="utf-8")]
    labelled = [review for review in reviews if review["expected"] is not None]
    outcomes = Counter()
    for review in labelled:
        read = parse_referee_scores(review["text"])
        expected = tuple(review["expected"])
        outcome = "unread" if read is None else "right" if read == expected else "wrong"
        outcomes[outcome] += 1
        assert outcome != "wrong", (review["source"], review["text"][-300:], read, expected)
        if 0.0 in expected:
            assert read is None
    assert len(labelled) >= 8500
    assert outcomes["right"] >= 0.99 * len(labelled), outcomes
