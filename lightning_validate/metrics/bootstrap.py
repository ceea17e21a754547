"""A Poisson bootstrap of torchmetrics metrics whose states are sums over samples: replicated on the device.

A torchmetrics metric such as macro F1 keeps sums over samples (true positives per class, ...) and computes its
value from them. A bootstrap replicate is the same metric on a resample of the validation set. Drawing each
sample ``w ~ Poisson(1)`` times instead of exactly resampling ``n`` of ``n`` (the Poisson bootstrap, which is the
ordinary bootstrap as ``n`` grows) makes every replicate a weighted sum: ``state[b] = sum_i w(b, i) c_i``, with
``c_i`` what sample ``i`` adds to the states. For ``B`` replicates that is one ``(K, N) @ (N, B)`` matrix product
per batch (one ``index_add`` when each sample adds to one state), into a fixed ``(K, B)`` tensor on the device: no
Python loop over replicates, no copy of the metric per replicate, no index tensor built on the host, nothing read
back, and one reduction at the end.

The weights are not drawn from a generator: ``w(b, i)`` is a hash of the seed, the replicate ``b`` and the sample's
index ``i`` (its position in the evaluation order, the same on any number of processes), mapped to Poisson(1)
through a table of its quantiles. So every replicate is the same at any batch size, on any number of processes
and in any order of shards, and two evaluations with the same seed weight each sample alike in each replicate:
the replicates of two checkpoints are paired. The hash is ``lowbias32`` (Chris Wellons' 32-bit integer hash)
applied to ``key(seed, b) ^ key(seed, i)``; ``poisson_weight`` is the same definition in plain Python.

Which metrics: the classification metrics built on stat scores (``Binary``/``Multiclass``/``Multilabel`` accuracy,
precision, recall, F-scores, specificity, negative predictive value, Hamming distance, in any ``average``), those
built on a confusion matrix (Jaccard index, Cohen's kappa, Matthews correlation) and ``R2Score`` and
``ExplainedVariance`` on one output. A metric that keeps a list of every sample's scores (exact AUROC) cannot be
weighted this way: ``family_of`` says why.

Example:
    >>> import torch
    >>> from torchmetrics.classification import MulticlassF1Score
    >>> metric = MulticlassF1Score(3, average="macro")
    >>> replicated = Replicated(metric, family_of(metric), PoissonWeights(replicates=200, seed=0))
    >>> preds, target = torch.randn(100, 3), torch.randint(0, 3, (100,))
    >>> for start in range(0, 100, 32):  # any batch size gives the same replicates
    ...     rows = torch.arange(start, min(start + 32, 100))
    ...     replicated.update((preds[rows], target[rows]), rows)
    >>> values = replicated.values(replicated.pack(torch.device("cpu")))
    >>> values.shape, bool(values.std() > 0)
    (torch.Size([200]), True)

"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryConfusionMatrix,
    BinaryStatScores,
    MulticlassConfusionMatrix,
    MulticlassStatScores,
    MultilabelStatScores,
)
from torchmetrics.regression import ExplainedVariance, R2Score

#: torchmetrics >= 1.8 counts top-k predictions as the target when it is among them (``_refine_preds_oh``).
_REFINED_TOP_K = hasattr(importlib.import_module("torchmetrics.functional.classification.stat_scores"),
                         "_refine_preds_oh")

__all__ = ["PoissonWeights", "Replicated", "Unsupported", "family_of", "poisson_weight"]

_MASK = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_SEED_KEY = 0x9E3779B9  # distinguishes the seed's key from a replicate's and a sample's
_SAMPLE_KEY = 0x85EBCA6B
#: Bits of the hash that pick the Poisson(1) quantile: 65,536 cells, each probability off by < 2**-16.
_CELLS = 1 << 16
#: Sample positions whose keys are hashed at once (``PoissonWeights.at``).
_BLOCK = 4096
#: Counts are summed in float32 while they stay exact integers (< 2**24), then folded into float64.
_FLOAT32_EXACT = 1 << 24
#: The largest weight the table gives (its last cell's Poisson(1) quantile).
_MAX_WEIGHT = 8
#: Up to this many classes a multiclass metric's replicated state is its confusion matrix (one ``index_add`` per
#: batch); above, per class counts (a matrix product).
_MAX_PAIRED = 64


def _mix(x: int) -> int:
    """``lowbias32`` on a Python int (the reference definition)."""
    x &= _MASK
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    x ^= x >> 16
    return x


def _as_int32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _poisson_table() -> list[int]:
    """For each cell ``j`` of the hash's top 16 bits, the Poisson(1) quantile of ``(j + 1/2) / 2**16``."""
    table: list[int] = []
    k, pmf = 0, math.exp(-1.0)
    cdf = pmf
    for j in range(_CELLS):
        u = (j + 0.5) / _CELLS
        while u > cdf:
            k += 1
            pmf /= k
            cdf += pmf
        table.append(k)
    return table


