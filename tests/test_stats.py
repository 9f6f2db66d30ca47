"""Statistics without SciPy: Student-t quantiles against published values, intervals, pairs."""

from __future__ import annotations

import math
import random

import pytest

from vitkdl.stats import mean, paired, sample, sd, t_cdf, t_quantile

# Quantiles of Student's t (two-sided 95 %: p = 0.975), to the digits of the published
# tables (R's qt, to 14 significant digits).
KNOWN = [
    (0.975, 1, 12.706204736174706),
    (0.975, 2, 4.3026527297494619),
    (0.975, 3, 3.1824463052837078),
    (0.975, 4, 2.7764451051977934),
    (0.975, 5, 2.5705818356363146),
    (0.975, 9, 2.2621571628540993),
    (0.975, 10, 2.2281388519649385),
    (0.975, 30, 2.0422724563012373),
    (0.975, 120, 1.9799304050524582),
    (0.95, 10, 1.8124611228107341),
    (0.995, 4, 4.6040948713499880),
    (0.9, 1, 3.0776835371752527),
    (0.975, math.inf, 1.959963984540054),
]


@pytest.mark.parametrize("p, df, expected", KNOWN)
def test_t_quantile_matches_published_values(p: float, df: float, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-9)  # symmetric


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999, 0.9999])
def test_t_quantile_closed_forms(p: float) -> None:
    # df = 2 has a closed form; df = 1 is the Cauchy distribution.
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)


@pytest.mark.parametrize("df", [1, 2.5, 4, 17, 200])
def test_t_cdf_inverts_the_quantile(df: float) -> None:
    for p in (0.01, 0.2, 0.5, 0.8, 0.975):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert t_quantile(0.5, df) == 0.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_mean_sd_and_the_interval_of_a_sample() -> None:
    values = [86.39, 82.50, 85.83, 86.94, 86.94]
    s = sample(values)
    assert s.n == 5 and s.mean == pytest.approx(85.72)
    assert s.sd == pytest.approx(math.sqrt(13.8062 / 4))  # n - 1 in the denominator
    lo, hi = s.interval or (0, 0)
    half = 2.7764451051977934 * s.sd / math.sqrt(5)
    assert (lo, hi) == pytest.approx((s.mean - half, s.mean + half))
    one = sample([1.0])
    assert one.n == 1 and one.interval is None and math.isnan(one.sd)
    assert one.as_dict()["sd"] is None  # JSON-ready
    assert math.isnan(mean([])) and math.isnan(sd([3.0]))


def test_paired_differences_wins_ties_losses() -> None:
    a = [89.72, 87.78, 89.72, 85.56, 88.61]
    b = [86.39, 82.50, 85.83, 86.94, 86.94]
    p = paired(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert p.n == 5 and p.mean == pytest.approx(sum(diffs) / 5)
    assert (p.wins, p.ties, p.losses) == (4, 0, 1)
    lo, hi = p.interval or (0, 0)
    assert lo < p.mean < hi and hi - p.mean == pytest.approx(p.mean - lo)
    assert paired([1.0, 2.0], [1.0, 1.0]).ties == 1


def test_the_95_interval_covers_the_mean_about_95_times_in_100() -> None:
    rng = random.Random(0)
    covered = 0
    trials = 2000
    for _ in range(trials):
        s = sample([rng.gauss(10.0, 2.0) for _ in range(4)])
        assert s.interval is not None
        covered += s.interval[0] <= 10.0 <= s.interval[1]
    assert 0.93 < covered / trials < 0.97
