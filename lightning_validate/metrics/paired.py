"""Paired comparison of two evaluations of the same samples: the difference B - A per value, its interval, p-values.

Two checkpoints evaluated on the same validation set make errors on mostly the same samples; comparing their two
intervals ignores that and is several times less sensitive than comparing them sample by sample. From two
``SampleRecord`` of the same samples, ``compare_records`` gives per value:

- accuracy-like proportions (one trial per sample, the same trials for both): the exact McNemar test on the
  samples where the two disagree (``b`` right only by A, ``c`` right only by B), with the Agresti-Min interval
  of the difference (a half added to each cell of the 2x2 table: its coverage stays near nominal down to a few
  disagreements). The exact test is conservative when there are few disagreements, so the two can disagree at
  the margin (an interval that just excludes 0 with a p-value just above 0.05); the report says so when they do;
- losses, MAE, MSE and other ratios of per-sample sums (also proportions whose trials differ, such as precision):
  the paired delta method, which for a per-sample mean is the paired t-test on the per-sample differences, with
  Student's t on ``n - 1`` degrees of freedom;
- metrics without a per-sample form (macro F1, Jaccard, R2): the paired Poisson bootstrap. Both evaluations weighted
  each sample alike in each replicate (same seed, same sample indices), so ``B(b) - A(b)`` is a replicate of the
  difference: its percentiles are the interval, and the p-value is the share of replicates whose centred difference
  is as far from 0 as the observed one.

The p-values are adjusted for the number of values compared with Holm's step-down method (it controls the chance of
any false finding at ``alpha`` and is never less powerful than Bonferroni). Read the intervals first: a p-value says
whether a difference is distinguishable from noise, the interval how large it may be.

Example:
    >>> round(mcnemar_p(21, 41), 4)  # 62 disagreements, 41 of them in B's favour
    0.0151
    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    >>> round(minimum_detectable_difference(1000, 0.05), 4)  # 80% power at alpha 0.05, 5% disagreement
    0.0198

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_validate.metrics.distributions import binomial_cdf, normal_quantile, t_cdf, t_quantile
from lightning_validate.metrics.intervals import percentile
from lightning_validate.metrics.records import SampleRecord

__all__ = [
    "PairedReport",
    "PairedRow",
    "compare_records",
    "holm",
    "mcnemar_p",
    "mcnemar_power",
    "minimum_detectable_difference",
]


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value: ``min(1, 2 P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``.

    Equal to statsmodels' ``mcnemar([[., b], [c, .]], exact=True).pvalue``.
    """
    if b + c == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf(min(b, c), b + c, 0.5))


def _agresti_min(b: int, c: int, n: int, confidence: float) -> tuple[float, float]:
    """The Agresti-Min (2005) interval of ``(c - b) / n``: Wald's, after adding a half to each cell of the table."""
    z = normal_quantile(0.5 + confidence / 2)
    bs, cs, ns = b + 0.5, c + 0.5, n + 2.0
    centre = (cs - bs) / ns
    se = math.sqrt(max((bs + cs) / ns - centre * centre, 0.0) / ns)
    return max(-1.0, centre - z * se), min(1.0, centre + z * se)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (in their order); ``nan`` stays ``nan`` and is not counted."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _critical(discordant: int, alpha: float) -> int:
    """The largest ``k`` with ``mcnemar_p(k, discordant - k) <= alpha`` (``-1`` if none)."""
    lo, hi = -1, discordant // 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mcnemar_p(mid, discordant - mid) <= alpha:
            lo = mid
        else:
            hi = mid - 1
    return lo


def mcnemar_power(n: int, discordance: float, difference: float, alpha: float = 0.05) -> float:
    """The exact power of the two-sided exact McNemar test at level ``alpha``.

    ``n`` samples, each a disagreement with probability ``discordance`` (``d = p_01 + p_10``), of which B is right
    in ``(d + difference) / 2`` (the true accuracy gain of B over A is ``difference``). Summed over the number of
    disagreements, no simulation.
    """
    if not 0 < discordance <= 1 or abs(difference) > discordance:
        raise ValueError(f"Expected 0 < discordance <= 1 and |difference| <= discordance but got {discordance}, "
                         f"{difference}.")
    share = (discordance + difference) / (2 * discordance)  # P(B right | a disagreement)
    power = 0.0
    log_d, log_nd = math.log(discordance), math.log1p(-discordance) if discordance < 1 else -math.inf
    for d in range(n + 1):
        log_pmf = math.lgamma(n + 1) - math.lgamma(d + 1) - math.lgamma(n - d + 1) + d * log_d + (
            (n - d) * log_nd if n > d else 0.0)
        weight = math.exp(log_pmf)
        if weight < 1e-16:
            continue
        k = _critical(d, alpha)
        if k < 0:
            continue
        # Reject when B is right in at most k or at least d - k of the d disagreements.
        reject = binomial_cdf(k, d, share) + 1.0 - binomial_cdf(d - k - 1, d, share)
        power += weight * min(1.0, reject)
    return power


