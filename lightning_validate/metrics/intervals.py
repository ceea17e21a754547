"""Confidence intervals from the few sums an epoch keeps: Wilson, Student's t, percentiles of bootstrap replicates.

What an interval here covers: the variation of a metric from one validation set to another drawn from the same
distribution, with the model fixed. It says how far the value measured on these samples may be from the value on
the whole population they were drawn from. It does not cover another training seed, other hyperparameters or
another split of the data: those vary the model, not the set.

Which interval for which value (``docs/uncertainty.md`` gives the reasons):

- a proportion of samples (accuracy, top-k accuracy, recall, precision, specificity): ``wilson(k, n)``;
- a ratio of sums over samples (a mean loss, MAE, MSE, a token-weighted loss): ``t_interval`` around the value
  with the delta-method standard error of ``metrics.ratio``, the sample (the batch row) as the unit;
- anything else computed from summed states (macro F1, Jaccard, R2): ``percentile`` of Poisson bootstrap
  replicates (``metrics.bootstrap``).

Example:
    >>> low, high = wilson(90, 100, 0.95)  # 90 of 100 correct
    >>> round(low, 4), round(high, 4)
    (0.8256, 0.9448)
    >>> format_interval(0.9, low, high)
    '0.900 [0.826, 0.945]'
    >>> Intervals(confidence=0.9)
    Intervals(confidence=0.9, replicates=1000, seed=0, record=False)

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_validate.metrics.distributions import normal_quantile, t_quantile

__all__ = [
    "HIGH",
    "LOW",
    "Interval",
    "Intervals",
    "format_interval",
    "format_intervals",
    "intervals_from",
    "percentile",
    "t_interval",
    "wilson",
]

#: Suffixes of the logged names: ``val/acc`` has ``val/acc_low`` and ``val/acc_high``.
LOW, HIGH = "_low", "_high"


class Interval(NamedTuple):
    """A two-sided confidence interval ``[low, high]`` (``nan`` for both when there is nothing to estimate)."""

    low: float
    high: float


NO_INTERVAL = Interval(math.nan, math.nan)


@dataclass(frozen=True)
class Intervals:
    """How the intervals of an evaluation are computed: ``ValidationMixin.confidence`` or ``validate(confidence=)``.

    A float there (``confidence = 0.95``) means ``Intervals(confidence=0.95)``.

    Attributes:
        confidence: the coverage of each interval, in (0, 1): 0.95 gives 95% intervals.
        replicates: the Poisson bootstrap replicates of the metrics that have no closed form (macro F1, Jaccard, R2);
            1000 gives percentiles stable to about a tenth of the interval's width.
        seed: the bootstrap's seed. Two evaluations with the same seed weight each sample the same way in every
            replicate, which is what makes a paired comparison of their replicates valid.
        record: also keep a compact record per sample (its loss terms and correctness, keyed by sample index), so
            that two checkpoints evaluated in separate runs can be compared (``paired_comparison``).
    """

    confidence: float = 0.95
    replicates: int = 1000
    seed: int = 0
    record: bool = False

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not (
            0 < self.confidence < 1
        ):
            problems.append(f"`confidence` in (0, 1), e.g. 0.95, but got {self.confidence!r}")
        if isinstance(self.replicates, bool) or not isinstance(self.replicates, int) or self.replicates < 2:
            problems.append(f"`replicates` to be an int >= 2, e.g. 1000, but got {self.replicates!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            problems.append(f"`seed` to be an int in [0, 2**31) but got {self.seed!r}")
        if not isinstance(self.record, bool):
            problems.append(f"`record` to be True or False but got {self.record!r}")
        if problems:
            raise ValueError("Expected " + "; ".join(problems) + ".")


def intervals_from(value: object, where: str) -> Intervals | None:
    """Read a ``confidence`` setting: ``None`` (no intervals), a level such as ``0.95``, or ``Intervals(...)``.

    Raises:
        ValueError: if it is none of these (``where`` names the setting in the message).
    """
    if value is None or isinstance(value, Intervals):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(
            f"Expected {where} to be None (no intervals), a confidence level in (0, 1) such as 0.95, or "
            f"`Intervals(confidence=0.95, replicates=1000, seed=0)` but got {value!r}."
        )
    return Intervals(confidence=float(value))


def _z(confidence: float) -> float:
    return normal_quantile(0.5 + confidence / 2.0)


def wilson(k: float, n: float, confidence: float) -> Interval:
    """The Wilson score interval of a proportion ``k / n`` (``nan`` when ``n == 0``).

    Its coverage stays close to the nominal level down to small ``n`` and near 0 and 1, where the normal
    approximation ``p +- z sqrt(p (1 - p) / n)`` undercovers and can leave [0, 1]. It equals statsmodels'
    ``proportion_confint(k, n, alpha, method="wilson")``.
    """
    if n <= 0:
        return NO_INTERVAL
    z = _z(confidence)
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def t_interval(value: float, se: float, df: float, confidence: float) -> Interval:
    """``value +- t * se``, with Student's t quantile for ``df`` degrees of freedom (``nan`` if ``df < 1``)."""
    if not df >= 1 or not math.isfinite(se) or not math.isfinite(value):
        return NO_INTERVAL
    t = t_quantile(0.5 + confidence / 2.0, df)
    return Interval(value - t * se, value + t * se)


