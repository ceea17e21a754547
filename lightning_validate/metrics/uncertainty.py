"""The interval of every value of one evaluation of one dataloader: which method for which value, batch by batch.

``EvaluationIntervals`` sits beside an evaluation's accumulators (the mixin's ``Loader``, ``validate()``'s loop).
Built from the metrics and the loss, it picks for each value its method (``docs/uncertainty.md``):

- the loss (a torch criterion the library sees into, or per-sample values returned by your own), MAE, MSE and
  RMSE, ``MeanMetric`` over per-sample values, torchmetrics' ``Perplexity``: the delta method of a ratio of sums
  with the sample as the unit (``metrics.ratio``); RMSE's interval is the square root of the MSE's, perplexity's the
  exp of the mean log-loss's;
- accuracy (micro, any ``top_k``), micro recall and precision, binary precision, recall, specificity and negative
  predictive value, exact match, Hamming distance: the Wilson interval of the counts the metric keeps anyway (no
  work per batch). When a sample holds several labels (pixels, a sequence) they are not independent trials: the
  interval is then the delta method with the sample as the unit, from per-sample counts;
- every other metric the Poisson bootstrap can replicate (macro F1, Jaccard index, R2, ...): the percentile
  interval of ``B`` replicates (``metrics.bootstrap``);
- a metric none of these fits is named in ``warnings`` and keeps its value without an interval.

Per batch nothing is read back to the host: ``update`` adds device sums; ``pack`` gives one float64 vector of the
same length on every process for one ``all_reduce(SUM)``; ``finish`` turns the reduced vector into intervals.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> from lightning_validate.metrics.intervals import Intervals
    >>> acc = MulticlassAccuracy(3, average="micro")
    >>> tracker = EvaluationIntervals(Intervals(), [("acc", acc)], criterion=nn.CrossEntropyLoss())
    >>> _ = torch.manual_seed(0)
    >>> for _ in range(4):
    ...     outputs, target = torch.randn(25, 3), torch.randint(0, 3, (25,))
    ...     acc.update(outputs, target)
    ...     tracker.update(outputs, target, [(outputs, target)], None, 25)
    >>> packed = tracker.pack(torch.device("cpu"))
    >>> intervals = tracker.finish(packed, {"acc": acc.compute().item(), "loss": 1.0})
    >>> sorted(intervals), intervals["acc"].low < acc.compute().item() < intervals["acc"].high
    (['acc', 'loss'], True)

"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryHammingDistance,
    BinaryNegativePredictiveValue,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    BinaryStatScores,
    MulticlassAccuracy,
    MulticlassExactMatch,
    MulticlassHammingDistance,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MulticlassStatScores,
    MultilabelExactMatch,
    MultilabelPrecision,
    MultilabelRecall,
    MultilabelSpecificity,
    MultilabelStatScores,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError
from torchmetrics.text import Perplexity
from torchmetrics.wrappers import ClasswiseWrapper

from lightning_validate.metrics.bootstrap import PoissonWeights, Replicated, Unsupported, _Pairs, family_of
from lightning_validate.metrics.intervals import NO_INTERVAL, Interval, Intervals, percentile, t_interval, wilson
from lightning_validate.metrics.loss_terms import BatchLoss, LossTerms, known, loss_plan, sample_terms
from lightning_validate.metrics.ratio import RatioAccumulator, RatioEstimate
from lightning_validate.metrics.records import SampleRecord, fingerprints

__all__ = ["EvaluationIntervals"]

_ROW = 7  # RatioAccumulator's row per process
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Rows:
    """A growing ``(capacity, width)`` float64 buffer on the device: per-sample rows of a record, written in place."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float64) -> None:
        self.width = width
        self.dtype = dtype
        self._buffer: Tensor | None = None
        self.filled = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, self.width)
        n = rows.shape[0]
        if self._buffer is None or self._buffer.device != rows.device or self.filled + n > self._buffer.shape[0]:
            capacity = max(1024, 2 * (self.filled + n))
            with torch.inference_mode(False):
                grown = torch.empty(capacity, self.width, dtype=self.dtype, device=rows.device)
                if self._buffer is not None and self.filled:
                    grown[: self.filled] = self._buffer[: self.filled].to(rows.device)
            self._buffer = grown
        self._buffer[self.filled : self.filled + n] = rows.to(self.dtype)
        self.filled += n

    def take(self) -> Tensor:
        if self._buffer is None:
            return torch.zeros(0, self.width, dtype=self.dtype)
        return self._buffer[: self.filled].cpu()


