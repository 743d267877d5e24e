"""Building the tiny smoke-mode models (see lion_local/smoke/tiny_models.py for what they are).

The tokenizer is trained on the seed instructions and the teacher on a synthetic corpus rendered
with the roles' real prompt templates, so nothing is downloaded. This module imports torch and
transformers; lion_local/smoke/tiny_models.py imports it only when a build is needed.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lion_local.roles.generator import generator_messages
from lion_local.roles.referee import referee_messages
from lion_local.roles.student import student_prompt
from lion_local.roles.teacher import teacher_messages
from lion_local.run.seed_data import SeedInstruction, load_seed_instructions
from lion_local.smoke.tiny_acceptance import Generate, acceptance_figures, check_acceptance

logger = logging.getLogger(__name__)

BUILTIN_SEED_DATA = "smoke_seed.jsonl"


@dataclass(frozen=True)
class TinyBuild:
    """Sizes and budget of the tiny models; the defaults fit the 3-minute, 2-core budget."""

    seed: int = 0
    vocab_size: int = 2048
    teacher_hidden: int = 128
    teacher_layers: int = 3
    student_hidden: int = 64
    student_layers: int = 2
    train_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    referee_examples_per_seed: int = 3
    acceptance: bool = True  # end with the teacher's acceptance check (lion_local/smoke/tiny_acceptance.py)


def builtin_seed_data() -> Path:
    return Path(str(resources.files("lion_local.data").joinpath(BUILTIN_SEED_DATA)))


RESERVED_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS = "</s>"
# Examples per forward pass within a training batch (the batch's gradient is the same for any
# value; the float rounding is not, and the acceptance check below catches a teacher it spoils).
PART = 4
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif -%}"
)


def make_tiny_models(out_dir: str | Path, seed_data: str | Path | None = None, build: TinyBuild = TinyBuild()) -> Path:
    """Build DIR/teacher and DIR/student, replacing any there; each appears only when complete."""
    out_dir = Path(out_dir)
    seeds = load_seed_instructions(seed_data or builtin_seed_data())
    started = time.monotonic()
    rng = random.Random(build.seed)
    torch.manual_seed(build.seed)

    examples = build_corpus(seeds, rng, build)
    tokenizer = train_tokenizer(examples, build.vocab_size)
    teacher = _new_model(tokenizer, build.teacher_hidden, build.teacher_layers)
    train_teacher(teacher, tokenizer, examples, build, rng)
    if build.acceptance:
        check_acceptance(acceptance_figures(greedy(teacher, tokenizer), seeds))

    torch.manual_seed(build.seed + 1)
    student = _new_model(tokenizer, build.student_hidden, build.student_layers)

    # Write into a sibling temporary directory and rename, so a killed build leaves no half model.
    staging = out_dir.with_name(out_dir.name + f".building-{rng.randrange(1 << 30)}")
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(staging / name, safe_serialization=True)
        tokenizer.save_pretrained(staging / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "student"):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
        (staging / name).rename(out_dir / name)
    staging.rmdir()
    logger.info("tiny models written to %s in %.0f s", out_dir, time.monotonic() - started)
    return out_dir


# ----------------------------------------------------------------------------------------------
# The synthetic corpus: one (prompt, completion) pair per example, prompts from the real templates
# ----------------------------------------------------------------------------------------------

_QUALITY_SCORES = {"good": (8, 9), "partial": (5, 6), "garbled": (3, 4), "off_topic": (2, 3), "empty": (1, 1)}
_QUALITY_PHRASES = {
    "good": "gives a relevant, accurate and helpful answer.",
    "partial": "starts well but leaves the answer incomplete.",
    "garbled": "is hard to follow and partly wrong.",
    "off_topic": "answers a different question.",
    "empty": "gives no answer at all.",
}


def build_corpus(seeds: list[SeedInstruction], rng: random.Random, build: TinyBuild) -> list[tuple[str, str]]:
    """(chat-formatted prompt, completion) pairs for the teacher, referee and generator roles."""
    answers = [seed.output or _fallback_answer(seed) for seed in seeds]
    examples: list[tuple[str, str]] = []
    for index, seed in enumerate(seeds):
        answer = answers[index]
        examples.append((_chat(teacher_messages(seed.instruction, seed.input)), answer))
        # Explain-first reviews only: the short modes' replies are forced by the server's constraint,
        # and training a third of the reviews in their format left too few explained ones (8 of 16
        # smoke reviews read, against 14 or more).
        for _ in range(build.referee_examples_per_seed):
            qualities = rng.choices(list(_QUALITY_SCORES), weights=[4, 2, 2, 2, 1], k=2)
            shown = [_answer_of_quality(quality, answer, answers, index, rng) for quality in qualities]
            scores = [rng.randint(*_QUALITY_SCORES[quality]) for quality in qualities]
            review = (
                f"Assistant 1 {_QUALITY_PHRASES[qualities[0]]} Assistant 2 {_QUALITY_PHRASES[qualities[1]]}\n"
                f"Score of Assistant 1: {scores[0]}\nScore of Assistant 2: {scores[1]}"
            )
            examples.append((_chat(referee_messages(seed.instruction, seed.input, shown[0], shown[1])), review))
        for kind in ("hard", "easy"):
            other = seeds[rng.randrange(len(seeds))]
            examples.append((_chat(generator_messages(seed.instruction, seed.input, kind)), _splice(seed, other)))
    rng.shuffle(examples)
    return examples


def _chat(messages: list[dict]) -> str:
    """Render messages with CHAT_TEMPLATE exactly as the tokenizer's apply_chat_template does."""
    parts = [f"<|{message['role']}|>\n{message['content']}</s>\n" for message in messages]
    return "".join(parts) + "<|assistant|>\n"


