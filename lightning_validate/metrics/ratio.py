"""The standard error of a ratio of sums, ``R = sum(L_i) / sum(T_i)``, with the row ``i`` (a sample) as the unit.

A mean loss, MAE, MSE, a token-weighted language-model loss and a pixel accuracy are all such ratios: ``L_i`` is
what row ``i`` of a batch adds to the numerator (its summed loss, squared error, correct pixels) and ``T_i`` what
it adds to the denominator (1, its element count, its tokens not ignored). The samples of a validation set are
the independent draws, not the tokens or pixels inside them: two tokens of one hard sequence are both hard. So the
delta method (the ratio estimator of survey sampling) treats rows as the units::

    Var(R) ~= sum_i (L_i - R T_i)^2 / (n (n - 1) Tbar^2),    Tbar = sum_i T_i / n

With ``T_i = 1`` this is exactly the variance ``s^2 / n`` of a mean. Treating the tokens as independent instead
underestimates the error as soon as sequences differ in difficulty (about 5x in ``docs/uncertainty.md``).

``RatioAccumulator`` keeps the sums on the device, shifted by a value ``K`` taken from its first rows (as a device
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
#: Rows kept in the window before they are folded into the sums.
_WINDOW = 8192


class RatioEstimate(NamedTuple):
    """A ratio of sums with its delta-method standard error; ``units`` is the number of rows with ``T_i > 0``."""

    units: int
    ratio: float
    se: float


class RatioAccumulator:
    """Per-row terms ``(L_i, T_i)`` of a ratio estimator, summed on the device; no host-device sync per batch.

    A batch's rows are copied into a window buffer (two small copies) and folded into the six running sums a few
    thousand rows at a time: the sums cost a handful of kernels per window, not per batch.
    """

    def __init__(self) -> None:
        self._dev: Tensor | None = None  # units, sum T, sum d, sum d^2, sum T^2, sum d T
        self._shift: Tensor | None = None
        self._window: Tensor | None = None  # (2, _WINDOW): rows not folded yet, L then T
        self._filled = 0

    def add(self, sums: Tensor, weights: Tensor | float) -> None:
        """Add rows: ``sums`` of shape ``(N,)``; ``weights`` of that shape (a bool mask: 1 or 0) or one number.

        A row of weight 0 adds nothing (a sequence whose tokens are all ignored) and is no unit.
        """
        sums = sums.detach().reshape(-1)
        n = sums.numel()
        if n == 0:
            return
        if self._window is None or self._window.device != sums.device:
            self._fold()
            with torch.inference_mode(False):  # written in place in later stages too
                self._window = torch.zeros(2, _WINDOW, dtype=sum_dtype(sums.device), device=sums.device)
        if self._filled + n > _WINDOW:
            self._fold()
        if n > _WINDOW:  # a batch larger than the window is folded on its own
            dtype = self._window.dtype
            w = weights.detach().reshape(-1).to(dtype) if isinstance(weights, Tensor) else torch.full_like(
                sums, weights, dtype=dtype)
            self._fold_rows(sums.to(dtype), w)
            return
        rows = self._window[:, self._filled : self._filled + n]
        rows[0].copy_(sums)
        if isinstance(weights, Tensor):
            rows[1].copy_(weights.detach().reshape(-1))
        else:
            rows[1].fill_(weights)
        self._filled += n

    def _fold(self) -> None:
        if self._window is not None and self._filled:
            filled, self._filled = self._filled, 0
            self._fold_rows(self._window[0, :filled], self._window[1, :filled])

    def _fold_rows(self, sums: Tensor, weights: Tensor) -> None:
        if self._dev is None or self._shift is None:
            with torch.inference_mode(False):
                self._dev = torch.zeros(6, dtype=sums.dtype, device=sums.device)
            # The first rows' own ratio as the shift: a device scalar (0 if they weigh nothing), nothing read back.
            total = weights.sum()
            self._shift = torch.where(total != 0, sums.sum() / total, 0.0)
        d = torch.addcmul(sums, weights, self._shift, value=-1.0)  # sums - shift * weights
        terms = torch.stack([(weights != 0).to(sums.dtype), weights, d, d * d, weights * weights, d * weights])
        self._dev.add_(terms.sum(1))

    def pack(self, rank: int, world: int, device: torch.device) -> Tensor:
        """This process's row of a ``(world, 7)`` block, flattened, for an ``all_reduce(SUM)``; no sync."""
        self._fold()
        block = torch.zeros(world, _ROW, dtype=sum_dtype(device), device=device)
        if self._dev is not None and self._shift is not None:
            block[rank, :6] = self._dev.to(device=device, dtype=block.dtype)
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