_TABLE = _poisson_table()


def _replicate_key(seed: int, replicate: int) -> int:
    return _mix(replicate ^ _mix(seed ^ _SEED_KEY))


def _sample_key(seed: int) -> int:
    return _mix(seed ^ _SAMPLE_KEY)


def _pair_cell(replicate_key: int, sample_key: int) -> int:
    """The table cell of a (replicate, sample) pair: ``lowbias32`` without its first and last xor-shifts.

    Those only stir bits of already mixed keys and the low bits the table does not read.
    """
    x = ((replicate_key ^ sample_key) * _M1) & _MASK
    x ^= x >> 15
    return ((x * _M2) & _MASK) >> 16


def poisson_weight(seed: int, replicate: int, index: int) -> int:
    """The weight of sample ``index`` in ``replicate`` of the bootstrap with ``seed``: the definition, in Python.

    ``PoissonWeights`` computes the same numbers on the device for a batch of samples and all replicates at once.

    Example:
        >>> [poisson_weight(0, 0, i) for i in range(12)]
        [1, 1, 1, 0, 1, 4, 3, 2, 0, 1, 1, 1]

    """
    if not 0 <= index < 1 << 31:
        raise ValueError(f"Expected a sample index in [0, 2**31) but got {index}.")
    return _TABLE[_pair_cell(_replicate_key(seed, replicate), _mix(index ^ _sample_key(seed)))]


