"""Keeping the samples ``DistributedSampler`` repeats out of evaluation values, with plain integers.

To give every rank the same length, ``DistributedSampler`` repeats up to ``world_size - 1`` samples. Its padded
entries are the global positions ``>= len(dataset)``, and rank ``r``'s ``k``-th sample sits at global position
``r + k * world_size``, so each rank knows from plain integers how many of its samples are real
(``real_samples(loader)``), and ``PaddingFilter`` cuts its last batch to them: no mask, no ``nonzero``, no sync.

Example:
    >>> f = PaddingFilter(limit=5)  # this rank's sampler yields 6 samples; the last one is padding
    >>> f.keep(4), f.peek(2), f.keep(2)
    (4, 1, 1)

"""

from __future__ import annotations

from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler

__all__ = ["PaddingFilter", "real_samples", "sampler_layout", "take_first"]

#: Samplers whose order is known: padding, if any, is exactly the global positions >= len(sampler.dataset).
#: Lightning injects the first three (the unrepeated ones pad nothing); a subclass of anything else is not guessed.
_KNOWN_SAMPLERS = frozenset(
    f"{package}.{name}"
    for package, name in [
        ("torch.utils.data.distributed", "DistributedSampler"),
        ("lightning.fabric.utilities.distributed", "DistributedSamplerWrapper"),
        ("lightning.pytorch.overrides.distributed", "UnrepeatedDistributedSampler"),
        ("lightning.pytorch.overrides.distributed", "UnrepeatedDistributedSamplerWrapper"),
        ("lightning_fabric.utilities.distributed", "DistributedSamplerWrapper"),
        ("pytorch_lightning.overrides.distributed", "UnrepeatedDistributedSampler"),
        ("pytorch_lightning.overrides.distributed", "UnrepeatedDistributedSamplerWrapper"),
    ]
)


class PaddingFilter:
    """Tell, per batch, how many leading samples are real when a rank's last samples are padding.

    ``limit`` is the number of real samples this rank yields (``real_samples(loader)``), or ``None`` when there
    is no padding to remove. ``keep(n)`` advances by a batch of ``n`` samples and returns how many of them to
    count. Plain integers only: no device work, no sync.
    """

    __slots__ = ("limit", "offset")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.offset = 0

    def peek(self, n: int) -> int:
        """How many leading samples of the next batch of ``n`` are real, without advancing (``keep`` advances)."""
        if self.limit is None or self.offset + n <= self.limit:
            return n
        return max(0, self.limit - self.offset)

    def keep(self, n: int) -> int:
        """Advance by a batch of ``n`` samples; return how many of its leading samples are real."""
        start = self.offset
        self.offset = start + n
        if self.limit is None or self.offset <= self.limit:
            return n
        return max(0, self.limit - start)


def _known_sampler(loader: object) -> DistributedSampler[Any] | None:
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler = batch_sampler.sampler
    if not isinstance(sampler, DistributedSampler):
        return None
    if f"{type(sampler).__module__}.{type(sampler).__qualname__}" not in _KNOWN_SAMPLERS:
        return None
    return sampler


def sampler_layout(loader: object) -> tuple[int, int] | None:
    """``(rank, num_replicas)`` of a ``DataLoader`` over a known ``DistributedSampler``, else ``None``.

    With it, this rank's ``k``-th sample is at global position ``rank + k * num_replicas``: the sample's index in
    the evaluation order, the same whatever the number of processes (with ``shuffle=False``, its dataset index).

    Example:
        >>> from torch.utils.data import DataLoader, DistributedSampler
        >>> data = list(range(10))
        >>> sampler_layout(DataLoader(data, sampler=DistributedSampler(data, num_replicas=4, rank=1)))
        (1, 4)
        >>> sampler_layout(DataLoader(data)) is None
        True

    """
    sampler = _known_sampler(loader)
    return None if sampler is None else (sampler.rank, sampler.num_replicas)


def real_samples(loader: object) -> int | None:
    """Return how many real samples this rank's ``DataLoader`` yields when its sampler pads, else ``None``.

    Only a ``DataLoader`` that batches with a plain ``BatchSampler`` over a ``DistributedSampler`` (or Lightning's
    wrappers of it) is recognized: their order is known, so the padded entries are the trailing positions. For any
    other sampler (a custom one, an ``IterableDataset``) nothing is removed.

    Example:
        >>> from torch.utils.data import DataLoader, DistributedSampler
        >>> data = list(range(10))
        >>> [real_samples(DataLoader(data, sampler=DistributedSampler(data, num_replicas=4, rank=r), batch_size=2))
        ...  for r in range(4)]  # 10 samples on 4 ranks: 3 each, ranks 2 and 3 get one repeat
        [3, 3, 2, 2]

    """
    sampler = _known_sampler(loader)
    if sampler is None:
        return None
    if sampler.drop_last:  # truncates instead of padding: nothing repeated
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    world, rank = sampler.num_replicas, sampler.rank
    real = max(0, -(-(size - rank) // world))  # positions rank + k * world < size
    return min(real, sampler.num_samples)


def take_first(obj: Any, n: int, k: int) -> Any:
    """Keep the first ``k`` of ``n`` samples: slice every tensor in ``obj`` whose first dimension is ``n``."""

    def cut(t: Tensor) -> Tensor:
        return t[:k] if t.ndim and t.shape[0] == n else t

    return apply_to_collection(obj, Tensor, cut)
