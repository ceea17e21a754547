"""Wilson, t and percentile intervals against statsmodels, scipy and numpy; their coverage by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from lightning_validate.metrics.intervals import (
    Interval,
    Intervals,
    format_interval,
    format_intervals,
    interval_names,
    intervals_from,
    percentile,
    t_interval,
    wilson,
)

SETS = 2000  # validation sets per coverage simulation: the coverage's standard error is 0.49 points at 95%


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_equals_statsmodels(confidence: float) -> None:
    for n in [1, 2, 7, 30, 164, 1000, 50_000]:
        for k in sorted({0, 1, n // 2, n - 1, n, *range(0, n + 1, max(1, n // 13))}):
            low, high = wilson(k, n, confidence)
            ref_low, ref_high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
            assert low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9), (k, n)
    assert all(math.isnan(v) for v in wilson(0, 0, 0.95))


def test_t_interval_equals_scipy() -> None:
    for df in [1, 5, 99, 10**6]:
        low, high = t_interval(0.7, 0.05, df, 0.95)
        ref = stats.t.interval(0.95, df, loc=0.7, scale=0.05)
        assert (low, high) == pytest.approx(ref, rel=1e-10)
    assert all(math.isnan(v) for v in t_interval(0.7, 0.05, 0, 0.95))  # one unit: no spread to estimate
    assert all(math.isnan(v) for v in t_interval(0.7, math.nan, 10, 0.95))


def test_percentile_equals_numpy_and_drops_replicates_that_are_not_finite() -> None:
    values = torch.randn(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    low, high = percentile(values, 0.9)
    assert (low, high) == pytest.approx(tuple(np.quantile(values.numpy(), [0.05, 0.95])), rel=1e-12)
    with_nan = torch.cat([values, torch.tensor([math.nan, math.inf])])
    assert percentile(with_nan, 0.9) == (low, high)
    assert all(math.isnan(v) for v in percentile(torch.tensor([1.0, math.nan]), 0.95))


@pytest.mark.parametrize(("p", "n"), [(0.9, 164), (0.5, 500), (0.97, 1000)])
def test_wilson_covers_the_true_proportion_95_percent_of_the_time(p: float, n: int) -> None:
    counts = np.random.default_rng(0).binomial(n, p, size=SETS)
    covered = sum(low <= p <= high for low, high in (wilson(int(k), n, 0.95) for k in counts))
    assert 0.935 <= covered / SETS <= 0.965, covered / SETS


def test_intervals_checks_every_argument_at_once() -> None:
    assert Intervals() == Intervals(confidence=0.95, replicates=1000, seed=0, record=False)
    with pytest.raises(ValueError, match=r"Expected `confidence` in \(0, 1\), e.g. 0.95, but got 95; "
                                         r"`replicates` to be an int >= 2, e.g. 1000, but got 1; "
                                         r"`seed` to be an int in \[0, 2\*\*31\) but got -1\."):
        Intervals(confidence=95, replicates=1, seed=-1)
    with pytest.raises(ValueError, match="Expected `record` to be True or False but got 'yes'"):
        Intervals(record="yes")  # type: ignore[arg-type]


def test_intervals_from_a_level_or_a_spec() -> None:
    assert intervals_from(None, "x") is None
    assert intervals_from(0.9, "x") == Intervals(confidence=0.9)
    spec = Intervals(replicates=10)
    assert intervals_from(spec, "x") is spec
    with pytest.raises(ValueError, match=r"Expected attribute `confidence` to be None \(no intervals\), a confidence "
                                         r"level in \(0, 1\) such as 0.95, .* but got True\."):
        intervals_from(True, "attribute `confidence`")
    with pytest.raises(ValueError, match=r"but got 1\.5"):
        intervals_from(1.5, "x")


def test_formatting_joins_a_value_with_its_bounds() -> None:
    assert format_interval(0.975, 0.958, 0.985) == "0.975 [0.958, 0.985]"
    assert format_interval(0.975, math.nan, math.nan) == "0.975"
    assert interval_names("val/acc") == ("val/acc_low", "val/acc_high")
    assert interval_names("val/acc/dataloader_idx_1") == ("val/acc_low/dataloader_idx_1",
                                                          "val/acc_high/dataloader_idx_1")
    values = {"val/loss": 0.5, "val/loss_low": 0.4, "val/loss_high": 0.6, "val/acc/clean": 0.9,
              "val/acc_low/clean": 0.8, "val/acc_high/clean": 0.95, "epoch": 2.0}
    assert format_intervals(values, digits=2) == {
        "val/loss": "0.50 [0.40, 0.60]", "val/acc/clean": "0.90 [0.80, 0.95]", "epoch": "2.00"
    }
    assert Interval(1.0, 2.0).high == 2.0
