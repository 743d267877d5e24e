"""The tiny teacher's acceptance check: what the smoke runs and the tests rely on it doing.

The tiny teacher's weights differ from CPU to CPU (same seed, other float kernels), so what it
writes does too. Every build ends with this check, greedy and in process, on ACCEPTANCE_SEEDS seed
instructions spread over the seed file; a teacher that passes it:

- answers every instruction with text;
- writes a readable review (both scores) of its own answer against a garbled one, in both
  orders, for at least MIN_READABLE_REVIEWS of the 2 * ACCEPTANCE_SEEDS pairs;
- writes one new instruction of at least MIN_INSTRUCTION_WORDS words for at least
  MIN_WELL_FORMED_INSTRUCTIONS of the 2 * ACCEPTANCE_SEEDS hard and easy requests.

A teacher that fails is not written: the build stops naming the figure that fell short. Tests
that count what the served teacher writes assert these figures, with a margin for the server's
sampling and batching, never a count seen on one host.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from lion_local.errors import LionError
from lion_local.roles.generator import generator_messages, parse_generated_instruction
from lion_local.roles.referee import parse_referee_scores, referee_messages
from lion_local.roles.teacher import parse_teacher_answer, teacher_messages
from lion_local.run.seed_data import SeedInstruction

logger = logging.getLogger(__name__)

ACCEPTANCE_SEEDS = 8
MIN_READABLE_REVIEWS = 14  # of 16
MIN_WELL_FORMED_INSTRUCTIONS = 12  # of 16
MIN_INSTRUCTION_WORDS = 4

# Greedy completions of several chats (each a list of messages), up to a number of new tokens.
Generate = Callable[[list[list[dict]], int], list[str]]


class TinyTeacherRejected(LionError):
    """The trained tiny teacher fell short of its acceptance check."""


def acceptance_seeds(seeds: list[SeedInstruction]) -> list[SeedInstruction]:
    """ACCEPTANCE_SEEDS instructions spread over the seed file (the categories are in blocks)."""
    return seeds[:: max(1, len(seeds) // ACCEPTANCE_SEEDS)][:ACCEPTANCE_SEEDS]


def well_formed_instruction(text: str) -> bool:
    parsed = parse_generated_instruction(text)
    return parsed is not None and len(parsed.split()) >= MIN_INSTRUCTION_WORDS


def acceptance_figures(generate: Generate, seeds: list[SeedInstruction]) -> dict[str, int]:
    """What the teacher writes for the acceptance seeds, counted (three batches of requests)."""
    chosen = acceptance_seeds(seeds)
    answers = generate([teacher_messages(seed.instruction, seed.input) for seed in chosen], 64)
    rng = random.Random(0)
    pairs = []
    for seed, answer in zip(chosen, answers):
        words = answer.split() or ["nothing"]
        garbled = " ".join(rng.sample(words, len(words)))
        pairs += [(seed, answer, garbled), (seed, garbled, answer)]
    reviews = generate([referee_messages(seed.instruction, seed.input, first, second) for seed, first, second in pairs], 64)
    instructions = generate([generator_messages(seed.instruction, seed.input, kind)
                             for seed in chosen for kind in ("hard", "easy")], 48)
    return {
        "answers": sum(parse_teacher_answer(answer) is not None for answer in answers),
        "readable_reviews": sum(parse_referee_scores(review) is not None for review in reviews),
        "well_formed_instructions": sum(well_formed_instruction(text) for text in instructions),
    }


def check_acceptance(figures: dict[str, int]) -> None:
    """Raise TinyTeacherRejected naming each figure below its floor."""
    floors = {"answers": ACCEPTANCE_SEEDS, "readable_reviews": MIN_READABLE_REVIEWS,
              "well_formed_instructions": MIN_WELL_FORMED_INSTRUCTIONS}
    short = [f"{name.replace('_', ' ')} {figures[name]} of {2 * ACCEPTANCE_SEEDS if name != 'answers' else ACCEPTANCE_SEEDS}"
             f" (needs {floor})" for name, floor in floors.items() if figures[name] < floor]
    if short:
        raise TinyTeacherRejected("the tiny teacher failed its acceptance check: " + "; ".join(short)
                                  + "; build it with another tiny_models.seed or more TinyBuild.train_steps")
    logger.info("tiny teacher accepted: %s", figures)