class _Estimator:
    """One value's interval: per-batch work, a packed state of a fixed size, the interval from the reduced state."""

    kind = "ratio"
    transform = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.record: _Rows | None = None

    def size(self, world: int) -> int:
        raise NotImplementedError

    def update(self, args: Sequence[Any], n: int, weights: Tensor | None) -> None:
        raise NotImplementedError

    def pack(self, device: torch.device, rank: int, world: int) -> Tensor:
        raise NotImplementedError

    def finish(self, packed: Tensor, value: float, confidence: float) -> Interval:
        raise NotImplementedError

    def sample_rows(self, args: Sequence[Any], n: int) -> Tensor | None:
        """Per-sample ``(sum, weight)`` for a record, ``(n, 2)``; ``None`` when the value has none."""
        return None


def _ratio_interval(estimate: RatioEstimate, value: float, confidence: float, transform: str) -> Interval:
    """The t interval of a ratio (``df = units - 1``), around the logged value, through the value's transform."""
    if transform == "":
        return t_interval(value, estimate.se, estimate.units - 1, confidence)
    low, high = t_interval(estimate.ratio, estimate.se, estimate.units - 1, confidence)
    if math.isnan(low):
        return NO_INTERVAL
    if transform == "sqrt":
        return Interval(math.sqrt(max(low, 0.0)), math.sqrt(max(high, 0.0)))
    if transform == "exp":
        return Interval(math.exp(low), math.exp(high))
    return Interval(1.0 - high, 1.0 - low)  # complement


# --------------------------------------------------------------------------------------------------------------
# Ratios with the sample as the unit: losses, MAE, MSE, means, perplexity


class _Ratio(_Estimator):
    def __init__(self, name: str, rows: Callable[[Sequence[Any], int], tuple[Tensor, Tensor | float] | None],
                 transform: str = "", why_not: str = "") -> None:
        super().__init__(name)
        self.rows = rows
        self.transform = transform
        self.why_not = why_not  # said at the end when some batch had no per-sample terms
        self.acc = RatioAccumulator()
        self.missing = 0  # batches without per-sample terms

    def size(self, world: int) -> int:
        return _ROW * world + 1

    def update(self, args: Sequence[Any], n: int, weights: Tensor | None) -> None:
        terms = self.rows(args, n)
        if terms is None:
            self.missing += 1
            return
        self.acc.add(*terms)
        if self.record is not None:
            self.record.add(_pairs(*terms))

    def pack(self, device: torch.device, rank: int, world: int) -> Tensor:
        return torch.cat([self.acc.pack(rank, world, device),
                          torch.tensor([float(self.missing)], dtype=torch.float64, device=device)])

    def finish(self, packed: Tensor, value: float, confidence: float) -> Interval:
        if packed[-1].item() > 0:
            return NO_INTERVAL
        return _ratio_interval(RatioAccumulator.merge(packed[:-1]), value, confidence, self.transform)


def _pairs(sums: Tensor, weights: Tensor | float) -> Tensor:
    sums = sums.detach().reshape(-1).to(torch.float64)
    w = weights.detach().reshape(-1).to(sums) if isinstance(weights, Tensor) else torch.full_like(sums, weights)
    return torch.stack([sums, w], 1)


def _per_row(values: Tensor, n: int) -> tuple[Tensor, float]:
    rows = values.detach().reshape(n, -1)
    return rows.sum(1, dtype=torch.float64), float(rows.shape[1])


def _regression_rows(metric: Metric, absolute: bool) -> Callable[[Sequence[Any], int], tuple[Tensor, float] | None]:
    def rows(args: Sequence[Any], n: int) -> tuple[Tensor, float] | None:
        preds, target = args[0], args[1]
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor) or target.ndim == 0:
            return None
        diff = preds.detach().to(torch.float64) - target.detach().to(torch.float64)
        return _per_row(diff.abs() if absolute else diff * diff, target.shape[0])

    return rows


def _mean_rows(args: Sequence[Any], n: int) -> tuple[Tensor, Tensor] | None:
    value = args[0] if args else None
    if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != n:
        return None  # one value per batch: the batch, not the sample, would be the unit
    weight = args[1] if len(args) > 1 else None
    value = value.detach().to(torch.float64)
    w = torch.ones_like(value) if weight is None else torch.broadcast_to(torch.as_tensor(weight).to(value), value.shape)
    return (value * w).reshape(n, -1).sum(1), w.reshape(n, -1).sum(1)


