"""Device-side accumulators for exact epoch values: no host-device synchronization per batch.

Each batch appends device scalars, folded into running sums every few hundred batches; ``summary()`` gives one
tensor ready for one ``all_reduce(SUM)`` across processes.

Example:
    >>> import torch
    >>> acc = LossAccumulator()
    >>> acc.update(torch.tensor(1.0), 3)  # a batch of 3 with mean loss 1
    >>> acc.update(torch.tensor(4.0), 1)  # a last batch of 1 with loss 4
    >>> total, weight, nonfinite, batches = acc.summary().tolist()
    >>> total / weight  # (3 * 1 + 1 * 4) / 4, not (1 + 4) / 2
    1.75

"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_validate.metrics.loss_terms import BatchLoss, value_terms

__all__ = ["FOLD_EVERY", "LossAccumulator", "TargetRange", "sum_dtype"]

#: Device scalars kept per accumulator before they are folded into running sums (bounds memory, amortizes cost).
FOLD_EVERY = 256


def sum_dtype(device: torch.device) -> torch.dtype:
    """Dtype for sums of losses and metric values on ``device``: float64 (exact epoch means), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class LossAccumulator:
    """The loss of an epoch as ``sum / weight`` (``reduction="sum"``: the sum), kept on the loss's device.

    ``add(batch)`` takes a ``BatchLoss`` (``metrics.loss_terms``): a batch mean with its weight, or a numerator
    with its weight. ``update(loss, n)`` takes what a criterion the library cannot see into returned (a batch
    mean, a per-sample loss or ``LossTerms``; see ``value_terms``). Each call appends device scalars and never
    synchronizes; ``summary()`` gives ``[sum, weight, non-finite batches, batches]`` as one tensor, ready for one
    ``all_reduce(SUM)`` across processes. A batch of weight 0 (all targets ignored) adds nothing, not nan.

    Args:
        reduction: ``"mean"`` (the epoch value is ``sum / weight``) or ``"sum"`` (the epoch value is ``sum``).

    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Expected argument `reduction` to be 'mean' or 'sum' but got {reduction!r}.")
        self.reduction = reduction
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.batches = 0
        self._pending = 0  # batches since the last fold
        self._count: float = 0  # weights known on the host (sample counts from shapes)
        self._means: list[Tensor] = []  # batch means, all with the host weight `_weight`
        self._weight: float = 0
        self._weighted: list[Tensor] = []  # batch means with device weights (`_weighted_by`)
        self._weighted_by: list[Tensor] = []
        self._sums: list[Tensor] = []  # numerators
        self._sum_weights: list[Tensor] = []  # device weights of numerators (host ones are in `_count`)
        self._total: Tensor | None = None
        self._weight_total: Tensor | None = None
        self._nonfinite: Tensor | None = None

    def update(self, loss: object, n: int) -> None:
        """Add one batch of ``n`` samples from what a criterion returned (see ``value_terms``)."""
        self.add(value_terms(loss, n, is_sum=self.reduction == "sum"))

    def add(self, batch: BatchLoss) -> None:
        """Add one batch's value and weight (no device work)."""
        value, weight = batch.value, batch.weight
        if value.requires_grad:  # kept until the next fold: without the graph (checked first: detach costs more)
            value = value.detach()
        if isinstance(weight, Tensor) and weight.requires_grad:
            weight = weight.detach()
        if batch.is_sum:
            self._sums.append(value)
            if isinstance(weight, Tensor):
                self._sum_weights.append(weight)
            else:
                self._count += weight
        elif isinstance(weight, Tensor):
            self._weighted.append(value)
            self._weighted_by.append(weight)
        elif weight:  # a mean over no element (nan) adds nothing
            if weight != self._weight:  # equal weights (all batches but the last) are applied once, when folded
                self._fold()
                self._weight = weight
            self._means.append(value)
            self._count += weight
        self.batches += 1
        self._pending += 1
        if self._pending >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        self._pending = 0
        totals: list[Tensor] = []
        weights: list[Tensor] = []
        bad: list[Tensor] = []
        if self._means:
            chunk = torch.stack(self._means)
            dtype = sum_dtype(chunk.device)
            totals.append(chunk.sum(dtype=dtype) * self._weight)
            bad.append(torch.isfinite(chunk).logical_not().sum())
        if self._weighted:
            means, by = torch.stack(self._weighted), torch.stack(self._weighted_by)
            dtype = sum_dtype(means.device)
            by = by.to(dtype)
            # A batch with nothing counted has mean nan and weight 0: it adds 0 (where, not a branch on values).
            parts = torch.where(by != 0, means.to(dtype) * by, 0.0)
            totals.append(parts.sum())
            weights.append(by.sum())
            bad.append(torch.isfinite(parts).logical_not().sum())
        if self._sums:
            chunk = torch.stack(self._sums)
            dtype = sum_dtype(chunk.device)
            totals.append(chunk.sum(dtype=dtype))
            bad.append(torch.isfinite(chunk).logical_not().sum())
        if self._sum_weights:
            weights.append(torch.stack(self._sum_weights).sum(dtype=sum_dtype(self._sum_weights[0].device)))
        self._means, self._weighted, self._weighted_by, self._sums, self._sum_weights = [], [], [], [], []
        for total in totals:
            self._total = total if self._total is None else self._total + total
        for weight in weights:
            self._weight_total = weight if self._weight_total is None else self._weight_total + weight
        for count in bad:
            self._nonfinite = count if self._nonfinite is None else self._nonfinite + count

    def summary(self, device: torch.device | None = None) -> Tensor:
        """``[sum, weight, non-finite batches, batches]`` as one tensor (float64 except on MPS); no sync."""
        self._fold()
        if self._total is None or self._nonfinite is None:
            dev = device if device is not None else torch.device("cpu")
            summary = torch.zeros(4, dtype=sum_dtype(dev), device=dev)
            summary[1], summary[3] = float(self._count), float(self.batches)  # batches of nothing (weight 0)
            return summary
        total = self._total
        weight = total.new_tensor(float(self._count))
        if self._weight_total is not None:
            weight = weight + self._weight_total.to(total.dtype)
        return torch.stack(
            [total, weight, self._nonfinite.to(total.dtype), total.new_tensor(float(self.batches))]
        )

    def value(self, total: float, weight: float) -> float:
        """The epoch value from ``summary()``'s first two entries (after any reduction across processes)."""
        if self.reduction == "sum":
            return total
        return total / weight if weight else float("nan")

    def running_value(self) -> Tensor | None:
        """The epoch value so far as a device scalar (``None`` before the first batch); reading it is one sync."""
        self._fold()
        if self._total is None:
            return None
        if self.reduction == "sum":
            return self._total
        weight = self._total.new_tensor(float(self._count))
        if self._weight_total is not None:
            weight = weight + self._weight_total.to(self._total.dtype)
        return self._total / weight


