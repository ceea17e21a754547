"""The ratio estimator's standard error against a float64 formula on the whole data; its coverage by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from host_sync import no_host_sync
from scipy import stats
from torch import Tensor

from lightning_validate.metrics.intervals import t_interval
from lightning_validate.metrics.ratio import RatioAccumulator

CPU = torch.device("cpu")
SETS = 2000

#: Python-level reads of a tensor's value: each one is a host-device sync on a GPU.
FORBIDDEN = [(Tensor, "item"), (Tensor, "tolist"), (Tensor, "cpu"), (Tensor, "numpy"), (Tensor, "__bool__"),
             (Tensor, "__float__"), (Tensor, "__int__"), (Tensor, "nonzero"), (torch, "nonzero")]


def reference(sums: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """The delta-method standard error in float64 on the whole data, rows of weight 0 left out."""
    keep = weights != 0
    s, w = sums[keep], weights[keep]
    n = keep.sum()
    ratio = s.sum() / w.sum()
    return ratio, math.sqrt(((s - ratio * w) ** 2).sum() / (n * (n - 1))) / w.mean()


def test_equals_the_formula_on_the_whole_data_whatever_the_batches_and_processes() -> None:
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 30, 500).astype(np.float64)  # token counts, some rows with none
    sums = weights * (2 + rng.normal(0, 0.5, 500)) + rng.normal(0, 1, 500) * np.sqrt(weights)
    sums[weights == 0] = 0.0
    expected = reference(sums, weights)
    for world in (1, 3):
        packed = torch.zeros(7 * world, dtype=torch.float64)
        for rank in range(world):  # DistributedSampler's layout: rank r gets rows r, r + world, ...
            acc = RatioAccumulator()
            rows = np.arange(rank, 500, world)
            for chunk in np.array_split(rows, 7):
                acc.add(torch.from_numpy(sums[chunk]), torch.from_numpy(weights[chunk]))
            packed += acc.pack(rank, world, CPU)
        estimate = RatioAccumulator.merge(packed)
        assert estimate.units == int((weights != 0).sum())
        assert (estimate.ratio, estimate.se) == pytest.approx(expected, rel=1e-12)


def test_one_weight_per_row_is_the_standard_error_of_a_mean() -> None:
    values = np.random.default_rng(1).gamma(2.0, 0.5, 301)
    acc = RatioAccumulator()
    for chunk in np.array_split(values, 5):
        acc.add(torch.from_numpy(chunk), 1.0)
    acc.add(torch.zeros(3, dtype=torch.float64), 0.0)  # rows that weigh nothing add nothing
    estimate = RatioAccumulator.merge(acc.pack(0, 1, CPU))
    assert estimate.units == 301
    assert estimate.ratio == pytest.approx(values.mean(), rel=1e-13)
    assert estimate.se == pytest.approx(stats.sem(values), rel=1e-12)


def test_rows_with_host_and_device_weights_mix() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(3, 1, 40), rng.normal(3, 1, 60)
    wb = rng.integers(1, 5, 60).astype(np.float64)
    acc = RatioAccumulator()
    acc.add(torch.from_numpy(a) * 4, 4.0)  # per-sample sums over 4 elements each
    acc.add(torch.from_numpy(b * wb), torch.from_numpy(wb))
    expected = reference(np.concatenate([a * 4, b * wb]), np.concatenate([np.full(40, 4.0), wb]))
    estimate = RatioAccumulator.merge(acc.pack(0, 1, CPU))
    assert (estimate.ratio, estimate.se) == pytest.approx(expected, rel=1e-12)


def test_the_shift_keeps_digits_where_the_one_pass_formula_loses_them() -> None:
    values = 1e8 + np.random.default_rng(3).normal(0, 1e-3, 1000)  # a large mean, a tiny spread
    acc = RatioAccumulator()
    for chunk in np.array_split(values, 10):
        acc.add(torch.from_numpy(chunk), 1.0)
    estimate = RatioAccumulator.merge(acc.pack(0, 1, CPU))
    assert estimate.se == pytest.approx(stats.sem(values), rel=1e-6)
    naive = (np.sum(values**2) - values.sum() ** 2 / 1000) / (1000 * 999)  # sum of squares, no shift
    assert not math.isclose(math.sqrt(max(naive, 0.0)), stats.sem(values), rel_tol=0.1)


def test_add_and_pack_never_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    acc = RatioAccumulator()
    with no_host_sync(monkeypatch, FORBIDDEN):
        acc.add(torch.rand(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
        acc.add(torch.rand(8, dtype=torch.float64), 2.0)
        packed = acc.pack(0, 1, CPU)
    assert RatioAccumulator.merge(packed).units == 16


def coverage(sums: Tensor, weights: Tensor, truth: float) -> float:
    covered = 0
    for s, w in zip(sums, weights, strict=True):
        acc = RatioAccumulator()
        half = s.shape[0] // 2
        acc.add(s[:half], w[:half])
        acc.add(s[half:], w[half:])
        estimate = RatioAccumulator.merge(acc.pack(0, 1, CPU))
        low, high = t_interval(estimate.ratio, estimate.se, estimate.units - 1, 0.95)
        covered += low <= truth <= high
    return covered / len(sums)


def test_a_mean_loss_is_covered_95_percent_of_the_time() -> None:
    # Skewed per-sample losses, as cross-entropy losses are: Gamma(2, 1/4), mean 0.5.
    losses = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 0.25, (SETS, 400)))
    assert 0.935 <= coverage(losses, torch.ones_like(losses), 0.5) <= 0.965


def test_a_token_loss_is_covered_with_the_sequence_as_unit_and_not_with_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    n = 200
    tokens = torch.randint(1, 41, (SETS, n), generator=g).double()
    difficulty = 2.0 + 0.5 * torch.randn(SETS, n, generator=g, dtype=torch.float64)  # per sequence
    sums = tokens * difficulty + torch.randn(SETS, n, generator=g, dtype=torch.float64) * tokens.sqrt()  # noise sd 1
    assert 0.935 <= coverage(sums, tokens, 2.0) <= 0.965
    # Tokens taken as independent: the per-token spread (sd sqrt(1.25)) over sqrt(all tokens) is far too narrow.
    ratio = sums.sum(1) / tokens.sum(1)
    naive = ((ratio - 2.0).abs() <= 1.96 * (1.25 / tokens.sum(1)).sqrt()).double().mean().item()
    assert naive < 0.7, naive