def _perplexity_rows(metric: Any) -> Callable[[Sequence[Any], int], tuple[Tensor, Tensor] | None]:
    def rows(args: Sequence[Any], n: int) -> tuple[Tensor, Tensor] | None:
        preds, target = args[0], args[1]
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor) or preds.ndim != 3:
            return None
        log_p = preds.detach().to(torch.float64).log_softmax(-1)
        ignore = metric.ignore_index
        kept = torch.ones_like(target, dtype=torch.bool) if ignore is None else target != ignore
        picked = log_p.gather(-1, target.masked_fill(~kept, 0).unsqueeze(-1)).squeeze(-1)
        return -(picked * kept).sum(1), kept.sum(1).to(torch.float64)

    return rows


# --------------------------------------------------------------------------------------------------------------
# Proportions: Wilson from the metric's own counts


def _counts(metric: Metric) -> Callable[[], tuple[Tensor, Tensor]]:
    """Successes and trials from the metric's states, as device scalars; which states depends on the metric."""
    def states(*names: str) -> list[Tensor]:
        flush = getattr(metric, "_flush", None)
        if callable(flush):  # FastMulticlassAccuracy's pending counts
            flush()
        return [getattr(metric, name).sum() for name in names]

    if isinstance(metric, (MulticlassExactMatch, MultilabelExactMatch)):
        return lambda: tuple(states("correct", "total"))  # type: ignore[return-value]
    if isinstance(metric, BinaryStatScores) and not isinstance(metric, (BinaryAccuracy, BinaryHammingDistance)):
        if isinstance(metric, BinaryPrecision):
            pair = ("tp", "fp")
        elif isinstance(metric, BinaryRecall):
            pair = ("tp", "fn")
        elif isinstance(metric, BinarySpecificity):
            pair = ("tn", "fp")
        else:
            pair = ("tn", "fn")

        def binary() -> tuple[Tensor, Tensor]:
            k, other = states(*pair)
            return k, k + other

        return binary
    if isinstance(metric, BinaryStatScores):  # accuracy, and Hamming distance as its complement
        def binary_accuracy() -> tuple[Tensor, Tensor]:
            tp, fp, tn, fn = states("tp", "fp", "tn", "fn")
            return tp + tn, tp + fp + tn + fn

        return binary_accuracy
    other = "fp" if isinstance(metric, MulticlassPrecision) else "fn"

    def multiclass() -> tuple[Tensor, Tensor]:
        tp, rest = states("tp", other)
        return tp, tp + rest

    return multiclass


def _proportion_kind(metric: Metric) -> str | None:
    """``""`` (the value is the proportion), ``"complement"`` (one minus it) or ``None`` (not a proportion)."""
    if getattr(metric, "multidim_average", "global") != "global":
        return None
    if isinstance(metric, (MulticlassExactMatch, MultilabelExactMatch)):
        return ""
    binary = (BinaryAccuracy, BinaryPrecision, BinaryRecall, BinarySpecificity, BinaryNegativePredictiveValue)
    if isinstance(metric, binary) and not _is_f_score(metric):
        return ""
    if isinstance(metric, BinaryHammingDistance):
        return "complement"
    if isinstance(metric, MulticlassStatScores) and getattr(metric, "average", None) == "micro":
        if isinstance(metric, (MulticlassAccuracy, MulticlassRecall)) and not _is_f_score(metric):
            return ""
        if isinstance(metric, MulticlassPrecision) and metric.top_k == 1 and not _is_f_score(metric):
            return ""
        if isinstance(metric, MulticlassHammingDistance) and metric.top_k == 1:
            return "complement"
    return None


def _is_f_score(metric: object) -> bool:
    return hasattr(metric, "beta")  # F-scores subclass the stat-score classes, not precision or recall