def _mix_tensor(x: Tensor) -> Tensor:
    """``lowbias32`` on int32 tensors (two's complement products wrap modulo 2**32, shifts are made logical)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x.mul_(_as_int32(_M1))
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_as_int32(_M2))
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    return x


@functools.lru_cache(maxsize=8)
def _replicate_keys(seed: int, replicates: int) -> Tensor:
    with torch.inference_mode(False):
        keys = [_as_int32(_replicate_key(seed, b)) for b in range(replicates)]
        return torch.tensor(keys, dtype=torch.int32).reshape(-1, 1)


@functools.lru_cache(maxsize=1)
def _table_tensor() -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor(_TABLE, dtype=torch.float32)


class PoissonWeights:
    """``w(b, i) ~ Poisson(1)`` for a batch of ``N`` sample indices and ``B`` replicates: an ``(N, B)`` float32 tensor.

    One row per sample: a batch's weights are added row by row into ``(K, B)`` states (``Replicated``).

    Args:
        replicates: the number of replicates ``B``.
        seed: the bootstrap's seed.
    """

    def __init__(self, replicates: int, seed: int) -> None:
        self.replicates = replicates
        self.seed = seed
        self._sample_key = _as_int32(_sample_key(seed))
        self._keys_host = _replicate_keys(seed, replicates)
        self._table_host = _table_tensor()
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _device_tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        found = self._on.get(device)
        if found is None:
            with torch.inference_mode(False):
                found = (self._keys_host.to(device), self._table_host.to(device))
            self._on[device] = found
        return found

    def __call__(self, ids: Tensor) -> Tensor:
        """The weights of the samples ``ids`` (int32 or int64, each in ``[0, 2**31)``) in every replicate."""
        return self._weights(_mix_tensor(ids.to(torch.int32) ^ self._sample_key))

    def at(self, start: int, count: int, world: int = 1, rank: int = 0, device: torch.device | None = None) -> Tensor:
        """The weights of the samples at positions ``rank + world * k`` for ``k`` in ``[start, start + count)``.

        The samples' own keys are hashed for a block of positions at a time and kept until the batches move past
        the block, so that a batch costs only its ``(B, N)`` part.
        """
        device = device if device is not None else torch.device("cpu")
        block = self._block
        if block is None or block[0] != (world, rank, device) or not block[1] <= start < start + count <= block[2]:
            first = start
            last = max(start + count, start + _BLOCK)
            ids = torch.arange(rank + world * first, rank + world * last, world, dtype=torch.int32, device=device)
            with torch.inference_mode(False):
                keys = _mix_tensor(ids ^ self._sample_key)
            block = self._block = ((world, rank, device), first, last, keys)
        return self._weights(block[3][start - block[1] : start - block[1] + count])

    _block: tuple[tuple[int, int, torch.device], int, int, Tensor] | None = None

    _buffers: tuple[Tensor, Tensor] | None = None

    def _weights(self, sample_keys: Tensor) -> Tensor:
        keys, table = self._device_tensors(sample_keys.device)
        n, b = sample_keys.numel(), self.replicates
        found = self._buffers
        if found is None or found[0].shape[0] < n or found[0].device != sample_keys.device:
            with torch.inference_mode(False):  # two int32 scratch buffers, reused by every batch
                found = self._buffers = (torch.empty(max(n, 64), b, dtype=torch.int32, device=sample_keys.device),
                                         torch.empty(max(n, 64), b, dtype=torch.int32, device=sample_keys.device))
        x, tmp = found[0][:n], found[1][:n]
        torch.bitwise_xor(sample_keys.reshape(-1, 1), keys.reshape(1, -1), out=x)
        x.mul_(_as_int32(_M1))
        torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_(0x1FFFF)  # a logical shift, on int32
        x.bitwise_xor_(tmp)
        x.mul_(_as_int32(_M2))
        cells = torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
        return table.index_select(0, cells.reshape(-1)).reshape(n, b)


class Unsupported(Exception):
    """A metric (or an input) the bootstrap cannot replicate; the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Families: what each sample adds to the states (rows of width K), and the metric's value from B replicated states


class _Family:
    """How one kind of metric splits into per-sample contributions and gets its value back from summed ones."""

    width: int
    counts: bool = True  # contributions are integer counts (exact in float32 per batch)

    def __init__(self, metric: Metric) -> None:
        # Any: the attributes read (threshold, num_classes, ignore_index) are the metric's own, untyped by nn.Module.
        self.metric: Any = metric

    def cells(self, args: Sequence[Any]) -> Tensor | None:
        """Each sample's one state when it adds 1 to one state and nothing else (one label per sample).

        ``width`` for a sample that adds nothing (its target ignored); ``None`` when samples add more (``rows``).
        """
        return None

    def rows(self, args: Sequence[Any]) -> Tensor:
        """What each sample of a batch adds to the states: ``(N, width)``."""
        raise NotImplementedError

    def values(self, replicated: Tensor) -> Tensor:
        """The metric's value in each replicate: ``(B,)`` float64, from ``(B, width)`` summed contributions."""
        raise NotImplementedError

    def _shadow(self) -> Metric:
        """A copy of the metric to compute replicate values on, made once.

        The metric's own states are never touched; each use sets every state the computation reads.
        """
        shadow: Metric | None = self.__dict__.get("_shadow_metric")
        if shadow is None:
            shadow = copy.deepcopy(self.metric)
            shadow.reset()
            self.__dict__["_shadow_metric"] = shadow
        return shadow


def _tensors(args: Sequence[Any], metric: Metric) -> tuple[Tensor, Tensor]:
    if len(args) != 2 or not all(isinstance(a, Tensor) for a in args):
        raise Unsupported(f"{type(metric).__name__} is updated with something other than two tensors (preds, target)")
    preds, target = args
    assert isinstance(preds, Tensor) and isinstance(target, Tensor)
    return preds.detach(), target.detach()


