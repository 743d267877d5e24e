"""The student sees byte-identical prompts in training and at inference (`student_prompt`, lion_local/roles/student.py).

The training side is the prompt/completion row imitation writes for SFTTrainer; the inference
side is the `prompt` field the student role actually sends to /v1/completions, captured by a
small fake endpoint. Both are compared as bytes, for an instruction with and without an input.
Then TRL's own tokenization of the training row is checked: the part excluded from the loss of the
sequence is exactly the tokenization of the inference prompt, and the loss covers the answer
and the end-of-sequence token only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from lion_local.config import load_config
from lion_local.endpoints.client import EndpointClient
from lion_local.stages.imitation import training_examples
from lion_local.run.records import instruction_record
from lion_local.roles.student import ask_student

ROOT = Path(__file__).resolve().parents[1]
EOS = "</s>"
CASES = [
    instruction_record("Summarize the paragraph below in one sentence.", "Tides rise twice a day.\nWhy?", "seed", 0, None),
    instruction_record("Name three uses of a paperclip.", "", "seed", 0, None),
    instruction_record("Translate to French: 'good morning' — ünïcode & <tags>", "", "seed", 0, None),
]
ANSWER = "A short answer,\nwith a second line."


def _config():
    return load_config(ROOT / "configs/tiny-cpu.yaml", ["run_dir=/nonexistent/run"])


async def _prompts_sent(records: list[dict]) -> list[str]:
    received: list[str] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body["prompt"])
        return web.json_response(
            {
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    config = _config()
    try:
        async with EndpointClient("student", [f"http://127.0.0.1:{port}/v1"], "student") as client:
            for record in records:
                await ask_student(client, config.roles.student, record["instruction"], record["input"], seed=1)
    finally:
        await runner.cleanup()
    return received


def _training_rows(records: list[dict]) -> list[dict]:
    answers = {r["id"]: {"answer": ANSWER, "empty": False} for r in records}
    return training_examples(_config(), records, answers, EOS)


def test_training_prompt_and_inference_prompt_are_byte_identical() -> None:
    sent = asyncio.run(_prompts_sent(CASES))
    rows = _training_rows(CASES)
    assert len(sent) == len(rows) == len(CASES)
    for record, prompt, row in zip(CASES, sent, rows):
        assert row["prompt"].encode("utf-8") == prompt.encode("utf-8")
        assert row["completion"] == ANSWER + EOS
        assert record["instruction"] in prompt
        assert ("### Input:" in prompt) == bool(record["input"])
        assert prompt.endswith("### Response:\n")


@pytest.mark.integration
def test_trl_masks_exactly_the_inference_prompt(tiny_models: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    sent = asyncio.run(_prompts_sent(CASES))
    rows = [{"prompt": row["prompt"], "completion": row["completion"]} for row in _training_rows(CASES)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    trainer = SFTTrainer(
        model=str(tiny_models / "student"),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            report_to="none",
            completion_only_loss=True,
            max_length=512,
            activation_checkpointing=False,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    dataset = trainer.train_dataset
    for index, prompt in enumerate(sent):
        input_ids = dataset[index]["input_ids"]
        labels = dataset[index]["labels"]  # -100 where the loss is off
        served_prompt_ids = tokenizer(prompt)["input_ids"]  # what the completions server tokenizes
        answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
        prompt_length = len(served_prompt_ids)
        assert input_ids[:prompt_length] == served_prompt_ids
        assert input_ids[prompt_length:] == answer_ids + [tokenizer.eos_token_id]
        assert labels == [-100] * prompt_length + input_ids[prompt_length:]
