"""The t, binomial and incomplete-beta functions against scipy, over the whole range the intervals and tests use."""

from __future__ import annotations

import math

import pytest
from scipy import special, stats

from lightning_validate.metrics.distributions import (
    beta_regularized,
    binomial_cdf,
    normal_cdf,
    normal_quantile,
    t_cdf,
    t_quantile,
)

DFS = [1, 2, 3, 4, 7, 29, 99, 999, 9_999, 10_000, 10**5, 10**7, 10**9, math.inf]
PROBS = [1e-6, 0.001, 0.025, 0.3, 0.5, 0.7, 0.95, 0.975, 0.995, 0.9995]


@pytest.mark.parametrize("df", DFS)
def test_t_quantile_and_cdf_equal_scipy(df: float) -> None:
    for p in PROBS:
        expected = stats.t.ppf(p, df) if math.isfinite(df) else stats.norm.ppf(p)
        assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for x in [-40.0, -5.0, -1.0, 0.0, 0.3, 1.96, 2.5, 10.0]:
        expected = stats.t.cdf(x, df) if math.isfinite(df) else stats.norm.cdf(x)
        assert t_cdf(x, df) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_binomial_cdf_equals_scipy() -> None:
    for n in [1, 2, 10, 57, 1_000, 30_001]:
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n, *range(0, n + 1, max(1, n // 29))}):
            for p in [0.5, 0.03, 0.93]:
                assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-14)
    assert binomial_cdf(-1, 5, 0.5) == 0.0 and binomial_cdf(5, 5, 0.5) == 1.0


def test_beta_and_normal_equal_scipy() -> None:
    for a, b in [(0.5, 0.5), (2.0, 3.0), (1e3, 0.5), (5e5, 20.0), (0.5, 4e6)]:
        for x in [0.0, 1e-9, 0.1, 0.5, 0.9, 1 - 1e-9, 1.0]:
            assert beta_regularized(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9, abs=1e-14)
    assert normal_quantile(0.975) == pytest.approx(stats.norm.ppf(0.975), rel=1e-14)
    assert normal_cdf(-1.5) == pytest.approx(stats.norm.cdf(-1.5), rel=1e-14)


def test_bad_arguments_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"Expected a probability in \(0, 1\) but got 1.0"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="Expected `df` > 0 but got 0"):
        t_quantile(0.5, 0)
    with pytest.raises(ValueError, match=r"Expected `x` in \[0, 1\] but got 1.5"):
        beta_regularized(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="Expected `a` and `b` > 0 but got a=0"):
        beta_regularized(0, 1.0, 0.5)
