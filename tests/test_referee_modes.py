"""The referee's modes: each mode's prompt and request, the constrained replies' reading, the expected
score from top_logprobs (multi-token "10" included), the judge identity, and the config's refusal
of a mode the referee's engine cannot serve. Real vLLM serving the short modes: tests/test_vllm.py."""

from __future__ import annotations

import json
import math
import re

import pytest

from lion_local.config import ConfigError, RefereeRole, load_config
from lion_local.endpoints.client import Completion
from lion_local.roles import read_review, referee_identity, referee_messages
from lion_local.roles import referee as referee_module
from lion_local.roles.referee import referee_params
from lion_local.roles.referee_scores import SCORES_REGEX, expected_scores, read_scores, score_spans


def _alternatives(probabilities: dict[str, float]) -> list[dict]:
    return [{"token": token, "logprob": math.log(p) if p > 0 else -9999.0} for token, p in probabilities.items()]


def _tokens(*positions: tuple[str, dict[str, float]]) -> list[dict]:
    """Generated tokens: (sampled token, its position's distribution) each."""
    return [{"token": token, "logprob": 0.0, "top_logprobs": _alternatives(dist)} for token, dist in positions]


# ---------------------------------------------------------------------------------------------
# Prompts and requests
# ---------------------------------------------------------------------------------------------


def test_every_mode_puts_what_reviews_share_before_the_pair():
    layouts = {}
    for mode in ("explain_first", "scores_only", "expected_score"):
        for order in (("first answer", "second answer"), ("second answer", "first answer")):
            messages = referee_messages("Which is larger, 3 or 5?", "", *order, mode=mode)
            assert messages[0]["role"] == "system"
            user = messages[1]["content"]
            assert user.startswith("[Task]\n") and user.index("[Task]") < user.index("[Question]")
            layouts.setdefault(mode, []).append(user)
    for mode, (one_order, other_order) in layouts.items():
        # The two orders of one pair share everything up to the first answer: task and question.
        shared = one_order.split("[Answer of Assistant 1]")[0]
        assert other_order.startswith(shared) and shared.endswith("Which is larger, 3 or 5?\n\n"), mode
    assert "Score of Assistant 1: <score>" in layouts["explain_first"][0]
    assert layouts["scores_only"] == layouts["expected_score"]
    # No example scores for a small referee to copy, and the format restated after the answers.
    assert not re.search(r"\d+ \d+", layouts["scores_only"][0].replace("1 to 10", ""))
    assert layouts["scores_only"][0].endswith("Now give the two scores (1 to 10): Assistant 1's, a space, Assistant 2's.")
    json_prompt = referee_messages("Q?", "", "a", "b", mode="scores_only", structured_output="json_schema")
    assert '{"assistant_1": <score>, "assistant_2": <score>}' in json_prompt[1]["content"]


def test_each_mode_sends_its_constraint_and_a_small_max_tokens():
    explain = referee_params(RefereeRole(), seed=3)
    assert explain == {"temperature": 0.2, "top_p": 1.0, "max_tokens": 512, "seed": 3}
    scores = referee_params(RefereeRole(mode="scores_only"))
    assert scores["structured_outputs"] == {"regex": SCORES_REGEX} and scores["max_tokens"] == 8
    assert "logprobs" not in scores
    expected = referee_params(RefereeRole(mode="expected_score", structured_output="json_schema"))
    assert expected["response_format"]["type"] == "json_schema" and expected["max_tokens"] == 32
    assert expected["logprobs"] is True and expected["top_logprobs"] == 20


def test_the_judge_identity_changes_with_mode_prompt_and_system_prompt(monkeypatch: pytest.MonkeyPatch):
    identities = {mode: referee_identity(RefereeRole(mode=mode)) for mode in ("explain_first", "scores_only", "expected_score")}
    assert len(set(identities.values())) == 3
    assert referee_identity(RefereeRole(mode="scores_only", structured_output="json_schema")) != identities["scores_only"]
    assert "[Task]" in identities["explain_first"]  # the included criteria are part of it
    monkeypatch.setattr(referee_module, "SYSTEM_PROMPT", "You are a harsh judge.")
    assert referee_identity(RefereeRole()) != identities["explain_first"]


# ---------------------------------------------------------------------------------------------
# scores_only: the constrained reply
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finish_reason", "structured_output", "expected"),
    [
        ("8 9", "stop", "regex", (8.0, 9.0)),
        ("10 1", "stop", "regex", (10.0, 1.0)),
        (" 7 10\n", "stop", "regex", (7.0, 10.0)),
        ("10 1", "length", "regex", None),  # cut: the second score may have been 10
        ("0 5", "stop", "regex", None),
        ("11 5", "stop", "regex", None),
        ("8, 9", "stop", "regex", None),
        ("Assistant 1 is better. 8 9", "stop", "regex", None),  # the endpoint ignored the constraint
        ('{"assistant_1": 8, "assistant_2": 10}', "stop", "json_schema", (8.0, 10.0)),
        ('{\n  "assistant_2": 3,\n  "assistant_1": 9\n}', "stop", "json_schema", (9.0, 3.0)),
        ('{"assistant_1": 0, "assistant_2": 10}', "stop", "json_schema", None),
        ('{"assistant_1": 8.5, "assistant_2": 7}', "stop", "json_schema", None),
        ('{"assistant_1": 8, "assistant_2": 7, "winner": 1}', "stop", "json_schema", None),
        ('{"assistant_1": 8, "assistant_2": ', "length", "json_schema", None),
        ("8 9", "stop", "json_schema", None),
    ],
)
def test_a_constrained_reply_is_read_exactly_or_not_at_all(text, finish_reason, structured_output, expected):
    assert read_scores(text, finish_reason, structured_output) == expected


