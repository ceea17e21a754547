"""Device-side accumulators for exact epoch values: no host-device synchronization per batch.

Each batch appends one device scalar, folded into running sums every few hundred batches; ``summary()`` gives one
tensor ready for one ``all_reduce(SUM)`` across processes.

Example:
    >>> import torch
    >>> acc = LossAccumulator()
    >>> acc.update(torch.tensor(1.0), 3)  # a batch of 3 with mean loss 1
    >>> acc.update(torch.tensor(4.0), 1)  # a last batch of 1 with loss 4
    >>> total, count, nonfinite, batches = acc.summary().tolist()
    >>> total / count  # (3 * 1 + 1 * 4) / 4, not (1 + 4) / 2
    1.75

"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FOLD_EVERY", "LossAccumulator", "TargetRange", "sum_dtype"]

#: Device scalars kept per accumulator before they are folded into running sums (bounds memory, amortizes cost).
FOLD_EVERY = 256


def sum_dtype(device: torch.device) -> torch.dtype:
    """Dtype for sums of losses and metric values on ``device``: float64 (exact epoch means), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class LossAccumulator:
    """Exact per-sample mean of a loss over an epoch, kept on the loss's device.

    ``update(loss, n)`` takes the batch mean (a 0-dim tensor) and the number of samples, or a per-sample loss
    (a tensor whose first dimension is ``n``; further dimensions are averaged per sample). Each call costs one
    small device operation and never synchronizes; ``summary()`` gives ``[sum, count, non-finite batches,
    batches]`` as one tensor, ready for one ``all_reduce(SUM)`` across processes.

    Args:
        reduction: ``"mean"`` (a 0-dim loss is the batch mean) or ``"sum"`` (a 0-dim loss is the batch sum).

    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Expected argument `reduction` to be 'mean' or 'sum' but got {reduction!r}.")
        self.reduction = reduction
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.count = 0
        self.batches = 0
        self._parts: list[Tensor] = []  # batch sums
        self._means: list[Tensor] = []  # batch means, all of batches of `_weight` samples
        self._weight = 0
        self._total: Tensor | None = None
        self._nonfinite: Tensor | None = None

    def update(self, loss: Tensor, n: int) -> None:
        """Add one batch: its loss (see the class docstring) and its number of samples ``n`` (a Python int)."""
        loss = loss.detach()
        if loss.ndim == 0:
            if self.reduction == "sum":
                part = loss
            else:  # batch means of equal-sized batches are kept as they are and weighted once, when folded
                if n != self._weight:
                    self._fold()
                    self._weight = n
                self._means.append(loss)
                self.count += n
                self.batches += 1
                if len(self._means) >= FOLD_EVERY:
                    self._fold()
                return
        else:
            if loss.shape[0] != n:
                raise ValueError(
                    f"Expected a per-sample loss of first dimension {n} (the batch size) but got shape "
                    f"{tuple(loss.shape)}. Return the batch mean (a 0-dim tensor) or one loss per sample."
                )
            part = (loss.reshape(n, -1).mean(1) if loss.ndim > 1 else loss).sum()
        self._parts.append(part)
        self.count += n
        self.batches += 1
        if len(self._parts) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        for values, weight in ((self._parts, 1), (self._means, self._weight)):
            if not values:
                continue
            chunk = torch.stack(values)
            values.clear()
            total = chunk.sum(dtype=sum_dtype(chunk.device)) * weight
            nonfinite = torch.isfinite(chunk).logical_not().sum()
            self._total = total if self._total is None else self._total + total
            self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite

    def summary(self, device: torch.device | None = None) -> Tensor:
        """``[sum, count, non-finite batches, batches]`` as one tensor (float64 except on MPS); no sync."""
        self._fold()
        if self._total is None or self._nonfinite is None:
            dev = device if device is not None else torch.device("cpu")
            return torch.zeros(4, dtype=sum_dtype(dev), device=dev)
        total = self._total
        return torch.stack(
            [total, total.new_tensor(self.count), self._nonfinite.to(total.dtype), total.new_tensor(self.batches)]
        )

    def running_mean(self) -> Tensor | None:
        """Return the mean so far as a device scalar (``None`` before the first batch); reading it is one sync."""
        self._fold()
        if self._total is None or self.count == 0:
            return None
        return self._total / self.count


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
