"""The referee's three modes side by side on one real vLLM server (the tiny teacher as referee).

    .venv/bin/python benchmarks/referee_modes.py [--pairs 128] [--rounds 5] [--block-size 32]

Starts the teacher's server of configs/tiny-cpu.yaml once (vLLM's CPU build), builds the same
answer pairs from the smoke seeds (each seed's own answer against another seed's, a truncated one
or an empty one), and reviews every pair in both orders with the stages' own judging pipeline
(lion_local/stages/judging.py: retries, journal) in each mode: explain_first (with the referee's default
max_tokens, 512, so no explanation is cut), scores_only and expected_score. A short warm-up in
every mode comes first, so each mode is measured with the shared prompt parts already cached.

Per mode it prints completion and prompt tokens per reply, replies/s, the unjudged share of the
pairs, the ratios against explain_first (for speed, the median of the rounds' ratios, each round
running the modes back to back), and vLLM's prefix-cache hit share from /metrics. Then the
prompt layout: explain_first with what every review shares first (the shipped templates) against
the same prompt with the task moved after the answers (the layout before). vLLM's CPU attention
takes blocks of multiples of 32 tokens (128 by default); --block-size sets it, as GPUs' 16-token
blocks would. Last, the completion-token ratio against real explain-first reviews
(../shared/data/real_reviews.jsonl, when present), tokenized with the tiny referee's tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lion_local.config import load_config  # noqa: E402
from lion_local.stages.judging import ORDERS, AnswerPair, judged_pairs, review_call  # noqa: E402
from lion_local.run.records import instruction_id, request_seed  # noqa: E402
from lion_local.roles import referee_messages  # noqa: E402
from lion_local.roles.referee import referee_params  # noqa: E402
from lion_local.run.state import Journal  # noqa: E402
from lion_local.run.seed_data import load_seed_instructions  # noqa: E402
from lion_local.endpoints.servers import client_for, config_server  # noqa: E402
from lion_local.smoke.tiny_models import ensure_tiny_models  # noqa: E402

MODES = ("explain_first", "scores_only", "expected_score")
REAL_REVIEWS = ROOT.parent / "shared/data/real_reviews.jsonl"


def answer_pairs(count: int, offset: int = 0) -> list[AnswerPair]:
    """Pairs of varied quality: the seed's own answer against another's, a truncated or an empty one."""
    seeds = load_seed_instructions(ROOT / "lion_local/data/smoke_seed.jsonl")
    pairs = []
    for number in range(offset, offset + count):
        seed, other = seeds[number % len(seeds)], seeds[(7 * number + 3) % len(seeds)]
        answer = seed.output or "No answer."
        student = (other.output or "", answer[: len(answer) // 3], "")[number % 3]
        pairs.append(AnswerPair(f"{instruction_id(seed.instruction, seed.input)}-{number}", seed.instruction,
                                seed.input, answer, student))
    return pairs


def reset_prefix_cache(metrics_url: str) -> None:
    """Empty vLLM's prefix cache (a route of its dev mode), so no mode reuses another's prompts."""
    request = urllib.request.Request(metrics_url.removesuffix("/metrics") + "/reset_prefix_cache", method="POST")
    urllib.request.urlopen(request, timeout=30).read()


def prefix_cache(metrics_url: str) -> tuple[float, float]:
    """vLLM's prefix-cache (queries, hits) counters, in tokens."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    value = {name: float(re.search(rf"^vllm:{name}_total\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)[1])
             for name in ("prefix_cache_queries", "prefix_cache_hits")}
    return value["prefix_cache_queries"], value["prefix_cache_hits"]


async def review_all(client, role, pairs: list[AnswerPair], journal_path: Path) -> tuple[float, list[dict]]:
    """Every pair in both orders through the stages' pipeline; (seconds, journal records)."""
    seed_of = lambda *key: request_seed(0, "referee", 1, *key)  # noqa: E731
    with Journal(journal_path) as journal:
        started = time.perf_counter()
        await asyncio.gather(*(review_call(client, role, pair, order, 0, role.parse_retries, seed_of, journal)()
                               for pair in pairs for order in ORDERS))
        return time.perf_counter() - started, journal.records


