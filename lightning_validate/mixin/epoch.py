"""One stage's epoch in the mixin: per-dataloader accumulators that count batches, and the epoch end.

The Lightning hooks stay a few lines each because the state owns the logic. A ``Loader`` is one dataloader's
accumulators of one epoch: its ``update`` counts a batch (the DDP padding cut, the loss terms, the target range, the
metrics, the throttled bar), all on the device. An ``Epoch`` holds the loaders of one stage and ends in steps the
end hook calls in turn: ``reduce`` (the sums across ranks, one collective for all dataloaders), ``values`` (read back
once), ``report`` (non-finite losses and targets out of range, once per epoch, by the ``on_bad_values`` policy),
``close`` (metric states freed, the bar left on the exact values) and ``logged`` (the names to log under). The
``self.log`` call stays in the LightningModule, whose method it is.

Example:
    >>> from torch import nn
    >>> from lightning_validate.metrics.loss_terms import batch_loss
    >>> loader = Loader("val", LossAccumulator("mean"), None, PaddingFilter(None), [], "", Throttle(0.25))
    >>> loss_of = lambda outputs, target, n, is_sum: batch_loss(nn.L1Loss(), outputs, target)
    >>> step = loader.update(torch.zeros(4), torch.ones(4), inputs_of=lambda *_: [], loss_of=loss_of, bar=None)
    >>> epoch = Epoch("val", [loader])
    >>> epoch.values(epoch.reduce(None, torch.device("cpu")), torch.device("cpu"))
    {'val/loss': 1.0}

"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_validate.findings import Policy
from lightning_validate.metrics.accumulators import LossAccumulator, TargetRange
from lightning_validate.metrics.batches import batch_size_of, describe
from lightning_validate.metrics.collectives import released
from lightning_validate.metrics.inputs import fix_code, update_metric
from lightning_validate.metrics.intervals import interval_names
from lightning_validate.metrics.loss_terms import BatchLoss
from lightning_validate.metrics.padding import PaddingFilter, take_first
from lightning_validate.metrics.perplexity import PPL, perplexity
from lightning_validate.metrics.states import local_value
from lightning_validate.metrics.uncertainty import EvaluationIntervals
from lightning_validate.mixin import messages
from lightning_validate.mixin.bars import RunningBar
from lightning_validate.progress import Throttle

__all__ = ["Epoch", "Loader", "Totals", "data_parallel_group"]

#: The warning torchmetrics gives for ``compute`` without ``update``: a rank whose share was all padding has no
#: update, and the synced value still covers all ranks.
_NO_UPDATE = ".*was called before the ``update`` method.*"


@dataclass
class Loader:
    """One dataloader's accumulators in one epoch, all on the device until the epoch ends."""

    stage: str
    loss: LossAccumulator
    targets: TargetRange | None
    padding: PaddingFilter
    metrics: list[tuple[str, Metric]]
    suffix: str  # "" for one dataloader, else "/dataloader_idx_<i>" or "/<the user's name>"
    throttle: Throttle
    defaults: frozenset[str] = frozenset()  # the default metrics here, whose input shapes the first batch checks
    num_classes: int | None = None
    intervals: EvaluationIntervals | None = None  # with `confidence`: the intervals' states (metrics/uncertainty.py)
    reduced: Tensor | None = field(default=None, repr=False)  # their states summed over the ranks, at the end
    # Built once per epoch, not per batch: the names the hook gets and the keys errors name.
    _names: list[str] = field(init=False, repr=False)
    _keys: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._names = [name for name, _ in self.metrics]
        self._keys = [f"{self.stage}/{name}{self.suffix}" for name in self._names]

    def update(
        self,
        outputs: Any,
        target: Any,
        *,
        inputs_of: Callable[[list[str], Any, Any], list[tuple[Any, ...]]],
        loss_of: Callable[[Any, Any, int, bool], BatchLoss],
        bar: RunningBar | None,
    ) -> Tensor | None:
        """Count one batch; return its loss (``None`` if it was all DDP padding). No host-device sync.

        ``inputs_of(names, outputs, target)`` gives each metric's ``update`` arguments (the ``metric_inputs``
        hook), ``loss_of(outputs, target, n, is_sum)`` the batch's loss terms (``compute_loss``). The bar reads
        the running values back only when the throttle's interval has passed.
        """
        n = batch_size_of(target)
        if n is None:
            n = batch_size_of(outputs)
            if n is None:
                raise TypeError(f"Cannot tell the batch size: `target` is {describe(target)}. {messages.UNPACK_HINT}")
        keep = self.padding.keep(n)
        if keep < n:  # only a rank's last batch can hold DDP padding; cut it with plain ints, no mask
            if keep == 0:
                return None
            outputs, target = take_first(outputs, n, keep), take_first(target, n, keep)
        if isinstance(outputs, Tensor) and isinstance(target, Tensor) and outputs.shape[:1] != target.shape[:1]:
            raise ValueError(messages.shape_error(outputs, target))
        inputs = inputs_of(self._names, outputs, target) if self.metrics else []
        if self.defaults:
            self._check_defaults(inputs, outputs, target)
            self.defaults = frozenset()  # once per epoch
        batch = loss_of(outputs, target, keep, self.loss.reduction == "sum")
        self.loss.add(batch)
        if self.targets is not None and isinstance(target, Tensor):
            self.targets.update(target)
        for (_, metric), key, args in zip(self.metrics, self._keys, inputs, strict=True):
            update_metric(metric, args, key=key, outputs=outputs, target=target, fix=messages.hook_fix)
        if self.intervals is not None:
            self.intervals.update(outputs, target, inputs, batch, keep)
        if bar is not None and self.throttle.due():
            _show_running(bar, self)
        return batch.step_loss

    def real(self, inputs: Any, target: Any) -> tuple[Any, Any]:
        """A batch before its forward, without the samples DistributedSampler repeated: the forward sees real ones.

        Then a loss the model computes itself (``outputs.loss``) covers the real samples only, and ``update`` has
        nothing left to cut. A batch that is all repeats is kept whole: the forward runs on every rank (FSDP gathers
        parameters in it), and ``update`` then counts nothing of it. Plain ints, as in ``update``: no sync.
        """
        if self.padding.limit is None:
            return inputs, target
        n = batch_size_of(target)
        if n is None:
            return inputs, target
        keep = self.padding.peek(n)
        if keep in (0, n):
            return inputs, target
        return take_first(inputs, n, keep), take_first(target, n, keep)

    def _check_defaults(self, inputs: list[tuple[Any, ...]], outputs: Any, target: Any) -> None:
        """The default accuracy takes class scores in dimension 1 and integer targets; else the fix, as code."""
        for (name, _), args in zip(self.metrics, inputs, strict=True):
            if name not in self.defaults or len(args) != 2:
                continue
            preds, labels = args
            if (
                isinstance(preds, Tensor)
                and isinstance(labels, Tensor)
                and preds.ndim >= 2
                and preds.shape[1] == self.num_classes
                and labels.shape == preds.shape[:1] + preds.shape[2:]
                and not labels.is_floating_point()
            ):
                continue
            tensors = isinstance(preds, Tensor) and isinstance(labels, Tensor)
            fix = "" if tensors else fix_code(outputs, target, messages.hook_fix)  # the code, for the raw outputs
            raise ValueError(messages.default_metric_error(self.num_classes, preds, labels, fix))

    def sums(self, device: torch.device) -> Tensor:
        """``(loss sum, weight, non-finite batches, batches, batches with bad targets)`` as float64."""
        if self.targets is None:
            bad = torch.zeros(1, dtype=torch.float64, device=device)
        else:
            bad = self.targets.summary(device)[0].to(device=device, dtype=torch.float64)
        return torch.cat([self.loss.summary(device).to(device), bad])

    def extremes(self, device: torch.device) -> Tensor:
        """``(-smallest, largest)`` target outside the range (int64), for a max across ranks."""
        if self.targets is None:
            return torch.full((2,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
        return self.targets.summary(device)[1].to(device)


@dataclass(frozen=True)
class Totals:
    """One dataloader's epoch, summed over the ranks: read back to the host once for all dataloaders."""

    total: float
    weight: float
    nonfinite: float
    batches: float
    bad: float  # batches with targets outside [0, num_classes)
    low: float  # the smallest target outside the range
    high: float  # the largest


@dataclass
class Epoch:
    """One open epoch of one stage: its loaders, and the bar that shows their running values."""

    stage: str
    loaders: list[Loader] = field(default_factory=list)
    bar: RunningBar | None = None  # the TQDM or Rich bar showing running values
    perplexity: bool = False  # also `{stage}/ppl`: exp of the epoch loss (the mixin's `log_perplexity`)
    #: The batch's loss terms ``(outputs, target, n, is_sum) -> BatchLoss``, chosen once for the epoch (``None``:
    #: the LightningModule's general path, per batch).
    loss_of: Callable[[Any, Any, int, bool], BatchLoss] | None = None
    bounds: set[str] = field(default_factory=set)  # the logged names that are interval bounds (not on the bar)

    def reduce(self, trainer: Any, device: torch.device) -> list[Totals]:
        """Sum the loaders' accumulators across ranks (one collective, plus one max for the target extremes).

        The intervals' states, when there are any, ride in the same sum: one collective for all of them.
        """
        sums = torch.stack([loader.sums(device) for loader in self.loaders])
        extremes = torch.stack([loader.extremes(device) for loader in self.loaders])
        packs = [loader.intervals.pack(device).to(sums.dtype) for loader in self.loaders
                 if loader.intervals is not None]
        flat = torch.cat([sums.flatten(), *packs]) if packs else sums
        if trainer is not None and trainer.world_size > 1:
            # Sums of sums and counts: exact. Over the data-parallel replicas only: the ranks of one
            # tensor-parallel group saw the same samples.
            group = data_parallel_group(trainer.strategy)
            sent = [flat, extremes]
            flat = trainer.strategy.reduce(flat, group=group, reduce_op="sum")
            extremes = trainer.strategy.reduce(extremes, group=group, reduce_op="max")
            released([*sent, flat, extremes])  # nothing left in gloo's thread for a worker's exit (collectives.py)
        if packs:
            parts = flat.split([sums.numel(), *(p.numel() for p in packs)])
            sums = parts[0].reshape(sums.shape)
            with_intervals = [loader for loader in self.loaders if loader.intervals is not None]
            for loader, part in zip(with_intervals, parts[1:], strict=True):
                loader.reduced = part
        else:
            sums = flat
        return [
            Totals(total, weight, nonfinite, batches, bad, -neg_low, high)
            for (total, weight, nonfinite, batches, bad), (neg_low, high) in zip(
                sums.tolist(), extremes.tolist(), strict=True
            )
        ]

    def values(self, totals: list[Totals], device: torch.device) -> dict[str, float]:
        """The epoch's values to log, ``{"val/loss": ..., "val/acc": ...}``; the metrics read back together."""
        values: dict[str, float] = {}
        keys: list[str] = []
        tensors: list[Tensor] = []
        for loader, sums in zip(self.loaders, totals, strict=True):
            if sums.batches == 0:  # nothing counted (a custom step that did not call update_metrics)
                continue
            values[f"{self.stage}/loss{loader.suffix}"] = loss = loader.loss.value(sums.total, sums.weight)
            if self.perplexity:
                values[f"{self.stage}/{PPL}{loader.suffix}"] = perplexity(loss)
            for name, metric in loader.metrics:
                key = f"{self.stage}/{name}{loader.suffix}"
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_NO_UPDATE)
                    value = metric.compute()
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(messages.not_scalar(key, metric, value))
                keys.append(key)
                tensors.append(value.detach().reshape(()).to(device=device, dtype=torch.float64))
        if tensors:
            values.update(zip(keys, torch.stack(tensors).tolist(), strict=True))
        for loader, sums in zip(self.loaders, totals, strict=True):
            if loader.intervals is not None and loader.reduced is not None and sums.batches:
                values.update(self._intervals(loader, loader.intervals, loader.reduced, values))
        return values

    def _intervals(self, loader: Loader, tracker: EvaluationIntervals, reduced: Tensor,
                   values: Mapping[str, float]) -> dict[str, float]:
        """``val/<name>_low`` and ``val/<name>_high`` of one dataloader's values (``metrics/uncertainty.py``)."""
        own = {name: values[f"{self.stage}/{name}{loader.suffix}"] for name in ("loss", *loader._names, "ppl")
               if f"{self.stage}/{name}{loader.suffix}" in values}
        out: dict[str, float] = {}
        for name, (low, high) in tracker.finish(reduced, own).items():
            low_key, high_key = interval_names(f"{self.stage}/{name}{loader.suffix}")
            out[low_key], out[high_key] = low, high
        self.bounds.update(out)
        return out

    def interval_warnings(self) -> list[str]:
        """Why some values have no interval (each once): unsupported metrics, losses without per-sample terms."""
        texts = [t for loader in self.loaders if loader.intervals is not None for t in loader.intervals.warnings]
        return list(dict.fromkeys(texts))

    def report(self, totals: list[Totals], values: Mapping[str, float], on_bad_values: str) -> None:
        """Warn or raise (``on_bad_values``), once for the epoch, about non-finite losses and targets out of range."""
        problems: list[str] = []
        for loader, sums in zip(self.loaders, totals, strict=True):
            if sums.batches == 0:
                continue
            key = f"{self.stage}/loss{loader.suffix}"
            mean = loader.loss.reduction == "mean"
            problem = messages.bad_values(self.stage, key, values[key], sums.weight, sums.nonfinite, sums.batches, mean)
            if problem is not None:
                problems.append(problem)
            if sums.bad:
                problems.append(messages.bad_targets(
                    self.stage, loader.suffix, sums.bad, sums.batches, loader.num_classes, sums.low, sums.high
                ))
        if problems:
            policy = Policy.parse(on_bad_values)
            assert policy is not None  # checked when the metrics were configured
            policy.apply("; ".join(problems) + ".", error=ValueError, warn=lambda text: rank_zero_warn(
                text + " Set `on_bad_values = 'raise'` to stop instead.", category=UserWarning))

    def logged(self, values: Mapping[str, float]) -> dict[str, float]:
        """The values under the names they are logged as: ``train/loss`` becomes ``train/loss_epoch``.

        ``train/loss`` is the per-step value ``training_step`` logs; the history keeps the epoch's as ``train/loss``.
        """
        rename = self.stage == "train"
        return {f"{k}_epoch" if rename and k.startswith("train/loss") else k: v for k, v in values.items()}

    def close(self, values: Mapping[str, float]) -> None:
        """Free the metric states until the next epoch and leave the bar on the last dataloader's exact values."""
        with torch.inference_mode(False):
            for loader in self.loaders:  # list states (e.g. AUROC's scores) can be large
                for _, metric in loader.metrics:
                    metric.reset()
        if self.bar is not None and self.loaders:
            suffix = self.loaders[-1].suffix
            prefix = f"{self.stage}/"
            self.bar.finish({
                k[len(prefix) : len(k) - len(suffix)]: v
                for k, v in values.items()
                if k.startswith(prefix) and k.endswith(suffix) and k not in self.bounds
            })
        self.bar = None

    def finished_train_values(self, trainer: Any, device: torch.device) -> dict[str, float]:
        """The loss and metric values so far, reduced across ranks; nothing logged, nothing reset."""
        values: dict[str, float] = {}
        for loader in self.loaders:
            sums = loader.loss.summary(device).to(device)
            if trainer.world_size > 1:
                sent = sums
                sums = trainer.strategy.reduce(sums, reduce_op="sum")
                released([sent, sums])
            total, count = sums[:2].tolist()
            if count == 0:
                continue
            values[f"{self.stage}/loss{loader.suffix}"] = total / count
            for name, metric in loader.metrics:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_NO_UPDATE)
                    values[f"{self.stage}/{name}{loader.suffix}"] = float(metric.compute())
        return values


