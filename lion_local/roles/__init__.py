"""The four roles of the method, each a module holding its prompt builder, its parser and its call.

Templates are text files next to the modules; `student_prompt` is shared by training and inference.
"""

from importlib import resources

from lion_local.roles.generator import ask_generator, generator_messages, parse_generated_instruction
from lion_local.roles import referee
from lion_local.roles.referee import (
    ask_referee,
    parse_referee_scores,
    read_explained_review,
    read_review,
    referee_identity,
    referee_messages,
)
from lion_local.roles.student import ask_student, student_prompt
from lion_local.roles.teacher import ask_teacher, parse_teacher_answer, teacher_messages

__all__ = [
    "ask_generator",
    "ask_referee",
    "ask_student",
    "ask_teacher",
    "generator_messages",
    "parse_generated_instruction",
    "parse_referee_scores",
    "parse_teacher_answer",
    "prompt_texts",
    "read_explained_review",
    "read_review",
    "referee_identity",
    "referee_messages",
    "student_prompt",
    "teacher_messages",
]


def prompt_texts() -> dict[str, str]:
    """Every prompt text the package ships, by name: each template file and the built-in system
    prompts. A run's identity includes them, so an edited prompt cannot mix into a started run."""
    templates = sorted((e for e in resources.files(__name__).iterdir() if e.name.endswith(".txt")), key=lambda e: e.name)
    texts = {entry.name: entry.read_text(encoding="utf-8") for entry in templates}
    texts["referee.SYSTEM_PROMPT"] = referee.SYSTEM_PROMPT
    return texts
