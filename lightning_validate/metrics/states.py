"""Reading and restoring torchmetrics objects without side effects.

``local_value`` reads a metric's running value on this process (for a progress bar) without the collective and
the cached value ``compute()`` would leave. ``save_states``/``restore_states`` put metric objects back exactly as
they were when an evaluation raises: bad input loses nothing.

Example:
    >>> import torch
    >>> from torchmetrics import MeanMetric
    >>> m = MeanMetric()
    >>> m.update(torch.tensor(2.0))
    >>> saved = save_states([m])
    >>> m.update(torch.tensor(4.0)); float(local_value(m))
    3.0
    >>> restore_states(saved); float(m.compute())
    2.0

"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["local_value", "restore_states", "save_states"]

#: torchmetrics bookkeeping saved with the states: what ``reset()``, ``update()`` and ``compute()`` change.
_METRIC_META = ("_update_count", "_computed", "_forward_cache", "_cache", "_is_synced")


def local_value(metric: Metric) -> Tensor | None:
    """Return this process's running value of ``metric``: no cross-process sync, no cached value left behind.

    ``metric.compute()`` would gather states from every process (a collective that only one rank calls would
    hang) and cache its result. Calling the class's ``compute`` on the local state avoids both. Metrics built
    from other metrics (compositions, wrappers) call their children's ``compute()``, so they are skipped
    (``None``), as is a metric not updated yet or whose value is not a scalar.
    """
    if not metric.update_called or any(isinstance(m, Metric) for m in metric.children()):
        return None
    value = type(metric).compute(metric)
    if not isinstance(value, Tensor) or value.numel() != 1:
        return None
    return value.reshape(())


def save_states(roots: Iterable[nn.Module]) -> list[tuple[Metric, dict[str, Any]]]:
    """Record what ``reset()`` and ``update()`` replace in every metric under ``roots``, to put it back later.

    Tensor states are cloned (``update`` may add to them in place) and list states copied (``reset()`` clears
    them in place); a metric's states are a few small tensors, or lists whose elements are never changed.
    """
    saved: list[tuple[Metric, dict[str, Any]]] = []
    seen: set[int] = set()
    for root in roots:
        for m in root.modules():
            if isinstance(m, Metric) and id(m) not in seen:
                seen.add(id(m))
                flush = getattr(m, "_flush", None)
                if callable(flush):  # pending counts of FastMulticlassAccuracy belong to the states
                    flush()
                state = {k: list(v) if isinstance(v, list) else v.clone() if isinstance(v, Tensor) else v
                         for k, v in m.metric_state.items()}
                state.update({k: getattr(m, k) for k in _METRIC_META if hasattr(m, k)})
                saved.append((m, state))
    return saved


def restore_states(saved: list[tuple[Metric, dict[str, Any]]]) -> None:
    """Put back what ``save_states`` recorded."""
    for metric, state in saved:
        drop = getattr(metric, "_drop_pending", None)
        if callable(drop):
            drop()  # counts pending since the save are dropped with the states
        for name, value in state.items():
            current = getattr(metric, name, None)
            if isinstance(value, list) and isinstance(current, list):
                current[:] = value  # keep the list object: a MetricCollection's compute group may share it
            else:
                setattr(metric, name, value)