def _probabilities(preds: Tensor) -> Tensor:
    """Torchmetrics' rule for binary scores: a sigmoid when any value is outside [0, 1]; decided on the device."""
    inside = ((preds >= 0) & (preds <= 1)).all()
    return torch.where(inside, preds, preds.sigmoid())


def _binary_labels(preds: Tensor, threshold: float) -> Tensor:
    if preds.is_floating_point():
        return _probabilities(preds) > threshold
    return preds


def _valid(target: Tensor, ignore_index: int | None) -> Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _multiclass_labels(preds: Tensor, target: Tensor, top_k: int) -> Tensor:
    """Each element's predicted label as torchmetrics counts it.

    With ``top_k > 1``: the target when it is among the top k scores, else the top score (``_refine_preds_oh``).
    """
    if not (preds.is_floating_point() and preds.ndim == target.ndim + 1):
        return preds.long()
    if top_k == 1:
        return preds.argmax(1)
    top = preds.topk(top_k, dim=1).indices
    hit = (top == target.unsqueeze(1)).any(1)
    return torch.where(hit, target.long(), top.select(1, 0))


class _Pairs(_Family):
    """States that count ``(target, prediction)`` pairs: a confusion matrix of ``classes x classes`` cells.

    With one label per sample each sample adds 1 to one cell (``cells``: one ``index_add`` per batch); with several
    (pixels, positions) its own confusion counts (``rows``).
    """

    classes: int
    binary: bool = False
    top_k: int = 1

    def _pair(self, args: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Per element: the flat cell ``target * C + prediction`` and whether it counts, as ``(N, elements)``."""
        preds, target = _tensors(args, self.metric)
        n, c = target.shape[0], self.classes
        if self.binary:
            labels = _binary_labels(preds, self.metric.threshold).long()
        else:
            labels = _multiclass_labels(preds, target, self.top_k)
        labels = labels.reshape(n, -1).clamp(0, c - 1)
        t = target.reshape(n, -1).long()
        valid = _valid(t, self.metric.ignore_index)
        return t.masked_fill(~valid, 0).clamp(0, c - 1) * c + labels, valid, t

    def cells(self, args: Sequence[Any]) -> Tensor | None:
        target = args[1] if len(args) > 1 else None
        if not isinstance(target, Tensor) or target.ndim != 1:
            return None
        preds, target = _tensors(args, self.metric)
        c = self.classes
        if self.binary:
            labels = _binary_labels(preds, self.metric.threshold).long()
        else:
            labels = _multiclass_labels(preds, target, self.top_k)
        t = target.long()
        ignore = self.metric.ignore_index
        # Out-of-range values are the metric's to reject (its own update ran first); clamped, they cannot fault here.
        cell = (t.clamp(0, c - 1) * c + labels.reshape(-1).clamp(0, c - 1))
        return cell if ignore is None else cell.masked_fill(t == ignore, self.width)

    def rows(self, args: Sequence[Any]) -> Tensor:
        cell, valid, t = self._pair(args)
        out = torch.zeros(t.shape[0], self.width, dtype=torch.float32, device=t.device)
        return out.scatter_add_(1, cell, valid.to(torch.float32))

    def _confusion(self, replicated: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tp, fp, tn, fn)`` per class from ``B`` confusion matrices ``[target, prediction]``."""
        c = self.classes
        m = replicated.round().reshape(-1, c, c)  # exact integer counts, in float64: the metric computes in float64
        tp = m.diagonal(dim1=1, dim2=2)
        fn = m.sum(2) - tp
        fp = m.sum(1) - tp
        tn = m.sum((1, 2)).unsqueeze(1) - tp - fn - fp
        return tp, fp, tn, fn


class _BinaryStats(_Pairs):
    """``Binary*`` stat-score metrics: a 2 x 2 confusion per sample; values by the metric in ``samplewise`` mode."""

    binary = True
    classes = 2
    width = 4

    def values(self, replicated: Tensor) -> Tensor:
        m = replicated.round()  # cells [t * 2 + p]: tn, fp, fn, tp
        return _samplewise(self._shadow(), m[:, 3], m[:, 1], m[:, 0], m[:, 2])


class _MulticlassStats(_Pairs):
    """``Multiclass*`` stat-score metrics; values by the metric in ``samplewise`` mode.

    The states: the confusion matrix (up to ``_MAX_PAIRED`` classes), else per class ``tp``, ``fn``, ``fp`` and the
    elements not ignored.
    """

    def __init__(self, metric: Metric) -> None:
        super().__init__(metric)
        self.classes = int(self.metric.num_classes)
        self.top_k = int(self.metric.top_k)
        self.paired = self.classes <= _MAX_PAIRED
        self.width = self.classes * self.classes if self.paired else 3 * self.classes + 1
        if self.top_k > 1 and not _REFINED_TOP_K:
            raise Unsupported(f"{type(metric).__name__}(top_k={self.top_k}) counts top-k differently in this "
                              "torchmetrics release")

    def cells(self, args: Sequence[Any]) -> Tensor | None:
        return super().cells(args) if self.paired else None

    def rows(self, args: Sequence[Any]) -> Tensor:
        if self.paired:
            return super().rows(args)
        cell, valid, t = self._pair(args)
        n, c = t.shape[0], self.classes
        target, labels = cell // c, cell % c
        v = valid.to(torch.float32)
        correct = (labels == target).to(torch.float32) * v
        out = torch.zeros(n, self.width, dtype=torch.float32, device=t.device)
        out[:, :c].scatter_add_(1, target, correct)
        out[:, c : 2 * c].scatter_add_(1, target, v - correct)
        out[:, 2 * c : 3 * c].scatter_add_(1, labels, v - correct)
        out[:, 3 * c] = v.sum(1)
        return out

    def values(self, replicated: Tensor) -> Tensor:
        if self.paired:
            tp, fp, tn, fn = self._confusion(replicated)
            return _samplewise(self._shadow(), tp, fp, tn, fn)
        c = self.classes
        states = replicated.round()  # exact integer counts, in float64: the metric then computes in float64
        tp, fn, fp = states[:, :c], states[:, c : 2 * c], states[:, 2 * c : 3 * c]
        tn = states[:, 3 * c :] - tp - fn - fp
        return _samplewise(self._shadow(), tp, fp, tn, fn)


class _MultilabelStats(_Family):
    """``Multilabel*`` stat-score metrics: per sample and label ``(tp, fp, tn, fn)``."""

    def __init__(self, metric: Metric) -> None:
        super().__init__(metric)
        self.labels = int(self.metric.num_labels)
        self.width = 4 * self.labels

    def rows(self, args: Sequence[Any]) -> Tensor:
        preds, target = _tensors(args, self.metric)
        n, k = target.shape[0], self.labels
        p = (_binary_labels(preds, self.metric.threshold) == 1).reshape(n, k, -1)
        t = target.reshape(n, k, -1)
        valid = _valid(t, self.metric.ignore_index)
        pos, neg = (t == 1) & valid, (t == 0) & valid
        return torch.cat([(p & pos).sum(2), (p & neg).sum(2), (~p & neg).sum(2), (~p & pos).sum(2)], 1)

    def values(self, replicated: Tensor) -> Tensor:
        k = self.labels
        s = replicated.round()
        return _samplewise(self._shadow(), s[:, :k], s[:, k : 2 * k], s[:, 2 * k : 3 * k], s[:, 3 * k :])


def _samplewise(shadow: Metric, tp: Tensor, fp: Tensor, tn: Tensor, fn: Tensor) -> Tensor:
    """The metric's own ``compute`` on ``B`` replicated states at once: its ``samplewise`` mode reduces each row."""
    shadow.multidim_average = "samplewise"
    for name, state in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)):
        object.__setattr__(shadow, name, state)
    value = type(shadow).compute(shadow)
    result: Tensor = value.to(torch.float64).reshape(-1)
    return result


