"""``validate(confidence=...)``: the intervals of its values, from ``metrics.uncertainty``, and their warnings.

Kept out of the loop (``loop.py``) so that a ``validate()`` call without intervals runs exactly the loop it ran
before: the loop calls ``tracker.update`` per batch only when a tracker exists.

Under ``torch.distributed``, ``validate()``'s metrics are synchronized by torchmetrics and its loss is this
process's; the intervals follow: the metrics' states are summed across processes (one ``all_reduce``), the loss's
are not.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from lightning_validate.metrics.intervals import Intervals, interval_names
from lightning_validate.metrics.loss_terms import known
from lightning_validate.metrics.padding import sampler_layout
from lightning_validate.metrics.uncertainty import EvaluationIntervals

__all__ = ["finish_intervals", "flat_metrics", "per_metric", "tracker_for"]


def flat_metrics(named: Sequence[tuple[str | None, Any]]) -> list[tuple[str, Metric]]:
    """Each metric by the name its result has: a ``MetricCollection``'s members with its prefix and postfix."""
    out: list[tuple[str, Metric]] = []
    for name, metric in named:
        if isinstance(metric, MetricCollection):
            out.extend((k, m) for k, m in metric.items(keep_base=False, copy_state=False) if isinstance(m, Metric))
        elif name is not None:
            out.append((name, metric))
    return out


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def tracker_for(spec: Intervals, named: Sequence[tuple[str | None, Any]], criterion: object,
                dataloader: Iterable[Any]) -> EvaluationIntervals:
    """The tracker of one ``validate()`` call: its metrics, its criterion, the sample layout of its dataloader."""
    layout = sampler_layout(dataloader)
    if layout is None and _distributed():
        layout = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    rank, world = layout if layout is not None else (0, 1)
    loss: bool | str = criterion is not None
    if criterion is not None and getattr(criterion, "reduction", "mean") == "sum":
        loss = "sum"
    return EvaluationIntervals(spec, flat_metrics(named), criterion=criterion if known(criterion) else None,
                               loss=loss, rank=rank, world=world)


def per_metric(named: Sequence[tuple[str | None, Any]], inputs: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``update`` arguments of each metric of ``flat_metrics``: a collection's members share its arguments."""
    out: list[tuple[Any, ...]] = []
    for (name, metric), args in zip(named, inputs, strict=True):
        if isinstance(metric, MetricCollection):
            out.extend([args] * sum(1 for _ in metric.keys(keep_base=False)))
        elif name is not None:
            out.append(args)
    return out


def finish_intervals(tracker: EvaluationIntervals, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The ``<name>_low`` and ``<name>_high`` of every value that has an interval; warns for those that do not."""
    packed = tracker.pack(device)
    if _distributed() and tracker.world > 1:
        loss = tracker.loss_size()
        shared = packed[loss:].clone()
        torch.distributed.all_reduce(shared)
        packed = torch.cat([packed[:loss], shared])
    out: dict[str, float] = {}
    for name, (low, high) in tracker.finish(packed, values).items():
        low_name, high_name = interval_names(name)
        out[low_name], out[high_name] = low, high
    for text in tracker.warnings:
        warnings.warn(text, UserWarning, stacklevel=4)  # the caller of validate()
    return out
