"""The standard error of a ratio of sums, ``R = sum(L_i) / sum(T_i)``, with the row ``i`` (a sample) as the unit.

A mean loss, MAE, MSE, a token-weighted language-model loss and a pixel accuracy are all such ratios: ``L_i`` is
what row ``i`` of a batch adds to the numerator (its summed loss, squared error, correct pixels) and ``T_i`` what
it adds to the denominator (1, its element count, its tokens not ignored). The samples of a validation set are
the independent draws, not the tokens or pixels inside them: two tokens of one hard sequence are both hard. So the
delta method (the ratio estimator of survey sampling) treats rows as the units::

    Var(R) ~= sum_i (L_i - R T_i)^2 / (n (n - 1) Tbar^2),    Tbar = sum_i T_i / n

With ``T_i = 1`` this is exactly the variance ``s^2 / n`` of a mean. Treating the tokens as independent instead
underestimates the error as soon as sequences differ in difficulty (about 5x in ``docs/uncertainty.md``).

``RatioAccumulator`` keeps the sums on the device, shifted by a value ``K`` taken from its first batch (as a device
scalar: nothing is read back) so that the residual sum of squares does not cancel, and packs them for one
``all_reduce(SUM)``: each process writes its own row of a ``(world, 7)`` block, so every process gets every
row and merges them exactly, each with its own shift (``merge``).

Example:
    >>> import torch
    >>> acc = RatioAccumulator()
    >>> acc.add(torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64))
    >>> acc.add(torch.tensor([3.0], dtype=torch.float64), 2.0)
    >>> estimate = RatioAccumulator.merge(acc.pack(rank=0, world=1, device=torch.device("cpu")))
    >>> estimate.units, estimate.ratio  # (2 + 4 + 3) / (1 + 3 + 2)
    (3, 1.5)

"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_validate.metrics.slots import sum_dtype

__all__ = ["RatioAccumulator", "RatioEstimate"]

#: Per process: units, sum T, sum d, sum d^2, sum T^2, sum d T (with d = L - K T), and the shift K.
_ROW = 7


class RatioEstimate(NamedTuple):
    """A ratio of sums with its delta-method standard error; ``units`` is the number of rows with ``T_i > 0``."""

    units: int
    ratio: float
    se: float


class RatioAccumulator:
    """Per-row terms ``(L_i, T_i)`` of a ratio estimator, summed on the device; no host-device sync per batch."""

    def __init__(self) -> None:
        self._dev: Tensor | None = None  # units, sum T, sum d, sum d^2, sum T^2, sum d T (device-weighted rows)
        self._shift: Tensor | None = None
        self._host = [0.0, 0.0, 0.0]  # units, sum T, sum T^2 of rows whose weight is a host number

    def add(self, sums: Tensor, weights: Tensor | float) -> None:
        """Add rows: ``sums`` of shape ``(N,)``; ``weights`` of the same shape, or one number for every row.

        With one number (a per-sample mean: 1, or a row's element count) the weights stay on the host. A row of
        weight 0 adds nothing (a sequence whose tokens are all ignored) and is not counted as a unit.
        """
        sums = sums.detach().reshape(-1)
        dtype = sum_dtype(sums.device)
        if sums.dtype != dtype:
            sums = sums.to(dtype)
        if not isinstance(weights, Tensor) and weights == 0:
            return
        if isinstance(weights, Tensor):
            weights = weights.detach().reshape(-1).to(device=sums.device, dtype=dtype)
        if self._dev is None:
            with torch.inference_mode(False):  # updated in place in later stages too
                self._dev = torch.zeros(6, dtype=dtype, device=sums.device)
            # The first batch's own ratio as the shift: a device scalar (0 if that batch weighs nothing), no sync.
            total = weights.sum() if isinstance(weights, Tensor) else weights * sums.numel()
            self._shift = torch.where(torch.as_tensor(total, device=sums.device) != 0, sums.sum() / total, 0.0)
        assert self._shift is not None
        if isinstance(weights, Tensor):
            d = sums - self._shift * weights
            terms = torch.stack([(weights != 0).to(dtype), weights, d, d * d, weights * weights, d * weights])
            self._dev.add_(terms.sum(1))
            return
        d = sums - self._shift * weights
        total = d.sum()
        self._dev[2:].add_(torch.stack([total, torch.dot(d, d), total.new_zeros(()), total * weights]))
        count = sums.numel()
        self._host[0] += count
        self._host[1] += weights * count
        self._host[2] += weights * weights * count

    def pack(self, rank: int, world: int, device: torch.device) -> Tensor:
        """This process's row of a ``(world, 7)`` block, flattened, for an ``all_reduce(SUM)``; no sync."""
        block = torch.zeros(world, _ROW, dtype=sum_dtype(device), device=device)
        if self._dev is not None and self._shift is not None:
            host = torch.tensor([self._host[0], self._host[1], 0.0, 0.0, self._host[2], 0.0], dtype=block.dtype)
            block[rank, :6] = self._dev.to(device=device, dtype=block.dtype) + host.to(device)
            block[rank, 6] = self._shift.to(device=device, dtype=block.dtype)
        return block.flatten()

    @staticmethod
    def merge(packed: Tensor | list[float]) -> RatioEstimate:
        """The ratio and its standard error from a reduced ``pack()`` (every process's row), on the host."""
        values = packed.tolist() if isinstance(packed, Tensor) else list(packed)
        rows = [values[i : i + _ROW] for i in range(0, len(values), _ROW)]
        rows = [r for r in rows if r[1] != 0 or r[0] != 0]
        units = round(sum(r[0] for r in rows))
        weight = sum(r[1] for r in rows)
        if not rows or weight == 0:
            return RatioEstimate(units, math.nan, math.nan)
        ratio = sum(r[2] + r[6] * r[1] for r in rows) / weight
        # sum_i (L_i - R T_i)^2 per process, from its shift K: d_i + (K - R) T_i.
        residual = 0.0
        for _, _, _, d2, w2, dw, shift in rows:
            delta = shift - ratio
            residual += d2 + 2.0 * delta * dw + delta * delta * w2
        if units < 2:
            return RatioEstimate(units, ratio, math.nan)
        mean_weight = weight / units
        se = math.sqrt(max(residual, 0.0) / (units * (units - 1))) / mean_weight
        return RatioEstimate(units, ratio, se)