class _ConfusionMatrix(_Pairs):
    """Metrics computed from a confusion matrix (Jaccard index, Cohen's kappa, Matthews correlation).

    Per sample its ``(target, prediction)`` counts; values by the metric, one replicate at a time.
    """

    def __init__(self, metric: Metric) -> None:
        super().__init__(metric)
        self.binary = isinstance(metric, BinaryConfusionMatrix)
        self.classes = 2 if self.binary else int(self.metric.num_classes)
        self.width = self.classes * self.classes

    def values(self, replicated: Tensor) -> Tensor:
        shadow = self._shadow()
        counts = replicated.round()
        return _one_by_one(shadow, counts, lambda s, row: setattr(s, "confmat", row.reshape(self.classes,
                                                                                            self.classes)))


class _Regression(_Family):
    """``R2Score`` and ``ExplainedVariance`` on one output: per sample the sums their states keep."""

    counts = False

    def __init__(self, metric: Metric) -> None:
        super().__init__(metric)
        self.width = 4 if isinstance(metric, R2Score) else 5

    def rows(self, args: Sequence[Any]) -> Tensor:
        preds, target = _tensors(args, self.metric)
        if (preds.ndim > 1 and preds.shape[1] != 1) or (target.ndim > 1 and target.shape[1] != 1):
            raise Unsupported(f"{type(self.metric).__name__} on several outputs (shape {tuple(preds.shape)})")
        p, y = preds.reshape(-1).to(torch.float64), target.reshape(-1).to(torch.float64)
        error = y - p
        ones = torch.ones_like(y)
        if self.width == 4:  # R2Score: sum_squared_error = sum y^2, sum_error = sum y, residual, total
            return torch.stack([y * y, y, error * error, ones], 1)
        # ExplainedVariance: num_obs, sum_error, sum_squared_error, sum_target, sum_squared_target
        return torch.stack([ones, error, error * error, y, y * y], 1)

    def values(self, replicated: Tensor) -> Tensor:
        shadow = self._shadow()
        names: tuple[str, ...]
        if self.width == 4:
            names = ("sum_squared_error", "sum_error", "residual", "total")
        else:
            names = ("num_obs", "sum_error", "sum_squared_error", "sum_target", "sum_squared_target")

        def put(s: Metric, row: Tensor) -> None:
            for i, name in enumerate(names):
                value = row[i]
                setattr(s, name, value.round().long() if name == "total" else value)

        return _one_by_one(shadow, replicated.to(torch.float64), put)


