"""Cost of sizing a generation wave (lion_local.stages.generation.wave_size) at the paper's sizes.

    .venv/bin/python benchmarks/wave_size.py [--need 3000] [--limit 12000] [--repeat 5]

wave_size bisects over [need, limit] for the fewest calls that fill `need` with probability
WAVE_CONFIDENCE, summing one binomial tail (limit - need + 1 terms at most) per step. For each
acceptance it prints the wave, the tails summed and the median time of one call; beside it, in the
same run, the time of one tail over the whole budget (the unit of work) and of the same wave at a
tenth of the size, as ratios. tests/test_generation_waves.py counts the tails instead of timing them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lion_local.stages import generation  # noqa: E402


def median_seconds(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tails_summed(need: int, acceptance: float, limit: int) -> int:
    exact, count = generation._at_least, [0]

    def counted(k: int, n: int, p: float) -> float:
        count[0] += 1
        return exact(k, n, p)

    generation._at_least = counted
    try:
        generation.wave_size(need, acceptance, limit)
    finally:
        generation._at_least = exact
    return count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--need", type=int, default=3000,
                        help="instructions a side lacks (the paper: 6,000 a round, half a side)")
    parser.add_argument("--limit", type=int, default=12000, help="calls left in the side's budget")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    need, limit = args.need, args.limit
    print(f"wave_size(need={need}, acceptance, limit={limit}); median of {args.repeat} runs each")
    print(f"{'acceptance':>10} {'wave':>7} {'tails':>6} {'ms/wave':>9} {'ms/tail':>9} {'wave/tail':>10} "
          f"{'ms/wave at 1/10':>16} {'10x/1x':>7}")
    for acceptance in (0.3, 0.6, 0.9):
        size = generation.wave_size(need, acceptance, limit)
        tails = tails_summed(need, acceptance, limit)
        wave_s = median_seconds(lambda: generation.wave_size(need, acceptance, limit), args.repeat)
        tail_s = median_seconds(lambda: generation._at_least(need, limit, acceptance), args.repeat)
        small_s = median_seconds(lambda: generation.wave_size(need // 10, acceptance, limit // 10), args.repeat)
        print(f"{acceptance:>10} {size:>7} {tails:>6} {wave_s * 1e3:>9.2f} {tail_s * 1e3:>9.2f} "
              f"{wave_s / tail_s:>10.1f} {small_s * 1e3:>16.3f} {wave_s / small_s:>7.1f}")


if __name__ == "__main__":
    main()
