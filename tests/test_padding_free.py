"""Padding-free student training (imitation.trainer.padding_free, passed through to TRL): the batch is
one flat sequence, the loss stays on the teacher's answer only, and each example attends only to
itself, so the loss equals the padded batch's. Built from the stage's own training examples and the
training process's own SFTConfig arguments (lion_local/stages/sft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lion_local.config import load_config
from lion_local.stages.imitation import training_examples
from lion_local.run.sft_job import SftJob
from lion_local.stages.sft import sft_config_kwargs

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"id": "a", "instruction": "Name a primary colour.", "input": ""},
    {"id": "b", "instruction": "Translate the word into French.", "input": "house"},
    {"id": "c", "instruction": "Give two reasons to exercise every day of the week.", "input": ""},
]
ANSWERS = {
    "a": {"answer": "Red.", "empty": False},
    "b": {"answer": "Maison.", "empty": False},
    "c": {"answer": "It strengthens the heart and it improves sleep.", "empty": False},
}


def _trainer(tiny_models: Path, tmp_path: Path, padding_free: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = load_config(ROOT / "configs/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}"])
    student = str(tiny_models / "student")
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    examples = training_examples(config, RECORDS, ANSWERS, tokenizer.eos_token)
    imitation = config.imitation.model_dump(mode="json")
    imitation["trainer"] = {**imitation["trainer"], "padding_free": padding_free, "per_device_train_batch_size": 3}
    job = SftJob(base_model=student, data_file="", output_dir="", work_dir=str(tmp_path / f"work-{padding_free}"),
                 progress_file="", result_file="", tensorboard_dir=None, seed=0, adapter_init=None, imitation=imitation)
    kwargs = sft_config_kwargs(job, world_size=1, on_gpu=False, attn_implementation="sdpa")
    trainer = SFTTrainer(model=student, args=SFTConfig(**kwargs), train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer)
    return trainer, examples, tokenizer


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return rows, trainer.data_collator(rows)


@pytest.mark.integration
def test_padding_free_batches_keep_the_loss_on_the_answer_and_equal_the_padded_loss(tiny_models: Path, tmp_path: Path):
    import torch

    padded_trainer, examples, tokenizer = _trainer(tiny_models, tmp_path, padding_free=False)
    free_trainer, _, _ = _trainer(tiny_models, tmp_path, padding_free=True)
    rows, padded = _batch(padded_trainer)
    _, free = _batch(free_trainer)

    # A label is set exactly on the teacher's answer (the end of each example), never on the prompt.
    for row, example in zip(rows, examples):
        answer = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        labels = row["labels"]
        assert labels[: -len(answer)] == [-100] * (len(labels) - len(answer))
        assert labels[-len(answer):] == row["input_ids"][-len(answer):] == answer
    assert int((padded["labels"] != -100).sum()) == sum(sum(label != -100 for label in row["labels"]) for row in rows)

    # Padding-free: whole examples in one flat row with no padding, positions restarting at each.
    lengths = sorted(len(row["input_ids"]) for row in rows)
    assert free["input_ids"].shape == (1, sum(lengths))
    assert int((free["position_ids"][0] == 0).sum()) == len(rows)
    assert int((free["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())

    # Each example sees only itself: the same model gives the padded batch's loss.
    model = padded_trainer.model.eval()
    with torch.no_grad():
        padded_loss = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
        free_loss = model(input_ids=free["input_ids"], position_ids=free["position_ids"], labels=free["labels"]).loss
    assert float(free_loss) == pytest.approx(float(padded_loss), abs=1e-5)
    # The check can fail: the same flat row with positions running on (attention across examples).
    with torch.no_grad():
        running = torch.arange(free["input_ids"].shape[1])[None]
        crossed = model(input_ids=free["input_ids"], position_ids=running, labels=free["labels"]).loss
    assert abs(float(crossed) - float(padded_loss)) > 1e-4
