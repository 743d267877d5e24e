"""The teacher role: answers an instruction through the chat-completions endpoint."""

from __future__ import annotations

from lion_local.config import TeacherRole
from lion_local.endpoints.client import Completion, EndpointClient
from lion_local.roles.templates import render


def teacher_messages(instruction: str, input_text: str = "", system_prompt: str | None = None) -> list[dict]:
    """The chat messages asking the teacher for an answer (template: teacher.txt)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": render("teacher.txt", instruction=instruction, input=input_text).strip()})
    return messages


def parse_teacher_answer(text: str) -> str | None:
    """The answer text, or None when the teacher returned nothing usable."""
    answer = text.strip()
    return answer or None


async def ask_teacher(
    client: EndpointClient, role: TeacherRole, instruction: str, input_text: str = "", seed: int | None = None
) -> Completion:
    params = role.request_params(seed)
    return await client.chat("teacher", teacher_messages(instruction, input_text, role.system_prompt), **params)
