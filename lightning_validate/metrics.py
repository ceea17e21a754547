"""Device-side accumulators for exact epoch metrics, and the helpers that keep DDP padding out of them.

Plain torch and torchmetrics, no Lightning: ``ValidationMixin`` uses them, and so can a plain-PyTorch loop.

Three rules make an epoch value exact and cheap:

- the loss is accumulated as ``sum(batch_loss * batch_size)`` and a sample count, so the epoch loss is the
  per-sample mean whatever the size of the last batch;
- nothing is read back to the host per batch: each batch appends one device scalar, folded every few hundred
  batches; non-finite losses and out-of-range targets are counted from those scalars at epoch end;
- the samples that ``DistributedSampler`` repeats to give every rank the same length are not counted. Its padded
  entries are the global positions ``>= len(dataset)``, and rank ``r``'s ``k``-th sample sits at global position
  ``r + k * world_size``, so each rank knows from plain integers how many of its samples are real
  (``real_samples(loader)``) and ``PaddingFilter`` cuts its last batch to them: no mask, no ``nonzero``, no sync.

Example:
    >>> import torch
    >>> acc = LossAccumulator()
    >>> acc.update(torch.tensor(1.0), 3)  # a batch of 3 with mean loss 1
    >>> acc.update(torch.tensor(4.0), 1)  # a last batch of 1 with loss 4
    >>> total, count, nonfinite, batches = acc.summary().tolist()
    >>> total / count  # (3 * 1 + 1 * 4) / 4, not (1 + 4) / 2
    1.75
    >>> f = PaddingFilter(limit=5)  # this rank's sampler yields 6 samples; the last one is padding
    >>> f.keep(4), f.keep(2)
    (4, 1)

"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DistributedSampler
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "FastMulticlassAccuracy",
    "LossAccumulator",
    "PaddingFilter",
    "TargetRange",
    "batch_size_of",
    "check_metric_dict",
    "check_metrics",
    "default_metrics",
    "describe",
    "local_value",
    "real_samples",
    "sum_dtype",
    "take_first",
    "unpack_example",
]

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

#: Device scalars kept per accumulator before they are folded into running sums (bounds memory, amortizes cost).
_FOLD_EVERY = 256


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
                if len(self._means) >= _FOLD_EVERY:
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
        if len(self._parts) >= _FOLD_EVERY:
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
        if len(self._parts) >= _FOLD_EVERY:
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

    def keep(self, n: int) -> int:
        """Advance by a batch of ``n`` samples; return how many of its leading samples are real."""
        start = self.offset
        self.offset = start + n
        if self.limit is None or self.offset <= self.limit:
            return n
        return max(0, self.limit - start)


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
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler = batch_sampler.sampler
    if not isinstance(sampler, DistributedSampler):
        return None
    if f"{type(sampler).__module__}.{type(sampler).__qualname__}" not in _KNOWN_SAMPLERS:
        return None
    if sampler.drop_last:  # truncates instead of padding: nothing repeated
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    world, rank = sampler.num_replicas, sampler.rank
    real = max(0, -(-(size - rank) // world))  # positions rank + k * world < size
    return min(real, sampler.num_samples)


def batch_size_of(obj: Any) -> int | None:
    """Number of samples in a batch's target (or outputs), read from shapes only (no host-device sync).

    - a tensor: its first dimension (``None`` for a 0-dim tensor);
    - a dict: that of its first value with a size (a dict of per-task batch tensors);
    - a list or tuple of tensors whose batch dimensions agree: that dimension (per-task targets, as
      ``default_collate`` gives them; 0-dim tensors are ignored);
    - any other non-empty list or tuple: its length (per-sample items: the dicts of a detection batch, tensors of
      different lengths, strings);
    - anything else: ``None``.

    Example:
        >>> y = torch.zeros(5)
        >>> batch_size_of(y), batch_size_of([y, y]), batch_size_of([{"boxes": torch.zeros(3, 4)}] * 2)
        (5, 5, 2)
    """
    if isinstance(obj, Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    if isinstance(obj, Mapping):
        for value in obj.values():
            size = batch_size_of(value)
            if size is not None:
                return size
        return None
    if isinstance(obj, (list, tuple)) and obj:
        if all(isinstance(item, Tensor) for item in obj):
            sizes = {int(item.shape[0]) for item in obj if item.ndim}
            if len(sizes) == 1:
                return sizes.pop()
        return len(obj)
    return None


def describe(obj: object, depth: int = 0) -> str:
    """Type and structure of a batch or a value, for error messages.

    Example:
        >>> describe((torch.zeros(4, 2), [1, 2], {"x": 1}))
        "a tuple of 3: (Tensor(shape=(4, 2), dtype=float32), a list of 2, a dict with keys ['x'])"

    """
    if obj is None:
        return "None"
    if isinstance(obj, Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={str(obj.dtype).removeprefix('torch.')})"
    if isinstance(obj, Mapping):
        return f"{_article(type(obj).__name__)} with keys {list(obj)!r}"
    if isinstance(obj, (tuple, list)):
        if depth >= 1 or not obj:
            return f"a {type(obj).__name__} of {len(obj)}"
        inner = ", ".join(describe(x, depth + 1) for x in obj[:4])
        return f"a {type(obj).__name__} of {len(obj)}: ({inner}{', ...' if len(obj) > 4 else ''})"
    return _article(type(obj).__name__)


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def unpack_example(batch: object) -> tuple[str, str]:
    """Expressions that take ``(inputs, target)`` out of ``batch``, for the fix an unpack error names.

    Example:
        >>> unpack_example({"image": 1, "label": 2})
        ("batch['image']", "batch['label']")

    """
    if isinstance(batch, Mapping) and len(batch) >= 2:
        keys = list(batch)
        return f"batch[{keys[0]!r}]", f"batch[{keys[1]!r}]"
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return "batch[0]", "batch[1]"
    return "<inputs from batch>", "<target from batch>"


def take_first(obj: Any, n: int, k: int) -> Any:
    """Keep the first ``k`` of ``n`` samples: slice every tensor in ``obj`` whose first dimension is ``n``."""

    def cut(t: Tensor) -> Tensor:
        return t[:k] if t.ndim and t.shape[0] == n else t

    return apply_to_collection(obj, Tensor, cut)


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
        self.__dict__["_pending"] = []  # (correct count, samples) per batch, not yet in the states

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
        pending = self.__dict__.setdefault("_pending", [])
        pending.append(((preds == target).sum(), target.numel()))
        if len(pending) >= _FOLD_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Add the pending per-batch counts to the four states (before anything reads them)."""
        pending = self.__dict__.get("_pending")
        if not pending or self.num_classes is None:
            return
        self.__dict__["_pending"] = []
        correct = torch.stack([c for c, _ in pending]).sum()
        n = sum(k for _, k in pending)
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
        self.__dict__["_pending"] = []
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