def percentile(replicates: Tensor, confidence: float) -> Interval:
    """The percentile interval of bootstrap ``replicates`` (a 1-dim tensor): its ``(1 -+ confidence) / 2`` quantiles.

    Replicates that are not finite (a replicate with no sample of a class, where the metric divides by 0) are
    dropped; with fewer than two left there is no interval.
    """
    values = replicates.detach().to(torch.float64).flatten()
    values = values[torch.isfinite(values)]
    if values.numel() < 2:
        return NO_INTERVAL
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(values, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return Interval(low, high)


def format_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """``0.975 [0.958, 0.985]``: a value with its interval, as the digits example's table shows it."""
    if math.isnan(low) and math.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_intervals(values: Mapping[str, float], digits: int = 3) -> dict[str, str]:
    """Join each logged value with its ``_low`` and ``_high`` into one string: ``{"val/acc": "0.975 [0.958, 0.985]"}``.

    The names may carry a dataloader suffix (``val/acc_low/dataloader_idx_0`` goes with ``val/acc/dataloader_idx_0``).

    Example:
        >>> format_intervals({"val/acc": 0.9, "val/acc_low": 0.85, "val/acc_high": 0.93, "epoch": 3.0})
        {'val/acc': '0.900 [0.850, 0.930]', 'epoch': '3.000'}

    """
    bounds: set[str] = set()
    out: dict[str, str] = {}
    for key in values:
        low_key, high_key = interval_names(key)
        if low_key in values and high_key in values:
            bounds.update((low_key, high_key))
    for key, value in values.items():
        if key in bounds:
            continue
        low_key, high_key = interval_names(key)
        if low_key in values and high_key in values:
            out[key] = format_interval(value, values[low_key], values[high_key], digits)
        else:
            out[key] = f"{value:.{digits}f}"
    return out


def interval_names(key: str) -> tuple[str, str]:
    """The names of the bounds of a logged value: ``val/acc/clean`` -> ``val/acc_low/clean``, ``val/acc_high/clean``.

    The bound goes on the metric's own name, before a dataloader suffix (Lightning's ``/dataloader_idx_<i>`` or the
    mixin's ``/<your name>``), so that a name's first two parts stay the stage and the metric.
    """
    stage, sep, rest = key.partition("/")
    if not sep:
        return key + LOW, key + HIGH
    name, sep2, suffix = rest.partition("/")
    tail = sep2 + suffix
    return f"{stage}/{name}{LOW}{tail}", f"{stage}/{name}{HIGH}{tail}"