async def direct_calls(client, role, pairs: list[AnswerPair], extra: dict, task_last: bool = False) -> tuple[float, list]:
    """explain_first requests outside the pipeline (seconds, completions): with `extra` request fields,
    and with the task moved after the answers (the layout before) when `task_last`."""
    async def one(pair: AnswerPair, order: str):
        first, second = (pair.teacher, pair.student) if order == "teacher_first" else (pair.student, pair.teacher)
        messages = referee_messages(pair.instruction, pair.input, first, second)
        if task_last:
            task, rest = messages[1]["content"].split("\n\n[Question]", 1)
            messages[1]["content"] = "[Question]" + rest + "\n\n" + task
        return await client.chat("referee", messages, **{**referee_params(role, seed=1), **extra})

    started = time.perf_counter()
    completions = await asyncio.gather(*(one(pair, order) for pair in pairs for order in ORDERS))
    return time.perf_counter() - started, completions


def real_review_tokens(tokenizer_dir: str) -> float | None:
    """The median length of the real explain-first reviews in the tiny referee's tokens (None: not here)."""
    if not REAL_REVIEWS.exists():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    texts = [json.loads(line)["text"] for line in REAL_REVIEWS.read_text().splitlines() if line.strip()]
    return statistics.median(len(tokenizer(text)["input_ids"]) + 1 for text in texts)  # + the end token


async def measure(config, endpoint, pairs: int, out: Path, real_length: float | None, rounds: int) -> tuple[dict, dict]:
    metrics_url = endpoint.base_urls[0].removesuffix("/v1") + "/metrics"
    client = client_for(endpoint, config.servers["teacher"])
    results: dict[str, dict] = {}
    async with client:
        roles = {mode: config.roles.referee.model_copy(update={"mode": mode}) for mode in MODES}
        for round_number in range(rounds):  # every row in every round: drift between rounds hits all rows
            for mode in MODES:
                row = await mode_row(client, roles[mode], pairs, out / f"{mode}-{round_number}", metrics_url)
                results[mode] = _merge(results.get(mode), row)
            if real_length is not None:
                # What explain_first costs when its reviews are as long as real ones: the same requests
                # with min_tokens = max_tokens = that length (the replies run on past their end, so they
                # are a cost, not reviews). The control, forced the same way to the tiny referee's own
                # mean length, shows what forcing costs by itself beside the natural explain_first row.
                own_length = results["explain_first"]["completion"]
                for name, length in (("explain_first, real length", real_length), ("explain_first, own length", own_length)):
                    row = await forced_length_row(client, roles["explain_first"], pairs, round(length), metrics_url)
                    results[name] = _merge(results.get(name), row)
        layouts = {}
        layout_pairs = answer_pairs(pairs, offset=2 * pairs)
        for name, task_last in (("task first (shipped)", False), ("task last (before)", True)):
            reset_prefix_cache(metrics_url)
            before = prefix_cache(metrics_url)
            await direct_calls(client, roles["explain_first"], layout_pairs, {}, task_last)
            after = prefix_cache(metrics_url)
            layouts[name] = (after[1] - before[1]) / max(1.0, after[0] - before[0])
    return results, layouts


async def mode_row(client, role, pairs: int, out: Path, metrics_url: str) -> dict:
    """One mode's row: every pair in both orders through the pipeline, after a warm-up on other pairs.

    scores_only and expected_score send identical prompts: each mode starts from an empty cache, then
    the warm-up caches what every review shares and compiles the grammar."""
    reset_prefix_cache(metrics_url)
    await review_all(client, role, answer_pairs(8, offset=pairs), out.with_name(out.name + "-warmup.jsonl"))
    before = prefix_cache(metrics_url)
    measured = answer_pairs(pairs)
    seconds, records = await review_all(client, role, measured, out.with_name(out.name + ".jsonl"))
    row = _row(seconds, records, before, prefix_cache(metrics_url))
    row["unjudged"] = 1 - len(judged_pairs([pair.id for pair in measured], records)) / pairs
    return row


