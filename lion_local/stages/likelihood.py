"""How far a model is from the teacher's answers: its mean negative log-likelihood per answer token.

A judge-free progress figure: for each (question, teacher answer), the model's NLL of the answer's
tokens given the question in the model's own prompt format, summed over every answer and divided
by their token count (the quantity imitation minimises, so it falls as the student learns). A
student is scored in its training format, the tokens built the way TRL builds a training example
(prompt and answer tokenized together; the answer starts where that diverges from the prompt
alone); the teacher in its chat template, which gives the teacher's own figure to compare with.

Where the model is served by vLLM, one prefill per answer on its server gives the figure: a
/v1/completions request whose prompt is the token ids, with max_tokens 1 and prompt_logprobs 0,
returns each prompt token's log-probability. `transformers serve` returns no prompt
log-probabilities, so a model it serves is scored in this process with transformers instead
(`local_nll`, the reason recorded beside the figure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from lion_local.endpoints.client import EndpointClient, EndpointError
from lion_local.roles.student import student_chat_messages, student_prompt
from lion_local.roles.teacher import teacher_messages

logger = logging.getLogger(__name__)

SERVER_METHOD = "vLLM prompt logprobs on the model's server"
LOCAL_METHOD = "transformers in lion-local's process (the server's engine returns no prompt logprobs)"


@dataclass(frozen=True)
class Scored:
    """One answer to score: the token ids of prompt and answer, and where the answer starts."""

    ids: list[int]
    start: int


# ----------------------------------------------------------------------------------------------
# Token ids (pure, given a tokenizer)
# ----------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _ids(tokenizer, text_or_messages, **chat) -> list[int]:
    """Token ids as TRL's SFT tokenizes a text (the tokenizer's own special tokens) or a conversation."""
    if isinstance(text_or_messages, str):
        return list(tokenizer(text=text_or_messages)["input_ids"])
    return list(tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **chat)["input_ids"])


def student_scored(tokenizer, prompt_format: str, instruction: str, input_text: str, answer: str) -> Scored:
    """The answer as the student is trained on it (lion_local.stages.imitation, TRL's tokenization)."""
    if prompt_format == "chat":
        prompt = student_chat_messages(instruction, input_text)
        full = _ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])
        return Scored(full, _common_prefix(_ids(tokenizer, prompt, add_generation_prompt=True), full))
    prompt = student_prompt(instruction, input_text)
    full = _ids(tokenizer, prompt + answer + (tokenizer.eos_token or ""))
    return Scored(full, _common_prefix(_ids(tokenizer, prompt), full))


def teacher_scored(tokenizer, system_prompt: str | None, instruction: str, input_text: str, answer: str) -> Scored:
    """The answer in the teacher's own chat template, after the prompt the teacher was asked with."""
    prompt = teacher_messages(instruction, input_text, system_prompt)
    full = _ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])
    return Scored(full, _common_prefix(_ids(tokenizer, prompt, add_generation_prompt=True), full))


def mean_nll(values: list[dict]) -> dict:
    """{"mean_nll", "tokens", "answers"} over per-answer {"nll" (summed), "tokens"} records."""
    tokens = sum(v["tokens"] for v in values)
    total = sum(v["nll"] for v in values)
    return {"mean_nll": round(total / tokens, 4) if tokens else None, "tokens": tokens, "answers": len(values)}


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


async def server_nll(client: EndpointClient, role: str, scored: Scored) -> dict:
    """{"nll", "tokens"} of one answer from its server's prompt log-probabilities."""
    completion = await client.complete(role, scored.ids, max_tokens=1, temperature=0.0, prompt_logprobs=0)
    logprobs = completion.prompt_logprobs
    if logprobs is None or len(logprobs) != len(scored.ids):
        raise EndpointError(
            f"endpoint '{client.name}' returned no prompt logprobs for the {role}'s answer likelihood "
            f"({'none' if logprobs is None else f'{len(logprobs)} for {len(scored.ids)} tokens'}); it needs vLLM"
        )
    total = 0.0
    for position in range(max(1, scored.start), len(scored.ids)):
        total -= _token_logprob(logprobs[position], scored.ids[position])
    return {"nll": round(total, 6), "tokens": len(scored.ids) - max(1, scored.start),
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "seconds": round(completion.seconds, 4)}


def _token_logprob(entry: dict | None, token: int) -> float:
    """The actual token's log-probability in one position of vLLM's prompt_logprobs."""
    if not entry:
        raise EndpointError("a prompt position without its log-probability")
    found = entry.get(str(token), entry.get(token))
    if found is None:
        raise EndpointError(f"the prompt logprobs lack token {token} at its position")
    return float(found["logprob"] if isinstance(found, dict) else found)


def local_nll(model_dir: str, items: list[Scored]) -> list[dict]:
    """{"nll", "tokens"} of each answer under the model in `model_dir`, computed here with transformers."""
    return list(local_nll_each(model_dir, items))


def local_nll_each(model_dir: str, items: list[Scored]) -> Iterator[dict]:
    """local_nll one answer at a time (the model loaded once), for a caller that journals each."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for scored in items:
            ids = torch.tensor([scored.ids])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            start = max(1, scored.start)
            picked = logprobs[start - 1 :, :].gather(1, ids[0, start:].unsqueeze(1))
            yield {"nll": round(-picked.sum().item(), 6), "tokens": len(scored.ids) - start}


async def score_all(client: EndpointClient | None, role: str, model_dir: str, items: list[Scored]) -> list[dict]:
    """Every item scored on `client`'s server, or here with transformers when `client` is None."""
    if client is None:
        return await asyncio.to_thread(local_nll, model_dir, items)
    return list(await asyncio.gather(*(server_nll(client, role, item) for item in items)))