def data_parallel_group(strategy: object) -> Any:
    """The process group of the data-parallel replicas when it is not the whole world, else ``None`` (the world).

    ``ModelParallelStrategy`` with tensor parallelism gives every rank of a tensor-parallel group the same samples
    (its sampler's ``num_replicas`` is the data-parallel size): summing over the world would count each sample once
    per tensor-parallel rank.
    """
    try:
        mesh = getattr(strategy, "device_mesh", None)  # ModelParallelStrategy's, once set up
    except RuntimeError:  # accessed before the strategy set it up
        return None
    if mesh is None or "data_parallel" not in (getattr(mesh, "mesh_dim_names", None) or ()):
        return None
    data_parallel = mesh["data_parallel"]
    if data_parallel.size() == mesh.size():
        return None
    return data_parallel.get_group()


def _show_running(bar: RunningBar, loader: Loader) -> None:
    """Put this dataloader's running loss and metrics on the bar: one read-back from the device."""
    names: list[str] = []
    values: list[Tensor] = []
    loss = loader.loss.running_value()
    if loss is not None:
        names.append("loss")
        values.append(loss.to(torch.float64))
    for name, metric in loader.metrics:
        value = local_value(metric)
        if value is not None:
            names.append(name)
            values.append(value.to(device=loss.device if loss is not None else value.device, dtype=torch.float64))
    if values:
        bar.show(dict(zip(names, torch.stack(values).tolist(), strict=True)))
