"""The student role: a base model trained and queried with one shared prompt format.

`student_prompt` is the single source of the prompt text: imitation builds its training text
as `student_prompt(...) + answer + eos`, and discrimination sends `student_prompt(...)` to the
completions endpoint, so training and inference see byte-identical prompts.
"""

from __future__ import annotations

from lion_local.config import StudentRole
from lion_local.endpoints.client import Completion, EndpointClient
from lion_local.roles.templates import render


def student_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt (template student_alpaca.txt), ending where the answer begins."""
    return render("student_alpaca.txt", instruction=instruction, input=input_text)


def student_chat_messages(instruction: str, input_text: str = "") -> list[dict]:
    """Messages for prompt_format 'chat', where the checkpoint's own chat template applies."""
    return [{"role": "user", "content": render("teacher.txt", instruction=instruction, input=input_text).strip()}]


def student_training_text(instruction: str, input_text: str, answer: str, eos_token: str) -> tuple[str, str]:
    """(prompt, completion) for SFT with loss on the completion only, in the alpaca format."""
    return student_prompt(instruction, input_text), answer + eos_token


async def ask_student(
    client: EndpointClient, role: StudentRole, instruction: str, input_text: str = "", seed: int | None = None
) -> Completion:
    params = role.request_params(seed)
    if role.prompt_format == "chat":
        return await client.chat("student", student_chat_messages(instruction, input_text), **params)
    return await client.complete("student", student_prompt(instruction, input_text), **params)
