"""vLLM's CPU build serving the real model: chat throughput and the prompt-logprob scoring of answers.

    .venv/bin/python benchmarks/real_serving.py [--config configs/smollm2-cpu.yaml] [--requests 32]

Starts the config's teacher server as a run does (lion-local's ServerSet, the config's vLLM flags and
core binding), then, timed on the wall clock:
1. `--requests` concurrent chat requests for the teacher's answers to the first seed instructions,
   at `--max-tokens` each (ignore_eos: every reply is that long), and prints completion tokens/s;
2. the same number of prompt-logprob requests (max_tokens 1, prompt_logprobs 0) scoring those
   answers in the teacher's chat template (lion_local.stages.likelihood), and prints scored tokens/s.
The numbers are this host's; docs/benchmarks.md records them with the host they came from.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from lion_local.config import load_config
from lion_local.endpoints.servers import ServerSet
from lion_local.roles.teacher import teacher_messages
from lion_local.run.seed_data import load_seed_instructions
from lion_local.stages.likelihood import server_nll, teacher_scored


async def measure(config, logs: Path, requests: int, max_tokens: int) -> None:
    seeds = load_seed_instructions(config.seed_data)[:requests]
    tokenizer = AutoTokenizer.from_pretrained(str(config.server_for("teacher").model))
    async with ServerSet(config, logs) as servers, await servers.open_client(config.roles.teacher.server) as client:
        started = time.monotonic()
        replies = await asyncio.gather(*(
            client.chat("teacher", teacher_messages(s.instruction, s.input), max_tokens=max_tokens, temperature=0.7,
                        seed=i, ignore_eos=True)
            for i, s in enumerate(seeds)
        ))
        elapsed = time.monotonic() - started
        tokens = sum(r.completion_tokens for r in replies)
        print(f"chat: {requests} concurrent requests x {max_tokens} tokens: {tokens} completion tokens in "
              f"{elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s")
        scored = [teacher_scored(tokenizer, None, s.instruction, s.input, r.text) for s, r in zip(seeds, replies)]
        started = time.monotonic()
        figures = await asyncio.gather(*(server_nll(client, "teacher", item) for item in scored))
        elapsed = time.monotonic() - started
        prompt = sum(len(item.ids) for item in scored)
        print(f"prompt logprobs: {requests} answers, {prompt} prompt tokens ({sum(f['tokens'] for f in figures)} "
              f"scored) in {elapsed:.1f} s = {prompt / elapsed:.1f} prompt tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-cpu.yaml")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as logs:
        started = time.monotonic()
        asyncio.run(measure(config, Path(logs), args.requests, args.max_tokens))
        print(f"(whole benchmark, the server's start included: {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