def _per_class_hint(metric: Metric) -> str | None:
    """Why ``metric`` would return more than one value, from its configuration, or ``None``."""
    name = type(metric).__name__
    if hasattr(metric, "average") and getattr(metric, "average", "") in (None, "none"):
        return f"`{name}(average={metric.average!r})` returns one value per class: use `{name}(..., average='macro')`"
    if getattr(metric, "multidim_average", "global") == "samplewise":
        return f"`{name}(multidim_average='samplewise')` returns one value per sample: use `multidim_average='global'`"
    return None


def check_metric_dict(metrics: object, *, what: str, example: str) -> list[tuple[str, Metric]]:
    """Check that ``metrics`` is a mapping of names to torchmetrics ``Metric`` objects; return its items.

    ``what`` names the argument in the messages (e.g. "argument `metrics`"); ``example`` is the fix they show,
    a format string with ``{}`` where a dict goes (e.g. "`metrics={}`").

    Raises:
        TypeError: if ``metrics`` is a single ``Metric`` or not a mapping, a name is not a string, or a value is
            not a ``Metric``.

    """
    fix = example.format("{'accuracy': MulticlassAccuracy(num_classes=10)}")
    if isinstance(metrics, Metric):
        name = type(metrics).__name__
        raise TypeError(
            f"Expected {what} to be a dict of torchmetrics `Metric` objects or a `MetricCollection` but got a single "
            f"{name}. Name it: {example.format(f'{{{name.lower()!r}: metric}}')}."
        )
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"Expected {what} to be a dict of torchmetrics `Metric` objects or a `MetricCollection` but got "
            f"{describe(metrics)}. Pass e.g. {fix}."
        )
    for name, metric in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"Expected the names in {what} to be strings but got {name!r}. Pass e.g. {fix}.")
        if not isinstance(metric, Metric):
            if callable(metric) and not isinstance(metric, nn.Module):
                got = (
                    "a function (a function such as `torchmetrics.functional.accuracy` keeps no state across "
                    "batches: use the class, not the functional form)"
                )
            else:
                got = describe(metric)
            raise TypeError(
                f"Expected the value for {name!r} in {what} to be a torchmetrics `Metric` but got {got}. "
                f"Pass e.g. {fix}."
            )
    return list(metrics.items())


def check_metrics(metrics: object, where: str = "configure_metrics()") -> dict[str, Metric]:
    """Validate what ``configure_metrics()`` returned; give a ``{name: Metric}`` dict.

    Accepts a mapping of names to torchmetrics ``Metric`` objects, or a ``MetricCollection`` (flattened to its
    members, with its prefix and postfix applied; compute groups are not used). Each value must be a scalar:
    a metric configured to return one value per class or per sample is refused here, before any data is seen.

    Raises:
        TypeError: if the container or a value is not a torchmetrics object, or a name is not a string.
        ValueError: if a name is empty, contains ``.``, is ``"loss"``, or a metric returns more than one value.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> check_metrics({"acc": MulticlassAccuracy(3, average=None)})
        Traceback (most recent call last):
        ...
        ValueError: Metric `acc` from `configure_metrics()` is not a scalar: `MulticlassAccuracy(average=None)` \
returns one value per class: use `MulticlassAccuracy(..., average='macro')`.

    """
    from torchmetrics import MetricCollection

    items: Sequence[tuple[str, Metric]]
    if isinstance(metrics, MetricCollection):
        items = list(metrics.items(keep_base=False, copy_state=False))
    else:
        items = check_metric_dict(metrics, what=f"the result of `{where}`", example="`return {}`")
    out: dict[str, Metric] = {}
    for name, metric in items:
        if not name or "." in name or name == "loss":
            raise ValueError(
                f"Metric name {name!r} from `{where}` is not usable: names must be non-empty, without '.', and "
                "not 'loss' (the mixin logs the loss itself)."
            )
        hint = _per_class_hint(metric)
        if hint is not None:
            raise ValueError(f"Metric `{name}` from `{where}` is not a scalar: {hint}.")
        out[name] = metric
    return out