def test_read_review_follows_the_role_mode():
    explained = Completion("Both fine.\nScore of Assistant 1: 6\nScore of Assistant 2: 7", "stop", 10, 12, 0.1, "u")
    terse = Completion("6 7", "stop", 10, 3, 0.1, "u")
    assert read_review(explained, RefereeRole()) == (6.0, 7.0)
    assert read_review(explained, RefereeRole(mode="scores_only")) is None
    assert read_review(terse, RefereeRole(mode="scores_only")) == (6.0, 7.0)


# ---------------------------------------------------------------------------------------------
# expected_score: the probability-weighted mean at each score's position
# ---------------------------------------------------------------------------------------------


def test_expected_scores_weigh_single_token_scores_with_and_without_a_space():
    tokens = _tokens(("8", {"8": 0.5, "9": 0.25, "7": 0.25, "*": 0.0}), (" 9", {" 9": 0.6, "9": 0.2, " 5": 0.2}), ("</s>", {"</s>": 1.0}))
    assert expected_scores("8 9", "stop", "regex", tokens) == (8.0, 8.2)


def test_a_ten_spelled_as_two_tokens_is_split_by_the_next_position():
    # The reply went through "1": the next position's "0" (0.5) makes half of that mass a 10.
    tokens = _tokens(("1", {"1": 0.6, "9": 0.4}), ("0", {"0": 0.5, " ": 0.5}), (" ", {" ": 1.0}), ("3", {"3": 1.0}))
    teacher, student = expected_scores("10 3", "stop", "regex", tokens)
    assert teacher == pytest.approx(0.3 * 10 + 0.3 * 1 + 0.4 * 9)
    assert student == 3.0
    # The same position when the reply was a 1: the next position's "0" is still what splits it.
    ones = _tokens(("1", {"1": 0.6, "9": 0.4}), (" 3", {" 3": 0.9, "0": 0.1}))
    assert expected_scores("1 3", "stop", "regex", ones)[0] == pytest.approx(0.06 * 10 + 0.54 * 1 + 0.4 * 9)


def test_an_unsampled_one_counts_as_one_only_where_ten_is_a_token_of_its_own():
    own_ten = _tokens(("9", {"9": 0.5, "1": 0.2, "10": 0.3}), (" 4", {" 4": 1.0}))
    assert expected_scores("9 4", "stop", "regex", own_ten)[0] == pytest.approx(4.5 + 0.2 + 3.0)
    # No "10" token: "1" may be 1 or the start of 10, a split never computed; it is left out.
    split_ten = _tokens(("9", {"9": 0.6, "1": 0.4}), (" 4", {" 4": 1.0}))
    assert expected_scores("9 4", "stop", "regex", split_ten)[0] == 9.0
    # "1 " (a one that its token ends) is a 1 whatever the vocabulary.
    ended = _tokens(("9 ", {"9 ": 0.5, "1 ": 0.5}), ("4", {"4": 1.0}))
    assert expected_scores("9 4", "stop", "regex", ended) == (5.0, 4.0)


def test_expected_scores_in_the_json_form():
    pieces = [("{\"", {}), ("assistant", {}), ("_1", {}), ("\":", {}), (" 7", {" 7": 0.5, " 8": 0.5}), (",", {}),
              (" \"", {}), ("assistant", {}), ("_2", {}), ("\":", {}), (" 1", {" 1": 0.8, " 10": 0.2}), ("0", {"0": 1.0}),
              ("}", {})]
    text = "".join(token for token, _ in pieces)
    assert json.loads(text) == {"assistant_1": 7, "assistant_2": 10}
    assert score_spans(text, "json_schema") is not None
    assert expected_scores(text, "stop", "json_schema", _tokens(*pieces)) == (7.5, 10.0)


def test_unalignable_tokens_keep_the_sampled_scores_and_unreadable_replies_stay_unreadable():
    merged = _tokens(("8 9", {"8 9": 1.0}))  # one token spans both scores
    assert expected_scores("8 9", "stop", "regex", merged) == (8.0, 9.0)
    assert expected_scores("8 9", "stop", "regex", _tokens(("7", {}), (" 9", {}))) == (8.0, 9.0)  # not its tokens
    assert expected_scores("8 9", "stop", "regex", []) == (8.0, 9.0)
    assert expected_scores("Assistant 1 wins", "stop", "regex", _tokens(("Assistant 1 wins", {}))) is None
    assert expected_scores("10 1", "length", "regex", _tokens(("10", {"10": 1.0}), (" 1", {" 1": 1.0}))) is None


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["scores_only", "expected_score"])
def test_a_short_mode_on_transformers_serve_is_refused_naming_the_key(mode: str):
    with pytest.raises(ConfigError, match=rf"roles\.referee\.mode: {mode} needs structured outputs.*serve the referee with vllm"):
        load_config("configs/tiny-cpu-transformers.yaml", [f"roles.referee.mode={mode}"])
    assert load_config("configs/tiny-cpu.yaml", [f"roles.referee.mode={mode}"]).roles.referee.mode == mode


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"roles\.referee\.mode.*explain_first.*scores_only.*expected_score"):
        load_config("configs/tiny-cpu.yaml", ["roles.referee.mode=scores"])