def _one_by_one(shadow: Metric, replicated: Tensor, put: Callable[[Metric, Tensor], None]) -> Tensor:
    """The metric's own ``compute`` on each replicate's states; a replicate it cannot compute on is ``nan``."""
    values: list[Tensor] = []
    nan = torch.tensor(math.nan, dtype=torch.float64)
    for row in replicated.unbind(0):
        put(shadow, row)
        try:
            value = type(shadow).compute(shadow)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. R2 of a replicate with fewer than 2 samples
            values.append(nan)
            continue
        values.append(value.detach().to(torch.float64).reshape(-1)[0].cpu())
    return torch.stack(values)


def family_of(metric: Metric) -> _Family:
    """The bootstrap family of ``metric``.

    Raises:
        Unsupported: with the reason, for a metric with list states or one the bootstrap does not know.
    """
    name = type(metric).__name__
    lists = [k for k, v in metric._defaults.items() if isinstance(v, list)]
    if lists:
        raise Unsupported(
            f"{name} keeps every sample's values (list states {', '.join(f'`{k}`' for k in lists)}), which a "
            "fixed-size replicated state cannot weight"
        )
    if getattr(metric, "multidim_average", "global") != "global":
        raise Unsupported(f"{name}(multidim_average={metric.multidim_average!r}) is not one value")
    if isinstance(metric, BinaryStatScores):
        return _BinaryStats(metric)
    if isinstance(metric, MulticlassStatScores):
        return _MulticlassStats(metric)
    if isinstance(metric, MultilabelStatScores):
        return _MultilabelStats(metric)
    if isinstance(metric, (BinaryConfusionMatrix, MulticlassConfusionMatrix)):
        return _ConfusionMatrix(metric)
    if isinstance(metric, (R2Score, ExplainedVariance)):
        return _Regression(metric)
    raise Unsupported(
        f"{name} is not a metric whose states this bootstrap can split per sample (stat scores, confusion matrices, "
        "R2Score, ExplainedVariance)"
    )


