"""Tokens per call of each role, for `lion-local plan` (lion_local.commands.plan).

Per role: the observed means of the run's journals once the role has made calls; before that,
prompts are the real role prompts (lion_local.roles) built for a sample of the seed instructions
and counted with the teacher's tokenizer when its model directory is here (the chat template
applied), else at CHARS_PER_TOKEN characters per token; the referee's prompt adds the teacher's
and the student's completion estimates, in the referee's mode; completions are the role's
max_tokens (the generator's length budget; for the referee, its mode's), an upper bound.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from statistics import fmean

from lion_local.config import Config
from lion_local.roles import generator_messages, referee_messages, student_prompt, teacher_messages
from lion_local.roles.generator import generator_max_tokens
from lion_local.roles.referee import referee_params
from lion_local.roles.student import student_chat_messages
from lion_local.run.layout import RunDir
from lion_local.run.record_types import CallFields, LikelihoodGap
from lion_local.run.state import read_jsonl
from lion_local.stages.role_calls import ROLES, call_journals

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
TOKEN_SAMPLE = 200  # seed instructions whose prompts are built and counted


class TokenCounter:
    """Tokens of a prompt: the teacher's tokenizer when its directory is here, else characters / 4."""

    def __init__(self, model_dir: str | None) -> None:
        self.tokenizer = None
        self.description = f"about {CHARS_PER_TOKEN} characters per token (no local tokenizer)"
        if model_dir and Path(model_dir).is_dir():
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
                self.description = f"the teacher's tokenizer ({model_dir})"
            except (OSError, ValueError, ImportError) as exc:
                logger.warning("cannot load the tokenizer of %s (%s); estimating tokens from characters", model_dir, exc)

    def text(self, text: str) -> int:
        if self.tokenizer is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN)
        return len(self.tokenizer(text)["input_ids"])

    def chat(self, messages: list[dict]) -> int:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return self.text("\n".join(m["content"] for m in messages))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def per_call_tokens(config: Config, run: RunDir, sample: list[dict]) -> tuple[dict, str]:
    """Prompt and completion tokens per call of each role, with where each number comes from."""
    # Calls without reported usage (an endpoint that returns none) say nothing about tokens.
    observed = {role: [r for r in role_records(config, run, role) if r.get("prompt_tokens")] for role in ROLES}
    roles = config.roles
    step = max(1, len(sample) // TOKEN_SAMPLE)
    texts = [(r["instruction"], r["input"]) for r in sample[::step][:TOKEN_SAMPLE]] or [("", "")]
    completion = {
        "teacher": (roles.teacher.max_tokens, "max_tokens, an upper bound"),
        "student": (roles.student.max_tokens, "max_tokens, an upper bound"),
        "referee": (referee_params(roles.referee)["max_tokens"], f"max_tokens of mode {roles.referee.mode}, an upper bound"),
        "generator": (fmean(generator_max_tokens(roles.generator, i) for i, _ in texts), "length budget, an upper bound"),
    }
    prefills = config.discrimination.signal == "likelihood"  # the student's calls: prompt and teacher answer, prefilled
    if prefills:
        on_vllm = config.server_for("student").engine == "vllm"  # else scored in lion-local's process
        completion["student"] = (int(on_vllm), "signal likelihood: " + ("one token per prefill" if on_vllm else "scored here"))
    for role, records in observed.items():
        if records:
            completion[role] = (fmean(r["completion_tokens"] for r in records), f"observed mean of {len(records)} calls")
    prompt_sources = {role: f"observed mean of {len(observed[role])} calls" for role in ROLES if observed[role]}
    counting = "the run's journals (observed)"
    estimate: dict[str, float] = {}
    if len(prompt_sources) < len(ROLES):
        count = TokenCounter(config.server_for("teacher").model)  # an external teacher's local copy, if any
        counting = count.description
        chat_student = roles.student.prompt_format == "chat"
        answers = completion["teacher"][0] + completion["student"][0]
        estimate = {
            "teacher": fmean(count.chat(teacher_messages(i, x, roles.teacher.system_prompt)) for i, x in texts),
            "student": fmean(
                count.chat(student_chat_messages(i, x)) if chat_student else count.text(student_prompt(i, x)) for i, x in texts
            ) + (completion["teacher"][0] if prefills else 0),
            "referee": fmean(
                count.chat(referee_messages(i, x, "", "", roles.referee.mode, roles.referee.structured_output, roles.referee.system_prompt))
                for i, x in texts
            ) + answers,
            "generator": fmean(count.chat(generator_messages(i, x, side)) for i, x in texts for side in ("hard", "easy")),
        }
    per_call = {}
    for role in ROLES:
        if observed[role]:
            prompt = fmean(r["prompt_tokens"] for r in observed[role])
        else:
            prompt = estimate[role]
            prompt_sources[role] = "role prompts of sample instructions" + (
                " + teacher and student completions" if role == "referee" else ""
            ) + (" + the teacher's completion" if role == "student" and prefills else "")
        per_call[role] = {
            "prompt_tokens": round(prompt, 2),
            "completion_tokens": round(completion[role][0], 2),
            "prompt_source": prompt_sources[role],
            "completion_source": completion[role][1],
        }
    return per_call, counting


def role_records(config: Config, run: RunDir, role: str) -> list[CallFields | LikelihoodGap]:
    """Every journaled call of a role in the run so far (the student's prefills included; the
    referee's on control pairs not)."""
    if role == "teacher":
        return read_jsonl(run.teacher_answers)
    journals = [path for k in range(1, config.iterations + 1) for path in call_journals(run.iteration(k), role, controls=False)]
    return [r for path in journals for r in read_jsonl(path)]