class _Proportion(_Estimator):
    """Wilson from the metric's own counts when each sample is one trial; else the delta method over samples.

    When a sample holds several trials (pixels, tokens), its successes and trials are summed as ratio rows.
    """

    kind = "proportion"

    def __init__(self, name: str, metric: Metric, transform: str) -> None:
        super().__init__(name)
        self.metric = metric
        self.transform = transform
        self.counts = _counts(metric)
        self.rows_family = None
        try:
            if not isinstance(metric, (MulticlassExactMatch, MultilabelExactMatch)):
                self.rows_family = family_of(metric)
        except Unsupported:
            self.rows_family = None
        self.acc = RatioAccumulator()
        self.batches = 0
        self.clustered = 0  # batches whose samples held more than one trial each

    def size(self, world: int) -> int:
        return 4 + _ROW * world

    def sample_rows(self, args: Sequence[Any], n: int) -> Tensor | None:
        """Per-sample successes and trials, ``(n, 2)``: what the metric counts for each sample."""
        if isinstance(self.metric, (MulticlassExactMatch, MultilabelExactMatch)):
            return _exact_match_rows(self.metric, args, n)
        if not isinstance(self.rows_family, _Pairs):
            return None
        cell, valid, _ = self.rows_family._pair(args)
        c = self.rows_family.classes
        target, pred = cell // c, cell % c
        m = self.metric
        if isinstance(m, (MulticlassStatScores, BinaryAccuracy, BinaryHammingDistance)):
            k, trials = (target == pred) & valid, valid  # micro: every element counted once, right or wrong
        elif isinstance(m, BinaryPrecision):
            k, trials = (pred == 1) & (target == 1) & valid, (pred == 1) & valid
        elif isinstance(m, BinaryRecall):
            k, trials = (pred == 1) & (target == 1) & valid, (target == 1) & valid
        elif isinstance(m, BinarySpecificity):
            k, trials = (pred == 0) & (target == 0) & valid, (target == 0) & valid
        else:  # negative predictive value
            k, trials = (pred == 0) & (target == 0) & valid, (pred == 0) & valid
        return torch.stack([k.sum(1, dtype=torch.float64), trials.sum(1, dtype=torch.float64)], 1)

    def update(self, args: Sequence[Any], n: int, weights: Tensor | None) -> None:
        self.batches += 1
        target = args[1] if len(args) > 1 else None
        # Exact match is one trial per sample whatever its shape; the others count each label of a sample.
        several = isinstance(target, Tensor) and target.numel() > n and self.rows_family is not None
        if several:
            self.clustered += 1
        if several or self.record is not None:
            rows = self.sample_rows(args, n)
            if rows is None:
                return
            if several:
                self.acc.add(rows[:, 0], rows[:, 1])
            if self.record is not None:
                self.record.add(rows)

    def pack(self, device: torch.device, rank: int, world: int) -> Tensor:
        k, trials = self.counts()
        head = torch.stack([k.to(device=device, dtype=torch.float64), trials.to(device=device, dtype=torch.float64)])
        tail = torch.tensor([float(self.clustered), float(self.batches)], dtype=torch.float64, device=device)
        return torch.cat([head, tail, self.acc.pack(rank, world, device)])

    def finish(self, packed: Tensor, value: float, confidence: float) -> Interval:
        k, trials, clustered, batches = packed[:4].tolist()
        if clustered == 0:
            low, high = wilson(k, trials, confidence)
            return Interval(1.0 - high, 1.0 - low) if self.transform == "complement" else Interval(low, high)
        if clustered == batches:
            return _ratio_interval(RatioAccumulator.merge(packed[4:]), value, confidence, self.transform)
        return NO_INTERVAL


def _exact_match_rows(metric: Any, args: Sequence[Any], n: int) -> Tensor | None:
    preds, target = args[0], args[1]
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        return None
    if isinstance(metric, MulticlassExactMatch):
        labels = preds.argmax(1) if preds.is_floating_point() and preds.ndim == target.ndim + 1 else preds
    else:
        p = preds
        if p.is_floating_point():
            inside = ((p >= 0) & (p <= 1)).all()
            p = torch.where(inside, p, p.sigmoid()) > metric.threshold
        labels = p.long()
    labels, t = labels.reshape(n, -1), target.reshape(n, -1)
    ignore = metric.ignore_index
    match = labels == t if ignore is None else (labels == t) | (t == ignore)
    correct = match.all(1).to(torch.float64)
    return torch.stack([correct, torch.ones_like(correct)], 1)