class Replicated:
    """One metric's ``B`` replicated states: a ``(K, B)`` tensor on the device, updated by one kernel per batch.

    Counts (stat scores, confusion matrices) add small integers: they are summed in float32, exact while below
    ``2**24``, and folded into the float64 states before that bound; one label per sample is one ``index_add`` of the
    weights, several a ``(K, N) @ (N, B)`` product. Real sums (R2) go straight into float64.

    Args:
        metric: the metric whose value is replicated (only read, at the end, through a copy).
        family: its ``family_of``.
        weights: the replicates' weights (shared by every metric of an evaluation).
    """

    def __init__(self, metric: Metric, family: _Family, weights: PoissonWeights) -> None:
        self.metric = metric
        self.family = family
        self.weights = weights
        self._states: Tensor | None = None  # float64, (B, K)
        self._counts: Tensor | None = None  # float32, (B, K + 1): the last column takes samples that add nothing
        self._bound = 0  # the largest value a float32 count can have reached since the last fold

    @property
    def size(self) -> int:
        """The length of ``pack()``: the same on every process before any batch, for one reduction."""
        return self.weights.replicates * self.family.width

    def update(self, args: Sequence[Any], ids: Tensor | None, weights: Tensor | None = None) -> None:
        """Add a batch: the metric's ``update`` arguments and the samples' indices (or their ``(N, B)`` weights)."""
        if weights is None:
            assert ids is not None
            weights = self.weights(ids)
        family = self.family
        if not family.counts:
            rows = family.rows(args)
            self._allocate(rows.device)
            assert self._states is not None
            self._states.addmm_(rows.to(torch.float64).t(), weights.to(torch.float64))
            return
        cells = family.cells(args)
        # A sample's weight is at most _MAX_WEIGHT (the table's largest Poisson quantile), times its elements.
        added = weights.shape[0] * _MAX_WEIGHT * (1 if cells is not None else max(1, _elements(args)))
        if self._bound + added >= _FLOAT32_EXACT:
            self._fold()
        self._bound += added
        self._allocate(weights.device)
        assert self._counts is not None
        if cells is not None:
            self._counts.index_add_(0, cells, weights)  # each sample's row of weights into its cell's row
        else:
            self._counts[:-1].addmm_(family.rows(args).to(torch.float32).t(), weights)

    def _allocate(self, device: torch.device) -> None:
        if self._states is None:
            with torch.inference_mode(False):  # updated in place in later stages too
                b, k = self.weights.replicates, self.family.width
                self._states = torch.zeros(k, b, dtype=torch.float64, device=device)
                if self.family.counts:
                    self._counts = torch.zeros(k + 1, b, dtype=torch.float32, device=device)

    def _fold(self) -> None:
        if self._counts is not None and self._states is not None and self._bound:
            self._states += self._counts[:-1]
            self._counts.zero_()
        self._bound = 0

    def pack(self, device: torch.device) -> Tensor:
        """The replicated states (state-major), flattened, for an ``all_reduce(SUM)``; zeros if no batch came."""
        if self._states is None:
            return torch.zeros(self.size, dtype=torch.float64, device=device)
        self._fold()
        return self._states.reshape(-1).to(device)

    def values(self, packed: Tensor) -> Tensor:
        """The metric's value in each replicate, from a (reduced) ``pack()``: ``(B,)`` float64."""
        states = packed.reshape(self.family.width, self.weights.replicates).t()
        return self.family.values(states.to(torch.float64))


def _elements(args: Sequence[Any]) -> int:
    """Elements per sample of the target (pixels, labels), from its shape."""
    target = args[-1] if args else None
    if isinstance(target, Tensor) and target.ndim > 1:
        return math.prod(target.shape[1:])
    return 1
