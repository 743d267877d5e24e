"""The size of a generation wave: the fewest calls that fill what a side lacks with probability
WAVE_CONFIDENCE, against an exact binomial sum computed with integers and fractions.

Its cost at the paper's sizes is counted here in binomial terms summed; its time is measured by
benchmarks/wave_size.py, not asserted."""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import pytest

from lion_local.stages import generation
from lion_local.stages.generation import MIN_ACCEPTANCE_ESTIMATE, WAVE_CONFIDENCE, wave_size


def at_least(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize("acceptance", [Fraction(1, 4), Fraction(1, 2), Fraction(7, 10), Fraction(9, 10), Fraction(97, 100)])
@pytest.mark.parametrize("need", [1, 2, 3, 8, 25])
def test_wave_is_the_fewest_calls_reaching_the_confidence(need: int, acceptance: Fraction) -> None:
    limit = 200
    size = wave_size(need, float(acceptance), limit)
    assert at_least(need, size, acceptance) >= Fraction(WAVE_CONFIDENCE)
    assert at_least(need, size - 1, acceptance) < Fraction(WAVE_CONFIDENCE)


def test_limits_and_edges() -> None:
    assert wave_size(0, 0.9, 10) == 0 and wave_size(5, 0.9, 0) == 0
    assert wave_size(8, 1.0, 24) == 8  # every reply passes: exactly what is lacking
    assert wave_size(8, 0.9, 9) == 9  # not enough budget left for the confidence: all of it
    assert wave_size(8, 0.9, 5) == 5  # less budget than need
    # An observed share of 0 is read as MIN_ACCEPTANCE_ESTIMATE, so the budget ends in few waves.
    assert wave_size(2, 0.0, 1000) == wave_size(2, MIN_ACCEPTANCE_ESTIMATE, 1000) < 1000


def normal_approximation(need: int, acceptance: float) -> int:
    """The fewest n with n p - z sqrt(n p q) >= need - 1/2, z the confidence's normal quantile."""
    z = NormalDist().inv_cdf(WAVE_CONFIDENCE)
    n = need
    while n * acceptance - z * math.sqrt(n * acceptance * (1 - acceptance)) < need - 0.5:
        n += 1
    return n


@pytest.mark.parametrize("acceptance", [0.3, 0.9])
def test_paper_scale_agrees_with_the_normal_approximation_and_is_cheap(acceptance: float, monkeypatch) -> None:
    sums: list[tuple[int, int]] = []  # (need, calls) of each binomial tail summed
    exact = generation._at_least

    def counted(k: int, n: int, p: float) -> float:
        sums.append((k, n))
        return exact(k, n, p)

    monkeypatch.setattr(generation, "_at_least", counted)
    need, limit = 3000, 12000
    size = wave_size(need, acceptance, limit)
    assert abs(size - normal_approximation(need, acceptance)) <= 3
    # A bisection over [need, limit]: one tail for the whole budget, then at most
    # ceil(log2(limit - need)) + 1 more (15 here; a scan up from `need` would sum thousands),
    # each over at most limit - need + 1 terms.
    assert 1 < len(sums) <= 2 + math.ceil(math.log2(limit - need))
    assert all(k == need and need <= n <= limit for k, n in sums)
    # Beyond the 3000 / p expected to fill the quota, a few standard deviations' worth: 1.3% at
    # 0.9 (3379), 3.6% at 0.3 (10360).
    assert 3000 / acceptance < size < 1.04 * 3000 / acceptance