class _Classwise(_Estimator):
    """``ClasswiseWrapper`` around a per-class recall, precision, specificity or accuracy: Wilson per class.

    Each sample is one trial of its target's class (recall, accuracy) or of its predicted class (precision), so
    every class's proportion is binomial given its trials; the intervals take the wrapper's own names (``recall_cat``).
    """

    kind = "proportion"

    def __init__(self, name: str, wrapper: Any) -> None:
        super().__init__(name)
        self.wrapper = wrapper
        self.metric: Any = wrapper.metric
        self.classes = int(getattr(self.metric, "num_classes", None) or self.metric.num_labels)
        self.batches = 0
        self.several = 0

    @staticmethod
    def supports(wrapper: Any) -> bool:
        inner = getattr(wrapper, "metric", None)
        if getattr(inner, "average", "") not in (None, "none") or _is_f_score(inner):
            return False
        if getattr(inner, "multidim_average", "global") != "global":
            return False
        per_class = (MulticlassRecall, MulticlassAccuracy, MulticlassSpecificity, MultilabelRecall,
                     MultilabelPrecision, MultilabelSpecificity)
        return isinstance(inner, per_class) or (isinstance(inner, MulticlassPrecision) and inner.top_k == 1)

    def size(self, world: int) -> int:
        return 4 * self.classes + 2

    def update(self, args: Sequence[Any], n: int, weights: Tensor | None) -> None:
        self.batches += 1
        target = args[1] if len(args) > 1 else None
        per_sample = n * (self.classes if isinstance(self.metric, MultilabelStatScores) else 1)
        if isinstance(target, Tensor) and target.numel() > per_sample:
            self.several += 1

    def pack(self, device: torch.device, rank: int, world: int) -> Tensor:
        states = [getattr(self.metric, s).reshape(-1).to(device=device, dtype=torch.float64)
                  for s in ("tp", "fp", "tn", "fn")]
        counts = torch.tensor([float(self.several), float(self.batches)], dtype=torch.float64, device=device)
        return torch.cat([*states, counts])

    def clustered(self, packed: Tensor) -> bool:
        return bool(packed[-2].item() > 0)

    def per_class(self, packed: Tensor, confidence: float) -> dict[str, Interval]:
        if self.clustered(packed):
            return {}
        c = self.classes
        tp, fp, tn, fn = (packed[i * c : (i + 1) * c] for i in range(4))
        m = self.metric
        if isinstance(m, (MulticlassPrecision, MultilabelPrecision)):
            k, n = tp, tp + fp
        elif isinstance(m, (MulticlassSpecificity, MultilabelSpecificity)):
            k, n = tn, tn + fp
        else:
            k, n = tp, tp + fn
        bounds = [wilson(float(a), float(b), confidence) for a, b in zip(k.tolist(), n.tolist(), strict=True)]
        lows = self.wrapper._convert_output(torch.tensor([b.low for b in bounds], dtype=torch.float64))
        highs = self.wrapper._convert_output(torch.tensor([b.high for b in bounds], dtype=torch.float64))
        return {key: Interval(float(lows[key]), float(highs[key])) for key in lows}


# --------------------------------------------------------------------------------------------------------------
# The bootstrap


class _Bootstrap(_Estimator):
    kind = "bootstrap"

    def __init__(self, name: str, replicated: Replicated) -> None:
        super().__init__(name)
        self.replicated = replicated
        self.failed: str | None = None
        self.replicate_values: Tensor | None = None

    def size(self, world: int) -> int:
        return self.replicated.size + 1

    def update(self, args: Sequence[Any], n: int, weights: Tensor | None) -> None:
        if self.failed is not None:
            return
        try:
            assert weights is not None
            self.replicated.update(args, None, weights)
        except Unsupported as err:
            self.failed = str(err)

    def pack(self, device: torch.device, rank: int, world: int) -> Tensor:
        flag = torch.tensor([1.0 if self.failed else 0.0], dtype=torch.float64, device=device)
        return torch.cat([self.replicated.pack(device), flag])

    def finish(self, packed: Tensor, value: float, confidence: float) -> Interval:
        if packed[-1].item() > 0:
            return NO_INTERVAL
        self.replicate_values = self.replicated.values(packed[:-1])
        return percentile(self.replicate_values, confidence)


# --------------------------------------------------------------------------------------------------------------


