"""Novelty filter benchmark: NoveltyIndex against rouge-score pair by pair, in one run.

    python benchmarks/novelty_filter.py [--data FILE] [--pool 15000] [--candidates 1500] [--sample 10]
                                        [--only head-to-head|scaling]

1. Head to head: a pool of `--pool` real instructions and `--candidates` other ones processed
   in order (an accepted candidate joins the pool, as in the generation stage). The index
   decides every candidate; rouge-score checks a sample of them pair by pair against the pool
   as it stood at that candidate (both the public `RougeScorer.score` and its LCS on
   pre-tokenized text). Values and decisions are compared on the sample; the last line of
   this part is the per-candidate speed ratio.
2. Scaling: pools of 5K, 10K, 15K and 70K (past the real data by replicating it with small
   word edits), time per candidate and memory of the index; then 6,000 candidates against the
   70K pool in one process.

Reads ../shared/data/real_instructions.jsonl when present, else synthesizes instructions and
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer  # noqa: E402
from rouge_score.rouge_scorer import _score_lcs  # noqa: E402

from lion_local.stages.novelty import NoveltyIndex  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/real_instructions.jsonl"
THRESHOLD = 0.7


def load_instructions(path: Path, rng: random.Random) -> list[str]:
    if path.exists():
        texts = [json.loads(line)["instruction"] for line in path.open(encoding="utf-8") if line.strip()]
        print(f"data: {len(texts)} real instructions from {os.path.relpath(path)}")
    else:
        texts = _synthesize(20_000, rng)
        print(f"data: {os.path.relpath(path)} not found; using {len(texts)} SYNTHESIZED instructions (figures not comparable)")
    unique = list(dict.fromkeys(texts))
    rng.shuffle(unique)
    return unique


def _synthesize(count: int, rng: random.Random) -> list[str]:
    verbs = "write explain list describe compare summarize give suggest classify rewrite name find".split()
    words = [f"w{n}" for n in range(3000)]
    return [
        " ".join([rng.choice(verbs), *rng.choices(words, k=rng.randint(4, 30))]) + "." for _ in range(count)
    ]


def edited(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """A small edit of a text: a word replaced, dropped, inserted or two words swapped."""
    words = text.split()
    if len(words) < 2:
        return text + " " + rng.choice(vocabulary)
    position = rng.randrange(len(words))
    kind = rng.randrange(4)
    if kind == 0:
        words[position] = rng.choice(vocabulary)
    elif kind == 1:
        del words[position]
    elif kind == 2:
        words.insert(position, rng.choice(vocabulary))
    else:
        other = rng.randrange(len(words))
        words[position], words[other] = words[other], words[position]
    return " ".join(words)


def head_to_head(texts: list[str], pool_size: int, candidate_count: int, sample: int, rng: random.Random) -> None:
    pool, candidates = texts[:pool_size], texts[pool_size : pool_size + candidate_count]
    print(f"\n== head to head: pool {len(pool)}, {len(candidates)} candidates in order, threshold {THRESHOLD}")
    index = NoveltyIndex(THRESHOLD)
    for text in pool:
        index.add(text)
    sampled = set(rng.sample(range(len(candidates)), min(sample, len(candidates))))
    accepted_pool = list(pool)  # the texts in the index, in order
    snapshots: dict[int, int] = {}
    decisions: dict[int, bool] = {}
    values: dict[int, float] = {}

    index_seconds = 0.0
    for number, candidate in enumerate(candidates):
        if number in sampled:
            snapshots[number] = len(accepted_pool)
            values[number] = index.max_similarity(candidate)  # untimed: is_novel may stop early
        started = time.perf_counter()
        novel = index.is_novel(candidate)
        if novel:
            index.add(candidate)
        index_seconds += time.perf_counter() - started
        decisions[number] = novel
        if novel:
            accepted_pool.append(candidate)
    accepted = sum(decisions.values())
    print(f"index: {accepted} accepted, {len(candidates) - accepted} rejected; "
          f"{index_seconds:.2f} s, {index_seconds / len(candidates) * 1e3:.3f} ms per candidate")

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = scorer._tokenizer.tokenize
    pair_seconds = lcs_seconds = 0.0
    agree = same_values = 0
    for number in sorted(sampled):
        against = accepted_pool[: snapshots[number]]
        candidate = candidates[number]
        started = time.perf_counter()
        best = max(scorer.score(text, candidate)["rougeL"].fmeasure for text in against)
        pair_seconds += time.perf_counter() - started

        pool_tokens = [tokenize(text) for text in against]  # untimed: the fairer baseline
        started = time.perf_counter()
        candidate_tokens = tokenize(candidate)
        best_lcs = max(_score_lcs(tokens, candidate_tokens).fmeasure for tokens in pool_tokens)
        lcs_seconds += time.perf_counter() - started

        assert best == best_lcs
        agree += (best <= THRESHOLD) == decisions[number]
        same_values += abs(best - values[number]) <= 1e-12
    per_pair_candidate = pair_seconds / len(sampled)
    per_lcs_candidate = lcs_seconds / len(sampled)
    per_index_candidate = index_seconds / len(candidates)
    print(f"rouge-score score(), pair by pair: {per_pair_candidate:.3f} s per candidate ({len(sampled)} sampled)")
    print(f"rouge-score LCS on pre-tokenized pool: {per_lcs_candidate:.3f} s per candidate")
    print(f"sample: decisions agree {agree}/{len(sampled)}, max ROUGE-L F equal (1e-12) {same_values}/{len(sampled)}")
    print(f"speed ratio vs pre-tokenized rouge-score LCS: {per_lcs_candidate / per_index_candidate:,.0f}x")
    print(f"per-candidate speed ratio (rouge-score pair by pair / index): {per_pair_candidate / per_index_candidate:,.0f}x")


def scaling(texts: list[str], rng: random.Random, pool_sizes: list[int]) -> None:
    vocabulary = sorted({word for text in texts for word in text.split()})
    held_out = texts[15_000:16_500] or texts[-1500:]
    base = texts[:15_000]
    pool_70k = list(base)
    while len(pool_70k) < 70_000:
        pool_70k.append(edited(base[len(pool_70k) % len(base)], rng, vocabulary))
    print("\n== scaling: 300 candidates per pool size, in order; memory of the index (tracemalloc)")
    print(f"{'pool':>7} {'build s':>8} {'ms/candidate':>13} {'index MiB':>10}")
    for size in pool_sizes:
        tracemalloc.start()
        started = time.perf_counter()
        index = NoveltyIndex(THRESHOLD)
        for text in pool_70k[:size]:
            index.add(text)
        build = time.perf_counter() - started
        memory = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        started = time.perf_counter()
        for candidate in held_out[:300]:
            if index.is_novel(candidate):
                index.add(candidate)
        per = (time.perf_counter() - started) / 300
        print(f"{size:>7} {build:>8.2f} {per * 1e3:>13.3f} {memory:>10.1f}")

    candidates = [edited(text, rng, vocabulary) if n >= len(held_out) else text
                  for n, text in enumerate(held_out * 4)][:6000]
    index = NoveltyIndex(THRESHOLD)
    for text in pool_70k:
        index.add(text)
    started = time.perf_counter()
    accepted = 0
    for candidate in candidates:
        if index.is_novel(candidate):
            index.add(candidate)
            accepted += 1
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"6,000 candidates against a 70,000 pool, one process: {seconds:.1f} s "
          f"({accepted} accepted); process peak RSS {peak_rss:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pool", type=int, default=15_000)
    parser.add_argument("--candidates", type=int, default=1_500)
    parser.add_argument("--sample", type=int, default=10, help="candidates checked with rouge-score too")
    parser.add_argument("--only", choices=["head-to-head", "scaling"], help="run one part only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool-sizes", default="5000,10000,15000,70000", help="scaling: the pool sizes of the table, comma-separated"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    texts = load_instructions(args.data, rng)
    if args.only != "head-to-head":
        scaling(texts, rng, [int(size) for size in args.pool_sizes.split(",")])
    if args.only != "scaling":
        head_to_head(texts, args.pool, args.candidates, args.sample, rng)


if __name__ == "__main__":
    main()
