"""Statistics for comparisons over seeds: means, standard deviations, Student-t intervals.

The one home of the numbers a report states about several runs. Pure Python (``math``
only): SciPy is deliberately not a dependency, so Student's t distribution is computed here,
its CDF through the regularised incomplete beta function (a continued fraction) and its
quantiles by inverting the CDF with bisection to double precision.

Conventions: the standard deviation is the sample one (``n - 1`` in the denominator); an
interval is two-sided, ``mean +- t(1 - (1 - level) / 2, n - 1) * sd / sqrt(n)``; a paired
comparison takes the differences of runs that share a seed and reports their mean, its
interval (the paired t interval), ``n`` and how many differences are positive (wins),
zero (ties) and negative (losses).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Paired",
    "Sample",
    "mean",
    "paired",
    "sample",
    "sd",
    "t_cdf",
    "t_quantile",
]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (``nan`` for no values)."""
    return math.fsum(values) / len(values) if values else math.nan


def sd(values: Sequence[float]) -> float:
    """The sample standard deviation (``n - 1``); ``nan`` below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (the inverse of
    :func:`t_cdf`): ``t_quantile(0.975, 4)`` is 2.776..., the factor of a 95 % interval
    from 5 values. ``df = inf`` gives the normal quantile."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if math.isinf(df):
        return math.sqrt(2.0) * _erfinv(2.0 * p - 1.0)
    if df == 1:  # Cauchy, in closed form
        return math.tan(math.pi * (p - 0.5))
    hi = 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection to the last bit
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _erfinv(y: float) -> float:
    """The inverse error function, by bisection on :func:`math.erf`."""
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if math.erf(mid) < y:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _interval(m: float, s: float, n: int, level: float) -> tuple[float, float] | None:
    if n < 2 or math.isnan(s):
        return None
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * s / math.sqrt(n)
    return (m - half, m + half)


@dataclass(frozen=True)
class Sample:
    """Several runs of one arm: ``n``, mean, standard deviation and the interval of the
    mean (None below two values)."""

    n: int
    mean: float
    sd: float
    interval: tuple[float, float] | None
    level: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (``nan`` becomes None)."""
        return _plain(asdict(self))


def sample(values: Sequence[float], level: float = 0.95) -> Sample:
    """:class:`Sample` statistics of ``values``."""
    values = list(values)
    m, s = mean(values), sd(values)
    return Sample(len(values), m, s, _interval(m, s, len(values), level), level)


@dataclass(frozen=True)
class Paired:
    """A paired comparison: the differences ``a_i - b_i`` of runs that share a seed."""

    n: int
    mean: float
    sd: float
    interval: tuple[float, float] | None
    wins: int
    ties: int
    losses: int
    level: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (``nan`` becomes None)."""
        return _plain(asdict(self))


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """Compare ``a`` with ``b`` pair by pair (same length; pair ``i`` shares a seed): the
    mean difference ``a - b``, its paired t interval, and the wins, ties and losses of ``a``."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    s = sample(diffs, level)
    return Paired(
        n=s.n,
        mean=s.mean,
        sd=s.sd,
        interval=s.interval,
        wins=sum(d > 0 for d in diffs),
        ties=sum(d == 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
        level=level,
    )


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, tuple):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in data.items()}
