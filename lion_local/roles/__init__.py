"""The four roles of the method, each a module holding its prompt builder, its parser and its call.

Templates are text files next to the modules; `student_prompt` is shared by training and inference.
"""

from lion_local.roles.generator import ask_generator, generator_messages, parse_generated_instruction
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
    "read_explained_review",
    "read_review",
    "referee_identity",
    "referee_messages",
    "student_prompt",
    "teacher_messages",
]