async def forced_length_row(client, role, pairs: int, length: int, metrics_url: str) -> dict:
    """explain_first requests made to run exactly `length` tokens (min_tokens = max_tokens), as a row."""
    reset_prefix_cache(metrics_url)
    await direct_calls(client, role, answer_pairs(8, offset=pairs), {})
    before = prefix_cache(metrics_url)
    seconds, completions = await direct_calls(client, role, answer_pairs(pairs), {"min_tokens": length, "max_tokens": length})
    records = [{"completion_tokens": c.completion_tokens, "prompt_tokens": c.prompt_tokens} for c in completions]
    return _row(seconds, records, before, prefix_cache(metrics_url))


def _merge(earlier: dict | None, row: dict) -> dict:
    """A row's latest round, with the replies/s of its earlier rounds kept in `rates`."""
    return {**row, "rates": [*(earlier["rates"] if earlier else []), *row["rates"]]}


def _row(seconds: float, records: list[dict], before: tuple[float, float], after: tuple[float, float]) -> dict:
    """One measured round of a row (the printed row reports the median of its rounds' replies/s)."""
    return {
        "rates": [len(records) / seconds],
        "completion": statistics.fmean(r["completion_tokens"] for r in records),
        "prompt": statistics.fmean(r["prompt_tokens"] for r in records),
        "unjudged": None,
        "hit_share": (after[1] - before[1]) / max(1.0, after[0] - before[0]),
    }


def speed_ratio(rates: list[float], base_rates: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios: each round measures every row back to back, so
    drift between rounds cancels."""
    ratios = [rate / base for rate, base in zip(rates, base_rates)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128, help="answer pairs reviewed in each mode (two replies each)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every row, interleaved; replies/s is their median")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM's KV-cache block size (CPU: a multiple of 32)")
    args = parser.parse_args()
    base = load_config(ROOT / "configs/tiny-cpu.yaml")
    extra = [*base.servers["teacher"].vllm.extra_args, "--block-size", str(args.block_size)]
    config = load_config(ROOT / "configs/tiny-cpu.yaml", ["roles.referee.max_tokens=512",
                                                           f"servers.teacher.vllm.extra_args={json.dumps(extra)}"])
    ensure_tiny_models(config)
    real_length = real_review_tokens(config.servers["teacher"].model)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the server inherits it: /reset_prefix_cache
    with tempfile.TemporaryDirectory(prefix="lion-referee-modes-") as scratch:
        out = Path(scratch)
        with config_server(config, "teacher", out / "logs") as endpoint:
            results, layouts = asyncio.run(measure(config, endpoint, args.pairs, out, real_length, args.rounds))
    print(f"referee: the tiny teacher on {endpoint.engine}, block size {args.block_size}, "
          f"{config.servers['teacher'].max_concurrency} requests in flight; {args.pairs} pairs x 2 orders per row")
    print(f"{'':<28}{'compl tok/reply':>16}{'prompt tok/reply':>17}{'replies/s':>10}{'(range)':>14}{'unjudged':>9}"
          f"{'prefix hits':>12}{'tokens ratio':>13}{'speed ratio':>12}")
    bases = [name for name in ("explain_first", "explain_first, real length") if name in results]
    for name, r in results.items():
        rate = statistics.median(r["rates"])
        spread = f"{min(r['rates']):.1f}-{max(r['rates']):.1f}"
        unjudged = "-" if r["unjudged"] is None else f"{r['unjudged']:.1%}"
        print(f"{name:<28}{r['completion']:>16.1f}{r['prompt']:>17.1f}{rate:>10.1f}{spread:>14}{unjudged:>9}"
              f"{r['hit_share']:>12.1%}")
        for base in bases if name in ("scores_only", "expected_score") else []:
            b = results[base]
            ratio, low, high = speed_ratio(r["rates"], b["rates"])
            print(f"{'  against ' + base:<102}{b['completion'] / r['completion']:>12.1f}x{ratio:>11.1f}x"
                  f" (rounds {low:.1f}-{high:.1f}x)")
    if real_length is None:
        print(f"{REAL_REVIEWS} is not here: no row at the real reviews' length")
    else:
        print(f"real length: min_tokens {real_length:.0f}, the median of {REAL_REVIEWS.name} in this tokenizer's tokens")
    print("prompt layout, explain_first, prefix-cache hit share: "
          + ", ".join(f"{name} {share:.1%}" for name, share in layouts.items()))


if __name__ == "__main__":
    main()