class TargetRange:
    """Count batches whose integer targets fall outside ``[0, num_classes)``, without a sync per batch.

    Each batch costs one ``torch.aminmax``; ``summary()`` gives ``([bad batches], [-smallest, largest])``: the
    first for an ``all_reduce(SUM)``, the second for an ``all_reduce(MAX)``. A negative ``ignore_index`` (as in
    ``CrossEntropyLoss(ignore_index=-100)``) is not counted when it is a batch's smallest target.

    Args:
        num_classes: the number of classes.
        ignore_index: a target value that is not a class but is allowed.

    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        self._lows: list[Tensor] = []  # per-batch smallest targets
        self._parts: list[Tensor] = []  # per-batch largest targets
        self._bad: Tensor | None = None
        self._extremes: Tensor | None = None

    def update(self, target: Tensor) -> None:
        """Record one batch of targets (ignored unless an integer tensor with at least one element)."""
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.numel() == 0:
            return
        lo, hi = torch.aminmax(target)
        self._lows.append(lo)
        self._parts.append(hi)
        if len(self._parts) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        if not self._parts:
            return
        lo, hi = torch.stack(self._lows).to(torch.int64), torch.stack(self._parts).to(torch.int64)
        self._lows, self._parts = [], []
        low_bad = lo < 0
        if self.ignore_index is not None and self.ignore_index < 0:
            low_bad &= lo != self.ignore_index
        bad = (low_bad | (hi >= self.num_classes)).sum()
        extremes = torch.stack([(-lo).max(), hi.max()])
        self._bad = bad if self._bad is None else self._bad + bad
        self._extremes = extremes if self._extremes is None else torch.maximum(self._extremes, extremes)

    def summary(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``([bad batches], [-smallest target, largest target])`` as int64 tensors on ``device``; no sync."""
        self._fold()
        if self._bad is None or self._extremes is None:
            return (
                torch.zeros(1, dtype=torch.int64, device=device),
                torch.full((2,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device),
            )
        return self._bad.reshape(1), self._extremes
