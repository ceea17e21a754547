"""``FastMulticlassAccuracy``: the default metric of ``ValidationMixin``, micro accuracy with a cheap ``update``.

Example:
    >>> default_metrics(10)
    {'acc': FastMulticlassAccuracy()}

"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate.metrics.slots import Slots

__all__ = ["FastMulticlassAccuracy", "default_metrics"]


class FastMulticlassAccuracy(MulticlassAccuracy):
    """``MulticlassAccuracy(num_classes, average="micro", validate_args=False)`` with a cheaper ``update``.

    Same states, same ``compute``, same cross-process reduction. ``update`` does one ``argmax``, one comparison
    and one sum, and keeps the count on the device; the four states get the pending counts, in place, every few
    hundred batches and before anything reads them (``compute``, ``sync``, ``forward``, ``merge_state``,
    ``state_dict``, ``.to()``). torchmetrics' own update builds the four states out of place through
    ``nn.Module.__setattr__`` on every batch: about 4x the per-batch cost on a CPU. Micro accuracy needs no
    ``bincount``, so no sync on CUDA. Inputs are not validated per batch:
    ``ValidationMixin`` checks their shapes itself and counts out-of-range targets on the device.

    Example:
        >>> fast, reference = FastMulticlassAccuracy(3), MulticlassAccuracy(3, average="micro")
        >>> preds, target = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]), torch.tensor([0, 2, 2])
        >>> fast.update(preds, target); reference.update(preds, target)
        >>> fast.compute().item() == reference.compute().item(), [fast.tp.item(), fast.fp.item(), fast.tn.item()]
        (True, [2, 1, 5])
        >>> fast.update(preds, target); fast.tp.item()  # pending until something reads the states through the metric
        2

    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes, average="micro", validate_args=False, **kwargs)
        self._drop_pending()

    def _wrap_update(self, update: Callable[..., None]) -> Callable[..., None]:
        """Do what torchmetrics' wrapper does, minus its cost: no grad context, no ``nn.Module.__setattr__``.

        No grad context is needed: ``argmax`` and ``==`` build no graph. The two bookkeeping attributes are plain
        ones, so writing them to ``__dict__`` is what ``nn.Module.__setattr__`` would do, without its checks.
        torchmetrics calls this in ``__init__`` and again when a clone is unpickled.
        """
        if self.compute_on_cpu:
            return super()._wrap_update(update)

        @functools.wraps(update)
        def wrapped(*args: Any, **kwargs: Any) -> None:
            attrs = self.__dict__
            attrs["_computed"] = None
            attrs["_update_count"] += 1
            update(*args, **kwargs)

        return wrapped

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` as scores ``(N, C, ...)`` or labels ``(N, ...)``, ``target`` as labels."""
        if not isinstance(self.tp, Tensor) or self.top_k != 1 or self.ignore_index is not None:
            super().update(preds, target)
            return
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        attrs = self.__dict__
        if "_pending" not in attrs:  # a clone unpickled by an older release
            self._drop_pending()
        pending: Slots = attrs["_pending"]
        pending.add((preds == target).sum())
        attrs["_pending_samples"] += target.numel()
        if pending.full:
            self._flush()

    def _drop_pending(self) -> None:
        """Forget the counts not yet added to the states (per-batch correct counts on the device, and samples)."""
        self.__dict__["_pending"] = Slots(torch.int64)
        self.__dict__["_pending_samples"] = 0

    def _flush(self) -> None:
        """Add the pending per-batch counts to the four states (before anything reads them)."""
        pending: Slots | None = self.__dict__.get("_pending")
        counts = pending.take() if pending is not None else None
        if counts is None or self.num_classes is None:
            return
        correct = counts.sum()
        n = self.__dict__["_pending_samples"]
        self.__dict__["_pending_samples"] = 0
        names = ("tp", "fp", "fn", "tn")
        states: list[Tensor] = [getattr(self, name) for name in names]
        if states[0].is_inference() and not torch.is_inference_mode_enabled():
            # States made under inference_mode cannot be changed in place outside it: rebuild them once.
            with torch.inference_mode(False):
                states = [t.clone() for t in states]
            for name, state in zip(names, states, strict=True):
                setattr(self, name, state)
        tp, fp, fn, tn = states
        # tp += c; fp += n - c; fn += n - c; tn += (C - 2) * n + c (= C * n - tp - fp - fn, torchmetrics' count)
        torch._foreach_add_([tp, tn], correct)
        torch._foreach_add_([fp, fn], correct, alpha=-1)
        torch._foreach_add_([fp, fn, tn], [n, n, (self.num_classes - 2) * n])

    # Everything that reads, moves, merges or clears the states brings them up to date first.

    def compute(self) -> Tensor:
        """Micro accuracy of everything updated so far."""
        self._flush()
        return super().compute()

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Flush, then gather the states across processes (torchmetrics' ``sync``)."""
        self._flush()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        """Forget everything, pending counts included."""
        self._drop_pending()
        super().reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Flush, then torchmetrics' ``forward`` (batch value, accumulated)."""
        self._flush()
        return super().forward(*args, **kwargs)

    def merge_state(self, incoming_state: Any) -> None:
        """Flush both sides, then torchmetrics' ``merge_state``."""
        self._flush()
        if isinstance(incoming_state, FastMulticlassAccuracy):
            incoming_state._flush()
        super().merge_state(incoming_state)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._flush()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)


def default_metrics(num_classes: int | None) -> dict[str, Metric]:
    """``{"acc": FastMulticlassAccuracy(num_classes)}`` (micro accuracy), or ``{}`` when ``num_classes`` is ``None``.

    Example:
        >>> default_metrics(10)
        {'acc': FastMulticlassAccuracy()}

    """
    if num_classes is None:
        return {}
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` to be an int >= 2 but got {num_classes!r}.")
    return {"acc": FastMulticlassAccuracy(num_classes)}