def _fallback_answer(seed: SeedInstruction) -> str:
    return f"Here is a short answer: {seed.instruction.rstrip('.?')} is done step by step, clearly and briefly."


def _answer_of_quality(quality: str, answer: str, answers: list[str], index: int, rng: random.Random) -> str:
    words = answer.split()
    if quality == "good":
        return answer
    if quality == "partial":
        return " ".join(words[: max(1, len(words) // 2)])
    if quality == "garbled":
        shuffled = words[:]
        rng.shuffle(shuffled)
        return " ".join(shuffled)
    if quality == "off_topic":
        return answers[(index + rng.randrange(1, len(answers))) % len(answers)] if len(answers) > 1 else ""
    return ""


def _splice(seed: SeedInstruction, other: SeedInstruction) -> str:
    """A new instruction: the start of the seed joined to the end of another one."""
    head = seed.instruction.split()
    tail = other.instruction.split()
    joined = head[: max(2, len(head) // 2)] + tail[len(tail) // 2 :]
    text = " ".join(joined)
    return text if text[-1] in ".?!" else text + "."


# ----------------------------------------------------------------------------------------------
# Tokenizer and models
# ----------------------------------------------------------------------------------------------


def train_tokenizer(examples: list[tuple[str, str]], vocab_size: int) -> PreTrainedTokenizerFast:
    # The student's Alpaca prompt is in the corpus too, so its fixed wording gets compact tokens.
    texts = [prompt + completion for prompt, completion in examples] + [student_prompt("x", "y")] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=RESERVED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=EOS,
        pad_token="<pad>",
        additional_special_tokens=RESERVED_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    return tokenizer


def _new_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        # Heads of 32 dimensions: vLLM's CPU attention rejects smaller ones (head_dim 16 fails at
        # the first request).
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Sampling on by default so each request's temperature takes effect; temperature 0 turns it off.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        max_new_tokens=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def train_teacher(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[tuple[str, str]],
    build: TinyBuild,
    rng: random.Random,
) -> None:
    """Completion-only next-token training on batches drawn across all roles, the rate decaying to 0.

    Batches of one length range (so of mostly one role) build about 20 s faster, but each step then
    pulls the weights towards one role: in one build of four the referee's format broke in 18 of 96
    greedy reviews. Mixed batches and a rate that ends at 0 broke it in none of 768 (eight seeds).
    """
    encoded = []
    for prompt, completion in examples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion + EOS, add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids, completion_ids))

    optimizer = torch.optim.AdamW(model.parameters(), lr=build.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, build.train_steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, build.train_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    model.train()
    progress = tqdm(range(build.train_steps), desc="training tiny teacher", unit="step", mininterval=2.0)
    for _ in progress:
        drawn = rng.sample(encoded, min(build.batch_size, len(encoded)))
        # The mixed batch in parts of like lengths, each padded to its own longest (about a fifth
        # less CPU per build); the summed loss over the batch's completion tokens gives the whole
        # batch's gradient.
        drawn.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
        parts = [_batch(drawn[i : i + PART], tokenizer.pad_token_id) for i in range(0, len(drawn), PART)]
        predicted = sum(int((labels[:, 1:] != -100).sum()) for _, labels, _ in parts)
        loss = sum(_summed_loss(model, part, predicted) for part in parts)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    logger.info("tiny teacher trained for %d steps, last loss %.3f", build.train_steps, loss.item())
    model.eval()


def _summed_loss(model: LlamaForCausalLM, batch: tuple[torch.Tensor, ...], predicted: int) -> torch.Tensor:
    """Back-propagate one part's completion-token loss, divided by the whole batch's count; returns it."""
    input_ids, labels, attention = batch
    hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    # Project to the vocabulary only where a completion token is predicted: prompts are most of
    # each example and their logits would be thrown away.
    predicts = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][predicts])
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][predicts], reduction="sum") / predicted
    loss.backward()
    return loss.detach()


def greedy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Generate:
    """Greedy completions of chats with `model`, as a server without sampling would write them."""

    def generate(chats: list[list[dict]], max_new_tokens: int) -> list[str]:
        tokenizer.padding_side = "left"
        prompts = tokenizer([_chat(messages) for messages in chats], add_special_tokens=False, padding=True,
                            return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        tokenizer.padding_side = "right"
        return tokenizer.batch_decode(output[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    length = max(len(prompt) + len(completion) for prompt, completion in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    attention = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention
