"""Student training throughput: padded against padding-free batches, with lion-local's own training code.

    python benchmarks/training_throughput.py [--steps 30] [--batch 8] [--layers 16] [--hidden 2048]
                                             [--peak-tflops 989] [--tiny]

Builds a random LLaMA-architecture model of about 1B parameters (hidden 2048, 16 layers: 0.95B;
weights in bf16, the tiny smoke tokenizer), writes prompt/completion examples of varied length
(real instructions as prompts, real judge reviews as answers from ../shared/data/ when present,
else synthetic text, saying so), and trains it for a fixed number of optimizer steps twice in
one process, with `lion_local.stages.sft.train` (the imitation stage's training process):
imitation.trainer.padding_free false, then true (whole examples packed best-fit into
max_length rows). For each it prints the wall time of the training loop, the tokens trained per
second (TRL's count of the tokens trained on, padding excluded: the padded run also computes on
its padding)
and the model FLOPs utilization, 6 x parameters x tokens/s over --peak-tflops (an H200's dense
bf16 peak: 989 TFLOPS); then the ratio of the two. --tiny trains the tiny smoke student on the
CPU instead, to check the script end to end (no MFU: a CPU has no meaningful peak here).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def examples(count: int, seed: int = 0) -> tuple[list[dict], str]:
    """Prompt/completion rows in the student's training format, and where their text came from."""
    from lion_local.roles.student import student_training_text

    rng = random.Random(seed)
    instructions, reviews = DATA / "real_instructions.jsonl", DATA / "real_reviews.jsonl"
    if instructions.exists() and reviews.exists():
        prompts = [json.loads(line) for line in instructions.read_text(encoding="utf-8").splitlines()]
        answers = [json.loads(line)["text"] for line in reviews.read_text(encoding="utf-8").splitlines()]
        source = "real instructions and judge reviews from ../shared/data/"
    else:
        words = "the of a model answer question data student teacher training review score".split()
        prompts = [{"instruction": " ".join(rng.choices(words, k=rng.randint(5, 40))), "input": ""} for _ in range(count)]
        answers = [" ".join(rng.choices(words, k=rng.randint(10, 300))) for _ in range(count)]
        source = "synthetic text (../shared/data/ not found)"
    rows = []
    for index in range(count):
        prompt = rng.choice(prompts)
        text, completion = student_training_text(prompt["instruction"], prompt.get("input", ""), rng.choice(answers), "</s>")
        rows.append({"id": str(index), "prompt": text, "completion": completion})
    return rows, source


def random_model(directory: Path, layers: int, hidden: int) -> Path:
    """A random LLaMA with the tiny student's tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/tiny/student")
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_once(model_dir: Path, data_file: Path, work: Path, args: argparse.Namespace, padding_free: bool) -> dict:
    from lion_local.config import load_config
    from lion_local.stages.sft import train

    imitation = load_config(ROOT / "configs/lion-7b.yaml").imitation.model_dump(mode="json")
    imitation["trainer"].update(
        max_steps=args.steps, per_device_train_batch_size=args.batch, padding_free=padding_free,
        save_steps=10**9, logging_steps=1, max_length=1024, bf16=not args.tiny,
    )
    imitation["effective_batch_size"] = args.batch
    job = {
        "base_model": str(model_dir), "data_file": str(data_file), "output_dir": str(work / "out"),
        "work_dir": str(work / "checkpoints"), "progress_file": str(work / "progress.json"),
        "result_file": str(work / "result.json"), "seed": 0, "imitation": imitation, "adapter_init": None,
    }
    return train(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="the tiny smoke student on the CPU (a check of the script)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="training-throughput-"))
    try:
        model_dir = ROOT / "models/tiny/student" if args.tiny else random_model(work / "model", args.layers, args.hidden)
        rows, source = examples(args.steps * args.batch)
        data_file = work / "data.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"data: {len(rows)} examples; {source}")
        measured = {}
        for padding_free in (False, True):
            result = train_once(model_dir, data_file, work / f"run-{padding_free}", args, padding_free)
            seconds = result["train_runtime_s"]
            tokens_per_s = result["tokens"] / seconds  # TRL's count of the tokens trained on, padding excluded
            measured[padding_free] = tokens_per_s
            mfu = "" if args.tiny else f", MFU {6 * result['parameters'] * tokens_per_s / (args.peak_tflops * 1e12):.1%}"
            print(f"padding_free={str(padding_free).lower():<5} {result['parameters'] / 1e9:.2f}B parameters on "
                  f"{result['device']}: {result['steps']} steps, {result['tokens']:,} tokens in {seconds:.1f} s, "
                  f"{tokens_per_s:,.0f} tokens/s{mfu}")
        print(f"padding-free / padded tokens per second: {measured[True] / measured[False]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
