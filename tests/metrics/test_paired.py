"""Paired comparisons: McNemar and Holm against statsmodels, the paired t against scipy, size and power simulated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from lightning_validate.metrics.paired import (
    compare_records,
    holm,
    mcnemar_p,
    mcnemar_power,
    minimum_detectable_difference,
)
from lightning_validate.metrics.records import SampleRecord

SETS = 2000


def record(rows: dict[str, np.ndarray], kinds: dict[str, str], values: dict[str, float] | None = None,
           replicates: dict[str, np.ndarray] | None = None, seed: int = 0, fingerprint: np.ndarray | None = None,
           transforms: dict[str, str] | None = None) -> SampleRecord:
    n = len(next(iter(rows.values()))) if rows else 10
    as_rows = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in rows.items()}
    if values is None:
        values = {k: float(v[:, 0].sum() / v[:, 1].sum()) for k, v in as_rows.items()}
    return SampleRecord(
        ids=torch.arange(n), fingerprint=torch.zeros(n, dtype=torch.float64) if fingerprint is None
        else torch.from_numpy(fingerprint), rows=as_rows, kinds=kinds, values=values,
        replicates={k: torch.from_numpy(v) for k, v in (replicates or {}).items()}, seed=seed,
        transforms=transforms or {},
    )


def test_mcnemar_equals_statsmodels_exact() -> None:
    for b in range(0, 60, 7):
        for c in [0, 1, 5, 13, 40, 200]:
            expected = mcnemar([[100, b], [c, 100]], exact=True).pvalue
            assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15), (b, c)


def test_holm_equals_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.0001, 0.5]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)
    assert math.isnan(holm([0.01, math.nan])[1]) and holm([0.01, math.nan])[0] == 0.01


def test_per_sample_losses_get_the_paired_t_test() -> None:
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.3, 500)
    a, b = base + rng.normal(0, 0.1, 500), base + rng.normal(-0.02, 0.1, 500)
    ones = np.ones(500)
    report = compare_records(record({"loss": np.c_[a, ones]}, {"loss": "ratio"}),
                             record({"loss": np.c_[b, ones]}, {"loss": "ratio"}))
    row = report["loss"]
    test = stats.ttest_rel(b, a)
    assert row.difference == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert row.p == pytest.approx(test.pvalue, rel=1e-9)
    low, high = test.confidence_interval(0.95)
    assert (row.low, row.high) == pytest.approx((low, high), rel=1e-9)
    assert row.method == "paired t on per-sample values"


def test_accuracy_gets_mcnemar_and_an_agresti_min_interval() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(1000) < 0.8).astype(float)
    b = a.copy()
    flip = rng.choice(1000, 60, replace=False)
    b[flip[:40]] = 1.0
    b[flip[40:]] = 0.0
    ones = np.ones(1000)
    report = compare_records(record({"acc": np.c_[a, ones]}, {"acc": "proportion"}),
                             record({"acc": np.c_[b, ones]}, {"acc": "proportion"}))
    row = report["acc"]
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert row.method == f"McNemar exact (A only {only_a}, B only {only_b})"
    assert row.p == pytest.approx(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue, rel=1e-9)
    centre = (only_b - only_a) / 1002
    se = math.sqrt(((only_a + only_b + 1) / 1002 - centre**2) / 1002)
    assert (row.low, row.high) == pytest.approx((centre - 1.959963984540054 * se, centre + 1.959963984540054 * se))


def test_a_borderline_difference_where_interval_and_exact_test_disagree_is_said() -> None:
    a, b = np.ones(360), np.ones(360)
    a[:9], b[9:11] = 0.0, 0.0  # B alone right on 9 samples, A alone on 2: the exact test is conservative here
    ones = np.ones(360)
    report = compare_records(record({"acc": np.c_[a, ones]}, {"acc": "proportion"}),
                             record({"acc": np.c_[b, ones]}, {"acc": "proportion"}))
    row = report["acc"]
    assert row.low > 0 and row.p > 0.05
    assert report.notes == ["acc: the interval excludes 0 but the exact McNemar p-value is above 0.05: with 11 "
                            "disagreements the exact test is conservative; a borderline difference."]
    assert str(report).endswith(report.notes[0])


def test_bootstrap_values_compare_replicate_by_replicate() -> None:
    rng = np.random.default_rng(2)
    ra = rng.normal(0.70, 0.01, 1000)
    rb = ra + rng.normal(0.03, 0.005, 1000)
    report = compare_records(record({}, {"f1": "bootstrap"}, {"f1": 0.70}, {"f1": ra}),
                             record({}, {"f1": "bootstrap"}, {"f1": 0.73}, {"f1": rb}))
    row = report["f1"]
    assert (row.low, row.high) == pytest.approx(tuple(np.quantile(rb - ra, [0.025, 0.975])), rel=1e-12)
    assert row.p == pytest.approx(1 / 1001) and row.method == "paired bootstrap, 1000 replicates"
    with pytest.raises(ValueError, match="Expected the same bootstrap seed in both records but A used 0 and B 1"):
        compare_records(record({}, {"f1": "bootstrap"}, {"f1": 0.7}, {"f1": ra}),
                        record({}, {"f1": "bootstrap"}, {"f1": 0.7}, {"f1": rb}, seed=1))


def test_records_of_other_samples_do_not_compare() -> None:
    ones = np.ones((10, 2))
    a = record({"acc": ones}, {"acc": "proportion"})
    b = record({"acc": np.ones((11, 2))}, {"acc": "proportion"})
    with pytest.raises(ValueError, match="Expected two records of the same samples but A has 10 and B 11"):
        compare_records(a, b)
    other = record({"acc": ones}, {"acc": "proportion"}, fingerprint=np.arange(10.0))
    with pytest.raises(ValueError, match="sample 1 has different targets in the two records"):
        compare_records(a, other)


def test_the_report_is_a_table() -> None:
    ones = np.ones(100)
    a = record({"loss": np.c_[np.linspace(0, 1, 100), ones]}, {"loss": "ratio"})
    b = record({"loss": np.c_[np.linspace(0, 0.9, 100), ones]}, {"loss": "ratio"})
    text = str(compare_records(a, b))
    assert text.splitlines()[0] == "B - A on 100 samples; 95% intervals; p-values Holm-adjusted over 1 values"
    assert text.splitlines()[1].split() == ["value", "A", "B", "B", "-", "A", "interval", "p", "p", "(Holm)", "method"]
    assert "loss   0.5000  0.4500  -0.0500" in text


def simulate_mcnemar(n: int, discordance: float, difference: float, seed: int) -> float:
    """Rejections at 5% among SETS experiments: each sample a disagreement with probability `discordance`."""
    rng = np.random.default_rng(seed)
    disagreements = rng.binomial(n, discordance, SETS)
    b_right = rng.binomial(disagreements, (discordance + difference) / (2 * discordance))
    return float(np.mean([mcnemar_p(d - c, c) <= 0.05 for d, c in zip(disagreements, b_right, strict=True)]))


def test_mcnemar_rejects_equally_good_models_at_its_size() -> None:
    size = mcnemar_power(1000, 0.05, 0.0)  # the exact test's size: at most 5%, a little below (discreteness)
    assert 0.03 < size <= 0.05
    rate = simulate_mcnemar(1000, 0.05, 0.0, seed=0)
    assert abs(rate - size) <= 3 * math.sqrt(size * (1 - size) / SETS), (rate, size)


def test_mcnemar_detects_a_2_point_gain_at_the_power_the_formula_predicts() -> None:
    power = mcnemar_power(1000, 0.05, 0.02)
    rate = simulate_mcnemar(1000, 0.05, 0.02, seed=1)
    assert abs(rate - power) <= 3 * math.sqrt(power * (1 - power) / SETS), (rate, power)
    # The normal approximation (Connor 1987) that gives the minimum detectable difference is close to the exact power.
    approx = stats.norm.cdf((0.02 * math.sqrt(1000) - 1.96 * math.sqrt(0.05)) / math.sqrt(0.05 - 0.02**2))
    assert abs(approx - power) < 0.04
    assert minimum_detectable_difference(1000, 0.05) == pytest.approx(0.0198, abs=2e-4)
    assert minimum_detectable_difference(10_000, 0.02) == pytest.approx(0.0040, abs=1e-4)


def test_the_paired_t_test_rejects_equal_losses_at_5_percent() -> None:
    rng = np.random.default_rng(3)
    rejected = 0
    ones = np.ones(200)
    for _ in range(SETS):
        shared = rng.gamma(2.0, 0.3, 200)
        a, b = shared + rng.normal(0, 0.2, 200), shared + rng.normal(0, 0.2, 200)
        report = compare_records(record({"loss": np.c_[a, ones]}, {"loss": "ratio"}),
                                 record({"loss": np.c_[b, ones]}, {"loss": "ratio"}))
        rejected += report["loss"].p <= 0.05
    assert abs(rejected / SETS - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / SETS), rejected / SETS
