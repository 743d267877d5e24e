"""The judge-free progress figure (lion_local/stages/likelihood.py): the student's NLL of the teacher's
answers. Its tokens are the training example's, token for token (TRL's own tokenization); the figure
read from vLLM-style prompt logprobs equals the one computed with transformers; and `evaluate` writes
it for the initial student and each checkpoint. On vLLM's CPU build itself: tests/test_real_model.py."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from fake_endpoint import FakeServers, answering_endpoint

from lion_local.commands.evaluation import Checkpoint, run_evaluation, select_checkpoints
from lion_local.config import load_config
from lion_local.endpoints.client import EndpointClient, EndpointError
from lion_local.run.layout import Iteration, RunDir
from lion_local.run.questions import default_questions, load_questions
from lion_local.stages.likelihood import Scored, local_nll, mean_nll, server_nll, student_scored, teacher_scored

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Water expands as it freezes, so ice is less dense than the water around it."


@pytest.mark.integration
def test_the_scored_tokens_are_the_training_example_s(tiny_models: Path, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lion_local.roles.student import student_training_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    prompt, completion = student_training_text("Why does ice float?", "", ANSWER, tokenizer.eos_token)
    trainer = SFTTrainer(
        model=str(tiny_models / "student"),
        args=SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", completion_only_loss=True,
                       max_length=512, activation_checkpointing=False),
        train_dataset=Dataset.from_list([{"prompt": prompt, "completion": completion}]),
        processing_class=tokenizer,
    )
    example = trainer.train_dataset[0]
    scored = student_scored(tokenizer, "alpaca", "Why does ice float?", "", ANSWER)
    assert scored.ids == example["input_ids"]
    loss_on = example["completion_mask"] if "completion_mask" in example else [int(x != -100) for x in example["labels"]]
    assert scored.start == loss_on.index(1)  # the loss starts where the answer does
    assert tokenizer.decode(scored.ids[scored.start:]) == ANSWER + tokenizer.eos_token

    chat = student_scored(tokenizer, "chat", "Why does ice float?", "", ANSWER)
    assert tokenizer.decode(chat.ids[chat.start:]).startswith(ANSWER)
    teacher = teacher_scored(AutoTokenizer.from_pretrained(tiny_models / "teacher"), "Be brief.", "Why?", "", ANSWER)
    assert 0 < teacher.start < len(teacher.ids)


@pytest.mark.integration
def test_prompt_logprobs_and_transformers_give_the_same_figure(tiny_models: Path):
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    scored = student_scored(tokenizer, "alpaca", "Name a colour.", "", "Blue is a colour.")
    [local] = local_nll(str(tiny_models / "student"), [scored])

    model = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([scored.ids])).logits[0], dim=-1)
    # vLLM's form: None for the first token, then {token id: {"logprob", "rank", "decoded_token"}}.
    served = [None] + [{str(token): {"logprob": logprobs[i - 1, token].item(), "rank": 1}}
                       for i, token in enumerate(scored.ids) if i]

    endpoint = answering_endpoint()
    endpoint.handlers["student"] = lambda body: ("x", "length", served)
    try:
        async def ask() -> dict:
            async with EndpointClient("student", [endpoint.url + "/v1"], "m") as client:
                return await server_nll(client, "student", scored)

        remote = asyncio.run(ask())
        body = endpoint.bodies("student")[0]
        assert body["prompt"] == scored.ids and body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
        endpoint.handlers["student"] = lambda body: ("x", "length")  # an engine without prompt logprobs
        with pytest.raises(EndpointError, match="returned no prompt logprobs"):
            asyncio.run(ask())
    finally:
        endpoint.stop()
    assert remote["tokens"] == local["tokens"] == len(scored.ids) - scored.start
    assert math.isclose(remote["nll"], local["nll"], rel_tol=1e-4)
    assert mean_nll([local, local])["mean_nll"] == round(local["nll"] / local["tokens"], 4)


def test_a_first_token_answer_is_scored_from_the_second_position():
    assert mean_nll([]) == {"mean_nll": None, "tokens": 0, "answers": 0}
    assert Scored([5, 6, 7], 0).start == 0  # the first token has no log-probability: server_nll starts at 1


@pytest.mark.integration
@pytest.mark.parametrize("teacher", ["vllm", "external with a local copy", "external"])
def test_evaluate_writes_the_likelihood_of_the_initial_student_and_each_checkpoint(teacher: str, tiny_models: Path, tmp_path: Path):
    """Every prompt token at log-probability -0.5 (the fake's answer), so every figure is exactly 0.5.
    An external teacher is scored on its endpoint with its local copy's tokenizer; without one, its
    figure is not measured and says how to have it."""
    import shutil

    endpoint = answering_endpoint()
    endpoint.handlers["referee"] = lambda body: ("Score of Assistant 1: 8\nScore of Assistant 2: 5", "stop")
    endpoint.handlers["student"] = lambda body: (
        ("x", "length", [None] + [{str(t): {"logprob": -0.5}} for t in body["prompt"][1:]])
        if isinstance(body["prompt"], list) else ("A student answer.", "stop")
    )
    config = load_config(ROOT / "configs/tiny-cpu.yaml", [
        f"run_dir={tmp_path / 'run'}", f"tiny_models.dir={tiny_models}", f"servers.teacher.model={tiny_models / 'teacher'}",
        f"servers.student.model={tiny_models / 'student'}", "seed_limit=10", "evaluation.held_out_seeds=4",
        *(["servers.teacher={engine: external, base_urls: ['http://127.0.0.1:9/v1'], served_model_name: teacher"
           + (f", model: {tiny_models / 'teacher'}" if teacher != "external" else "") + "}"] if teacher != "vllm" else []),
    ])
    run = RunDir(config.run_dir)
    shutil.copytree(tiny_models / "student", run.iteration(1).student)
    questions = load_questions(default_questions())[:3]
    checkpoints = [Checkpoint(None, tiny_models / "student"), *select_checkpoints(run)]
    from lion_local.commands.evaluation_likelihood import held_out_seeds

    held_out = held_out_seeds(config, run)
    try:
        results = asyncio.run(run_evaluation(config, run, checkpoints, questions, FakeServers(endpoint), held_out))
    finally:
        endpoint.stop()
    assert [r["checkpoint"] for r in results] == ["initial", "iter_1"]
    assert "relative_score" not in results[0] and results[1]["relative_score"] == 100.0  # 8 and 5 in either order
    for result in results:
        likelihood = json.loads((run.evaluation(Iteration(1) if result["checkpoint"] == "iter_1" else None).result)
                                .read_text())["likelihood"]
        assert likelihood["questions"]["mean_nll"] == 0.5 and likelihood["questions"]["answers"] == 3
        assert likelihood["held_out"]["answers"] == 4 and likelihood["held_out"]["mean_nll"] == 0.5
        if teacher == "external":
            assert likelihood["teacher"]["questions"] is None
            assert "set servers.teacher.model to a local copy" in likelihood["teacher"]["method"]
        else:
            assert likelihood["teacher"]["questions"]["mean_nll"] == 0.5  # the teacher's own, on its server
            assert likelihood["teacher"]["method"].startswith("vLLM prompt logprobs")
    from lion_local.run.records import seed_records

    assert len(held_out) == 4 and not {h["id"] for h in held_out} & {r["id"] for r in seed_records(config)}