def minimum_detectable_difference(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest accuracy gain a paired test detects with ``power``, by the normal approximation (Connor, 1987).

    Solves ``|D| sqrt(n) = z(1 - alpha/2) sqrt(d) + z(power) sqrt(d - D^2)`` for ``D``, with ``d`` the share of
    samples on which the two models disagree. It is close to ``(z(1 - alpha/2) + z(power)) sqrt(d / n)``.
    """
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)
    lo, hi = 0.0, discordance
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid * math.sqrt(n) < za * math.sqrt(discordance) + zb * math.sqrt(max(discordance - mid * mid, 0.0)):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class PairedRow(NamedTuple):
    """One value's comparison: ``difference = b - a``, its interval ``[low, high]`` and p-values."""

    name: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    p: float
    p_holm: float
    method: str


@dataclass
class PairedReport:
    """The comparison of two evaluations, one ``PairedRow`` per value; ``str()`` gives a table."""

    rows: list[PairedRow]
    samples: int
    confidence: float
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> PairedRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No value {name!r} in this comparison; it has {[r.name for r in self.rows]}.")

    def to_dict(self) -> dict[str, dict[str, float | str]]:
        """``{name: {"a": ..., "b": ..., "difference": ..., "low": ..., "high": ..., "p": ..., ...}}``."""
        return {row.name: dict(row._asdict()) for row in self.rows}

    def __str__(self) -> str:
        head = (f"B - A on {self.samples:,} samples; {self.confidence:.0%} intervals; p-values Holm-adjusted over "
                f"{sum(not math.isnan(r.p) for r in self.rows)} values")
        header = ("value", "A", "B", "B - A", "interval", "p", "p (Holm)", "method")
        lines = [header]
        for r in self.rows:
            lines.append((r.name, f"{r.a:.4f}", f"{r.b:.4f}", f"{r.difference:+.4f}",
                          f"[{r.low:+.4f}, {r.high:+.4f}]", _p(r.p), _p(r.p_holm), r.method))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [head]
        for i, line in enumerate(lines):
            text.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        return "\n".join(text + self.notes)


def _p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def _derivative(transform: str, ratio: float) -> float:
    if transform == "sqrt":
        return 0.5 / math.sqrt(ratio) if ratio > 0 else math.nan
    if transform == "exp":
        return math.exp(ratio)
    if transform == "complement":
        return -1.0
    return 1.0


def _paired_ratio(rows_a: Tensor, rows_b: Tensor, transform: str) -> tuple[float, float, int]:
    """The paired delta method: the difference ``f(R_B) - f(R_A)``, its standard error and the units."""
    la, ta = rows_a[:, 0], rows_a[:, 1]
    lb, tb = rows_b[:, 0], rows_b[:, 1]
    units = (ta != 0) | (tb != 0)
    n = int(units.sum())
    if n < 2 or ta.sum() == 0 or tb.sum() == 0:
        return math.nan, math.nan, n
    ra, rb = float(la.sum() / ta.sum()), float(lb.sum() / tb.sum())
    mean_ta, mean_tb = float(ta.sum()) / n, float(tb.sum()) / n
    # Each sample's influence on f(R_B) - f(R_A); for a per-sample mean it is d_i - mean(d): the paired t-test.
    u = _derivative(transform, rb) * (lb - rb * tb) / mean_tb - _derivative(transform, ra) * (la - ra * ta) / mean_ta
    u = u[units]
    se = math.sqrt(float((u * u).sum()) / (n * (n - 1)))
    fa, fb = _apply(transform, ra), _apply(transform, rb)
    return fb - fa, se, n


def _apply(transform: str, ratio: float) -> float:
    if transform == "sqrt":
        return math.sqrt(max(ratio, 0.0))
    if transform == "exp":
        return math.exp(ratio)
    if transform == "complement":
        return 1.0 - ratio
    return ratio


def _binary_trials(rows_a: Tensor, rows_b: Tensor) -> bool:
    """Whether both count one trial per sample (or none), the same trials: McNemar's setting."""
    ta, tb = rows_a[:, 1], rows_b[:, 1]
    if not torch.equal(ta, tb) or not bool(((ta == 0) | (ta == 1)).all()):
        return False
    ka, kb = rows_a[:, 0], rows_b[:, 0]
    return bool((((ka == 0) | (ka == 1)) & ((kb == 0) | (kb == 1))).all())


def compare_records(a: SampleRecord, b: SampleRecord, confidence: float | None = None) -> PairedReport:
    """Compare two evaluations of the same samples: B - A for every value both recorded (see the module docstring).

    Args:
        a: the record of the first evaluation (the baseline).
        b: the record of the second.
        confidence: the level of the intervals (default: the records' own).

    Raises:
        ValueError: if the records do not cover the same samples in the same order (their indices or target
            fingerprints differ), or their bootstrap seeds differ where both have replicates.
    """
    level = a.confidence if confidence is None else confidence
    if not 0 < level < 1:
        raise ValueError(f"Expected `confidence` in (0, 1) but got {confidence!r}.")
    a, b = _sorted(a), _sorted(b)
    if a.samples != b.samples or not torch.equal(a.ids, b.ids):
        raise ValueError(
            f"Expected two records of the same samples but A has {a.samples} and B {b.samples}"
            f"{'' if a.samples != b.samples else ' with other indices'}. Evaluate both on the same dataloader, "
            "in the same order (shuffle=False)."
        )
    both = ~(torch.isnan(a.fingerprint) | torch.isnan(b.fingerprint))
    if not torch.equal(a.fingerprint[both], b.fingerprint[both]):
        first = int(torch.nonzero(both & (a.fingerprint != b.fingerprint))[0])
        raise ValueError(
            f"Expected the same targets at each sample index but sample {int(a.ids[first])} has different targets in "
            "the two records: they saw the samples in another order (a shuffling dataloader) or other data. "
            "Evaluate both with `shuffle=False` on the same data."
        )
    rows: list[tuple[str, float, float, float, float, float, float, str]] = []
    notes: list[str] = []
    for name in a.values:
        if name not in b.values or a.kinds.get(name) != b.kinds.get(name) or name not in a.kinds:
            continue
        kind = a.kinds[name]
        transform = a.transforms.get(name, "")
        va, vb = a.values[name], b.values[name]
        if kind == "bootstrap":
            ra, rb = a.replicates.get(name), b.replicates.get(name)
            if ra is None or rb is None or ra.shape != rb.shape:
                continue
            if a.seed != b.seed:
                raise ValueError(
                    f"Expected the same bootstrap seed in both records but A used {a.seed} and B {b.seed}: "
                    "replicates pair only when they weight the samples alike. Evaluate both with the same "
                    "`Intervals(seed=...)`."
                )
            diffs = (rb - ra).to(torch.float64)
            delta = vb - va
            low, high = percentile(diffs, level)
            finite = diffs[torch.isfinite(diffs)]
            far = int((torch.abs(finite - delta) >= abs(delta)).sum()) if finite.numel() else 0
            p = (1 + far) / (1 + finite.numel()) if finite.numel() else math.nan
            rows.append((name, va, vb, delta, low, high, p, f"paired bootstrap, {diffs.numel()} replicates"))
            continue
        if name not in a.rows or name not in b.rows:
            continue
        rows_a, rows_b = a.rows[name].to(torch.float64), b.rows[name].to(torch.float64)
        if kind == "proportion" and _binary_trials(rows_a, rows_b):
            trials = rows_a[:, 1] == 1
            ka, kb = rows_a[trials, 0], rows_b[trials, 0]
            n = int(trials.sum())
            only_a, only_b = int(((ka == 1) & (kb == 0)).sum()), int(((ka == 0) & (kb == 1)).sum())
            p = mcnemar_p(only_a, only_b)
            low, high = _agresti_min(only_a, only_b, n, level)
            if transform == "complement":  # Hamming distance: one minus an accuracy
                low, high = -high, -low
            if (low > 0 or high < 0) != (p <= 1 - level):
                notes.append(
                    f"{name}: the interval {'excludes' if low > 0 or high < 0 else 'includes'} 0 but the exact "
                    f"McNemar p-value is {'above' if p > 1 - level else 'below'} {1 - level:.2g}: with "
                    f"{only_a + only_b} disagreements the exact test is conservative; a borderline difference."
                )
            rows.append((name, va, vb, vb - va, low, high, p,
                         f"McNemar exact (A only {only_a}, B only {only_b})"))
            continue
        delta, se, n = _paired_ratio(rows_a, rows_b, transform)
        if math.isnan(se):
            rows.append((name, va, vb, vb - va, math.nan, math.nan, math.nan, "too few samples"))
            continue
        delta = vb - va if transform == "" else delta
        t = t_quantile(0.5 + level / 2, n - 1)
        # No spread at all (identical per-sample values): any difference is certain, none is none.
        p = min(1.0, 2.0 * t_cdf(-abs(delta) / se, n - 1)) if se > 0 else (0.0 if delta != 0 else 1.0)
        method = "paired t on per-sample values" if bool((rows_a[:, 1] == rows_a[0, 1]).all()) and bool(
            (rows_b[:, 1] == rows_a[0, 1]).all()) else "paired delta method, per sample"
        rows.append((name, va, vb, delta, delta - t * se, delta + t * se, p, method))
    adjusted = holm([r[6] for r in rows])
    report_rows = [PairedRow(name, va, vb, d, lo, hi, p, ph, m)
                   for (name, va, vb, d, lo, hi, p, m), ph in zip(rows, adjusted, strict=True)]
    return PairedReport(report_rows, a.samples, level, notes)


def _sorted(record: SampleRecord) -> SampleRecord:
    ids = record.ids.cpu()
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return record
    return SampleRecord.merge([record])
