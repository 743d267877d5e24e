"""Prompt builders and parsers of the teacher, generator and student roles (the referee has its own file)."""

from __future__ import annotations

import pytest

from lion_local.config import GeneratorRole
from lion_local.roles import generator_messages, parse_generated_instruction, referee_messages, student_prompt, teacher_messages
from lion_local.roles.generator import generator_max_tokens
from lion_local.roles.student import student_training_text


@pytest.mark.parametrize("input_text", ["", "The quick brown fox."])
def test_student_training_text_starts_with_the_exact_inference_prompt(input_text: str):
    prompt, completion = student_training_text("Summarize the sentence.", input_text, "A fox.", "</s>")
    assert prompt == student_prompt("Summarize the sentence.", input_text)
    assert completion == "A fox.</s>"
    assert prompt.endswith("### Response:\n")
    assert ("### Input:\nThe quick brown fox.\n\n" in prompt) == bool(input_text)


def test_teacher_and_referee_messages_carry_the_instruction_and_input():
    messages = teacher_messages("Translate it.", "Bonjour", system_prompt="Be brief.")
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate it.\n\nBonjour"}]
    review = referee_messages("Q?", "", "first answer", "second answer")[-1]["content"]
    assert review.index("Score of Assistant 1: <score>\nScore of Assistant 2: <score>") < review.index("[Question]\nQ?")
    assert review.index("[Question]\nQ?") < review.index("first answer") < review.index("second answer")
    assert review.endswith("second answer\n[End of Answer of Assistant 2]\n\nNow review the two answers as the task at the top says.")


def test_generator_templates_differ_by_seed_kind():
    hard = generator_messages("Write a haiku.", "", "hard")[0]["content"]
    easy = generator_messages("Write a haiku.", "", "easy")[0]["content"]
    assert "same task type" in hard and "long-tail" in easy
    assert hard.endswith("#Given Instruction#:\nWrite a haiku.\n\n#New Instruction#:")


def test_generator_length_budget_is_four_times_the_seed_words():
    role = GeneratorRole(max_tokens=256)
    assert generator_max_tokens(role, "one two three four five six seven eight") == 32
    assert generator_max_tokens(role, "short") == 16
    assert generator_max_tokens(role, "word " * 200) == 256


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Write a limerick about a cat.", "Write a limerick about a cat."),
        ("  #New Instruction#: Describe a storm at sea.\n", "Describe a storm at sea."),
        ("New instruction: List three rivers in Asia.", "List three rivers in Asia."),
        ("**Explain how tides work.**", "Explain how tides work."),
        ('"Name two prime numbers above 50."', "Name two prime numbers above 50."),
        ("Rewrite the code to use a loop.\nfor i in range(3): print(i)", "Rewrite the code to use a loop.\nfor i in range(3): print(i)"),
        ("", None),
        ("   \n ", None),
        ("1. Write a poem.\n2. Write a story.", None),
        ("- Explain gravity.\n- Explain magnetism.", None),
        ("Describe a bridge.\n\n#Given Instruction#:\nDescribe a tunnel.", None),
    ],
)
def test_parse_generated_instruction(reply: str, expected: str | None):
    assert parse_generated_instruction(reply) == expected
