"""Device-side accumulators for exact epoch values: no host-device synchronization per batch.

Each batch copies its device scalars into preallocated slots (``metrics.slots``), folded into running sums every few
hundred batches; ``summary()`` gives one tensor ready for one ``all_reduce(SUM)`` across processes.

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
from lightning_validate.metrics.slots import FOLD_EVERY, Slots, sum_dtype

__all__ = ["FOLD_EVERY", "LossAccumulator", "TargetRange", "sum_dtype"]


class LossAccumulator:
    """The loss of an epoch as ``sum / weight`` (``reduction="sum"``: the sum), kept on the loss's device.

    ``add(batch)`` takes a ``BatchLoss`` (``metrics.loss_terms``): a batch mean with its weight, or a numerator
    with its weight. ``update(loss, n)`` takes what a criterion the library cannot see into returned (a batch
    mean, a per-sample loss or ``LossTerms``; see ``value_terms``). Each call copies device scalars into slots and
    never synchronizes; ``summary()`` gives ``[sum, weight, non-finite batches, batches]`` as one tensor, ready for one
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
        self._count: float = 0  # weights known on the host (sample counts from shapes)
        self._means = Slots(torch.float64)  # batch means, all with the host weight `_weight`
        self._weight: float = 0
        self._weighted = Slots(torch.float64)  # batch means with device weights (`_weighted_by`)
        self._weighted_by = Slots(torch.float64)
        self._sums = Slots(torch.float64)  # numerators
        self._sum_weights = Slots(torch.float64)  # device weights of numerators (host ones are in `_count`)
        self._total: Tensor | None = None
        self._weight_total: Tensor | None = None
        self._nonfinite: Tensor | None = None

    def update(self, loss: object, n: int) -> None:
        """Add one batch of ``n`` samples from what a criterion returned (see ``value_terms``)."""
        self.add(value_terms(loss, n, is_sum=self.reduction == "sum"))

    def add(self, batch: BatchLoss) -> None:
        """Add one batch's value and weight: one or two small copies on the device, nothing read back."""
        value, weight = batch.value, batch.weight
        if batch.is_sum:
            slots = self._sums
            slots.add(value)
            if isinstance(weight, Tensor):
                self._sum_weights.add(weight)
            else:
                self._count += weight
        elif isinstance(weight, Tensor):
            slots = self._weighted
            slots.add(value)
            self._weighted_by.add(weight)
        elif weight:  # a mean over no element (nan) adds nothing
            if weight != self._weight:  # equal weights (all batches but the last) are applied once, when folded
                self._fold()
                self._weight = weight
            slots = self._means
            slots.add(value)
            self._count += weight
        else:
            self.batches += 1
            return
        self.batches += 1
        if slots.full:
            self._fold()

    def _fold(self) -> None:
        totals: list[Tensor] = []
        weights: list[Tensor] = []
        bad: list[Tensor] = []
        means = self._means.take()
        if means is not None:
            totals.append(means.sum() * self._weight)
            bad.append(torch.isfinite(means).logical_not().sum())
        weighted, by = self._weighted.take(), self._weighted_by.take()
        if weighted is not None and by is not None:
            # A batch with nothing counted has mean nan and weight 0: it adds 0 (where, not a branch on values).
            parts = torch.where(by != 0, weighted * by, 0.0)
            totals.append(parts.sum())
            weights.append(by.sum())
            bad.append(torch.isfinite(parts).logical_not().sum())
        sums = self._sums.take()
        if sums is not None:
            totals.append(sums.sum())
            bad.append(torch.isfinite(sums).logical_not().sum())
        sum_weights = self._sum_weights.take()
        if sum_weights is not None:
            weights.append(sum_weights.sum())
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
        self._lows = Slots(torch.int64)  # per-batch smallest targets
        self._highs = Slots(torch.int64)  # per-batch largest targets
        self._bad: Tensor | None = None
        self._extremes: Tensor | None = None

    def update(self, target: Tensor) -> None:
        """Record one batch of targets (ignored unless an integer tensor with at least one element)."""
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.numel() == 0:
            return
        lo, hi = torch.aminmax(target)
        self._lows.add(lo)
        self._highs.add(hi)
        if self._highs.full:
            self._fold()

    def _fold(self) -> None:
        lo, hi = self._lows.take(), self._highs.take()
        if lo is None or hi is None:
            return
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