class EvaluationIntervals:
    """The intervals of one dataloader's evaluation: built at its start, updated per batch, finished at its end.

    Args:
        spec: the confidence level, bootstrap replicates and seed, and whether to keep a per-sample record.
        metrics: ``(name, metric)`` for each torchmetrics metric of the evaluation.
        criterion: the torch loss module whose terms the library reads (``None``: the loss comes from your own
            ``compute_loss`` or criterion, and has an interval when it returns one value per sample).
        loss: whether a loss is computed at all; ``"sum"`` when its epoch value is a sum (which has no interval).
        label: the logged name of a value, for the warnings (``"acc"`` -> ``"val/acc"``).
        rank: this process's index among ``world`` data-parallel processes: sample ``k`` of this process has
            index ``rank + k * world`` (``DistributedSampler``'s layout).
    """

    def __init__(
        self,
        spec: Intervals,
        metrics: Sequence[tuple[str, Metric]],
        *,
        criterion: object = None,
        loss: bool | str = True,
        label: Callable[[str], str] = str,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.spec = spec
        self.rank, self.world = rank, world
        self.label = label
        self.warnings: list[str] = []
        self.estimators: list[_Estimator] = []
        self._weights = PoissonWeights(spec.replicates, spec.seed)
        self._seen = 0
        self._ids: _Rows | None = _Rows(1, torch.int64) if spec.record else None
        self._fingerprints: _Rows | None = _Rows(1) if spec.record else None
        self._loss: _Ratio | None = None
        if loss == "sum":
            self.warnings.append(
                f"No interval for `{label('loss')}`: with `reduction='sum'` its value is a sum over the set, which "
                "grows with the set's size and estimates no population value. Use `reduction='mean'` for an interval."
            )
        elif loss:
            self._loss = self._loss_estimator(criterion)
            self.estimators.append(self._loss)
        self._by_metric: list[tuple[int, _Estimator]] = []  # the position of each one's metric in `metrics`
        for i, (name, metric) in enumerate(metrics):
            estimator = self._metric_estimator(name, metric)
            if estimator is not None:
                self.estimators.append(estimator)
                self._by_metric.append((i, estimator))
        if spec.record:
            for estimator in self.estimators:
                if estimator.kind != "bootstrap":
                    estimator.record = _Rows(2)
        self._bootstraps = any(isinstance(e, _Bootstrap) for e in self.estimators)

    def _loss_estimator(self, criterion: object) -> _Ratio:
        if criterion is not None and known(criterion):
            assert isinstance(criterion, nn.Module)
            return _Ratio("loss", _criterion_rows(criterion))
        return _Ratio("loss", _unused, why_not=(
            f"No interval for `{self.label('loss')}`: the loss came as one value per batch (a mean, `LossMean` or "
            "`LossTerms(sum, weight)` of the batch), and the interval needs each sample's: return one loss per "
            "sample (`reduction='none'`), or `LossTerms` with one sum and weight per row (a sequence's summed token "
            "losses and its tokens), from your `compute_loss` or criterion."
        ))

    def _metric_estimator(self, name: str, metric: Metric) -> _Estimator | None:
        key = self.label(name)
        if isinstance(metric, ClasswiseWrapper):
            if _Classwise.supports(metric):
                return _Classwise(name, metric)
            self.warnings.append(f"No interval for `{key}`: ClasswiseWrapper gets intervals around a per-class "
                                 "recall, precision, specificity or accuracy only; its values are logged without one.")
            return None
        kind = _proportion_kind(metric)
        if kind is not None:
            return _Proportion(name, metric, kind)
        if isinstance(metric, (MeanSquaredError, MeanAbsoluteError)):
            if getattr(metric, "num_outputs", 1) != 1:
                self.warnings.append(f"No interval for `{key}`: {type(metric).__name__}(num_outputs="
                                     f"{metric.num_outputs}) is not one value.")
                return None
            squared = isinstance(metric, MeanSquaredError)
            transform = "sqrt" if squared and not metric.squared else ""
            return _Ratio(name, _regression_rows(metric, absolute=not squared), transform, why_not=(
                f"No interval for `{key}`: {type(metric).__name__} got inputs without a batch dimension."))
        if isinstance(metric, Perplexity):
            return _Ratio(name, _perplexity_rows(metric), "exp", why_not=(
                f"No interval for `{key}`: Perplexity got inputs other than logits (N, T, V) and targets (N, T)."))
        if isinstance(metric, MeanMetric):
            return _Ratio(name, _mean_rows, why_not=(
                f"No interval for `{key}`: MeanMetric got one value per batch; the interval needs one per sample "
                "(update it with a tensor whose first dimension is the batch)."))
        try:
            family = family_of(metric)
        except Unsupported as err:
            self.warnings.append(f"No interval for `{key}`: {err}; its value is logged without one.")
            return None
        return _Bootstrap(name, Replicated(metric, family, self._weights))

    @property
    def names(self) -> list[str]:
        """The values that get an interval (``"loss"`` and metric names)."""
        return [e.name for e in self.estimators]

    def update(self, outputs: Any, target: Any, inputs: Sequence[Sequence[Any]], batch: BatchLoss | None,
               n: int) -> None:
        """Add a batch of ``n`` samples; no host-device sync.

        ``outputs`` and ``target`` are the model's (for the loss), ``inputs`` each metric's ``update`` arguments (in
        the order of the metrics given), ``batch`` the batch's loss terms.
        """
        start = self._seen
        self._seen += n
        weights = None
        if self._bootstraps:  # drawn once per batch, for every bootstrap metric
            weights = self._weights.at(start, n, self.world, self.rank, _device_of(inputs, outputs, target))
        if self._loss is not None:
            if self._loss.rows is _unused:
                per_sample = batch.per_sample if batch is not None else None
                terms: tuple[Tensor, Tensor | float] | None = None
                if isinstance(per_sample, LossTerms):  # per-row terms of your own (a sequence's tokens)
                    terms = (per_sample.sum, per_sample.weight)
                elif isinstance(per_sample, Tensor) and per_sample.ndim and per_sample.shape[0] == n:
                    terms = _per_row(per_sample, n)
                if terms is None:
                    self._loss.missing += 1
                else:
                    self._loss.acc.add(*terms)
                    if self._loss.record is not None:
                        self._loss.record.add(_pairs(*terms))
            else:
                self._loss.update((outputs, target), n, weights)
        for i, estimator in self._by_metric:
            estimator.update(inputs[i], n, weights)
        if self._ids is not None and self._fingerprints is not None:
            device = _device_of(inputs, outputs, target)
            ids = torch.arange(start, start + n, dtype=torch.int64, device=device) * self.world + self.rank
            self._ids.add(ids)
            found = fingerprints(target, n)
            self._fingerprints.add(found if found is not None else torch.full((n,), math.nan, device=device))

    def loss_size(self) -> int:
        """The length of the loss's part at the start of ``pack()`` (0 without a loss interval)."""
        return self._loss.size(self.world) if self._loss is not None else 0

    def size(self) -> int:
        """The length of ``pack()``, the same on every process."""
        return sum(e.size(self.world) for e in self.estimators)

    def pack(self, device: torch.device) -> Tensor:
        """Every value's state as one float64 vector for one ``all_reduce(SUM)`` across processes; no sync."""
        if not self.estimators:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat([e.pack(device, self.rank, self.world) for e in self.estimators])

    def finish(self, packed: Tensor, values: Mapping[str, float]) -> dict[str, Interval]:
        """The interval of each value from the reduced ``pack()``; reasons for missing ones go to ``warnings``.

        ``values`` are the evaluation's values by name (``"loss"``, metric names); a ``"ppl"`` that is the exp of
        the loss gets the exp of the loss's interval.
        """
        packed = packed.detach().to(device="cpu", dtype=torch.float64)
        out: dict[str, Interval] = {}
        offset = 0
        for estimator in self.estimators:
            size = estimator.size(self.world)
            part = packed[offset : offset + size]
            offset += size
            if isinstance(estimator, _Classwise):  # one interval per class, under the wrapper's own names
                out.update(estimator.per_class(part, self.spec.confidence))
                if estimator.clustered(part):
                    self.warnings.append(f"No interval for `{self.label(estimator.name)}`: its samples hold several "
                                         "labels each (pixels, positions), which its per-class counts cannot tell "
                                         "apart from independent samples.")
                continue
            value = values.get(estimator.name, math.nan)
            interval = estimator.finish(part, value, self.spec.confidence)
            out[estimator.name] = interval
            if math.isnan(interval.low) and math.isfinite(value):
                reason = self._why_not(estimator, part)
                if reason:
                    self.warnings.append(reason)
        loss, ppl = out.get("loss"), values.get("ppl")
        if (loss is not None and ppl is not None and "ppl" not in out and "loss" in values and ppl > 0
                and abs(math.log(ppl) - values["loss"]) <= 1e-6 * max(1.0, abs(values["loss"]))):
            out["ppl"] = Interval(math.exp(loss.low), math.exp(loss.high))
        self._record_values = dict(values)
        return out

    def _why_not(self, estimator: _Estimator, part: Tensor) -> str:
        key = self.label(estimator.name)
        if isinstance(estimator, _Ratio) and part[-1].item() > 0:
            return estimator.why_not
        if isinstance(estimator, _Bootstrap) and estimator.failed:
            return f"No interval for `{key}`: {estimator.failed}; its value is logged without one."
        if isinstance(estimator, _Proportion):
            clustered, batches = part[2:4].tolist()
            if 0 < clustered < batches:
                return (f"No interval for `{key}`: some batches held one label per sample and others several; the "
                        "interval needs one kind throughout.")
        return ""

    def record(self) -> SampleRecord | None:
        """This process's ``SampleRecord`` of the evaluation (after ``finish``), or ``None`` without ``record``."""
        if self._ids is None or self._fingerprints is None:
            return None
        values = getattr(self, "_record_values", {})
        rows: dict[str, Tensor] = {}
        kinds: dict[str, str] = {}
        transforms: dict[str, str] = {}
        replicates: dict[str, Tensor] = {}
        for e in self.estimators:
            kinds[e.name] = e.kind
            if e.transform:
                transforms[e.name] = e.transform
            if isinstance(e, _Bootstrap):
                if e.replicate_values is not None:
                    replicates[e.name] = e.replicate_values.cpu()
            elif e.record is not None and e.record.filled == self._ids.filled:
                rows[e.name] = e.record.take()
        return SampleRecord(
            ids=self._ids.take().reshape(-1), fingerprint=self._fingerprints.take().reshape(-1), rows=rows,
            kinds={k: v for k, v in kinds.items() if k in rows or k in replicates}, transforms=transforms,
            replicates=replicates, values={k: float(v) for k, v in values.items()}, seed=self.spec.seed,
            confidence=self.spec.confidence,
        )


def _criterion_rows(criterion: nn.Module) -> Callable[[Sequence[Any], int], tuple[Tensor, Tensor] | None]:
    """Per-sample ``(sum, weight)`` of a torch criterion: its ``reduction="none"`` call, on the outputs it got.

    Cross-entropy and NLL with class indices and no class weights (the common case) take a short path: the
    unreduced loss (``F.cross_entropy``/``F.nll_loss`` with the criterion's settings, so the user's hooks on the
    criterion run only for its own call) is each sample's sum, and whether its target is ignored its weight.
    Everything else goes through ``sample_terms``, in float32 for bfloat16 outputs.
    """
    plan = loss_plan(criterion)
    short = plan is not None and plan.class_index and not plan.linear
    cross_entropy = isinstance(criterion, nn.CrossEntropyLoss)

    def rows(args: Sequence[Any], n: int) -> tuple[Tensor, Tensor] | None:
        outputs, target = args
        if not isinstance(outputs, Tensor) or not isinstance(target, Tensor):
            return None
        if outputs.dtype in _LOW_PRECISION:  # bf16-true: the terms in float32, as the epoch's numerator is
            with torch.autocast(outputs.device.type, enabled=False):
                terms = sample_terms(criterion, outputs, target, torch.float32)
        elif short and not target.is_floating_point() and criterion._buffers.get("weight") is None:
            ignore = getattr(criterion, "ignore_index", -100)
            ignore = -100 if ignore is None else ignore
            if cross_entropy:  # 0 where the target is ignored
                losses = F.cross_entropy(outputs, target, ignore_index=ignore, reduction="none",
                                         label_smoothing=float(getattr(criterion, "label_smoothing", 0.0)))
            else:
                losses = F.nll_loss(outputs, target, ignore_index=ignore, reduction="none")
            kept = target != ignore
            if target.ndim == 1:
                return losses, kept
            return losses.reshape(n, -1).sum(1, dtype=torch.float64), kept.reshape(n, -1).sum(1, dtype=torch.float64)
        else:
            terms = sample_terms(criterion, outputs, target)
        assert isinstance(terms.weight, Tensor)
        return terms.sum, terms.weight

    return rows


def _unused(args: Sequence[Any], n: int) -> None:
    """The loss rows of a loss the library cannot see into: they come with the batch (``BatchLoss.per_sample``)."""
    return None


def _device_of(inputs: Sequence[Sequence[Any]], outputs: Any, target: Any) -> torch.device:
    for obj in (target, outputs, *(a for args in inputs for a in args)):
        if isinstance(obj, Tensor):
            return obj.device
    return torch.device("cpu")
