"""Which of the real teacher's layers make the best student: NLL of held-out teacher answers before and
after the same short training, for several layer selections side by side.

    .venv/bin/python benchmarks/student_layers.py --run runs/smollm2-cpu [--steps 10]

Reads a finished real-model run (make demo-real: its evaluation too): the teacher's answers the run
trained on (teacher_answers.jsonl) are the training set, the teacher's answers to the evaluation
questions and held-out seeds (eval/teacher_answers.jsonl) the held-out set. Each selection is cut
from models/smollm2-135m/teacher by lion-local's own builder (lion_local.smoke.real_model), scored in
the student's training format (lion_local.stages.likelihood, with transformers) and trained with
AdamW at the real-model config's learning rate and batch size, answers only in the loss.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lion_local.commands.evaluation_likelihood import held_out_seeds
from lion_local.config import load_config
from lion_local.run.layout import RunDir
from lion_local.run.questions import default_questions, load_questions
from lion_local.smoke.real_model import build_student
from lion_local.stages.likelihood import Scored, local_nll, mean_nll, student_scored

SELECTIONS = {
    "first 6": (0, 1, 2, 3, 4, 5),
    "every 5th": (0, 5, 10, 15, 20, 25),
    "first 3 + last 3": (0, 1, 2, 27, 28, 29),
    "first 4 + last 2": (0, 1, 2, 3, 28, 29),
    "first 5 + last 1": (0, 1, 2, 3, 4, 29),
}


def answers(path: Path, records: dict[str, dict]) -> list[tuple[dict, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        answer = json.loads(line)
        if answer["id"] in records and not answer["empty"] and answer["finish_reason"] != "length":
            out.append((records[answer["id"]], answer["answer"]))
    return out


def load(run: Path) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]]]:
    """(training pairs, held-out pairs) of (instruction record, teacher answer), complete answers only."""
    pools = {}
    for pool in [*run.glob("iter_*/cache_pool.jsonl"), *run.glob("iter_*/generated.jsonl")]:
        for line in pool.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pools[record["id"]] = record
    held = {q["id"]: {"instruction": q["question"], "input": ""} for q in load_questions(default_questions())}
    for item in held_out_seeds(load_config(run / "config.yaml"), RunDir(run)):
        held[item["id"]] = {"instruction": item["question"], "input": item["input"]}
    return answers(run / "teacher_answers.jsonl", pools), answers(run / "eval" / "teacher_answers.jsonl", held)


def train(model, items: list[Scored], steps: int, batch: int, lr: float, pad: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(0)
    order: list[Scored] = []
    started = time.monotonic()
    model.train()
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(items, len(items))
        chunk, order = order[:batch], order[batch:]
        width = max(len(s.ids) for s in chunk)
        ids = torch.tensor([s.ids + [pad] * (width - len(s.ids)) for s in chunk])
        labels = torch.tensor([[-100] * s.start + s.ids[s.start:] + [-100] * (width - len(s.ids)) for s in chunk])
        mask = torch.tensor([[1] * len(s.ids) + [0] * (width - len(s.ids)) for s in chunk])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.monotonic() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/smollm2-cpu"))
    parser.add_argument("--teacher", type=Path, default=Path("models/smollm2-135m/teacher"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    training, held = load(args.run)
    scored = lambda pairs: [student_scored(tokenizer, "alpaca", r["instruction"], r["input"], a) for r, a in pairs]  # noqa: E731
    train_items, held_items = scored(training), scored(held)
    print(f"{len(train_items)} training answers, {len(held_items)} held-out answers; {args.steps} steps of "
          f"{args.batch} at lr {args.lr:g}")
    teacher = mean_nll(local_nll(str(args.teacher), held_items))["mean_nll"]
    print(f"{'the teacher (30 layers)':<20} {teacher:>8.3f}")
    print(f"{'layers':<20} {'before':>8} {'after':>8} {'s/step':>7}")
    for name, layers in SELECTIONS.items():
        with tempfile.TemporaryDirectory() as directory:
            build_student(args.teacher, Path(directory) / "student", layers)
            before = mean_nll(local_nll(str(Path(directory) / "student"), held_items))["mean_nll"]
            model = AutoModelForCausalLM.from_pretrained(Path(directory) / "student", dtype=torch.float32)
            per_step = train(model, train_items, args.steps, args.batch, args.lr, tokenizer.pad_token_id)
            model.save_pretrained(Path(directory) / "trained")
            after = mean_nll(local_nll(str(Path(directory) / "trained"), held_items))["mean_nll"]
        print(f"{name:<20} {before:>8.3f} {after:>8.3f} {per_step:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
