"""``paired_comparison``: is checkpoint B better than A on this validation set, beyond the noise of its sampling?

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(400, 5), torch.randint(0, 3, (400,))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    >>> a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    >>> report = paired_comparison(a, b, loader, criterion=nn.CrossEntropyLoss(),
    ...                            metrics={"acc": MulticlassAccuracy(3, average="micro")}, progress=False)
    >>> [row.name for row in report.rows], report["acc"].method.startswith("McNemar")
    (['loss', 'acc'], True)

"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_validate.metrics.intervals import Intervals, intervals_from
from lightning_validate.metrics.loss_terms import LossTerms
from lightning_validate.metrics.paired import PairedReport, compare_records
from lightning_validate.metrics.records import SampleRecord
from lightning_validate.plain.loop import MetricInputs, Step, _validate

__all__ = ["paired_comparison", "record_samples"]


def record_samples(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    criterion: Callable[[Any, Any], Tensor | LossTerms] | None = None,
    metrics: Mapping[str, Metric] | MetricCollection | None = None,
    step: Step | None = None,
    metric_inputs: MetricInputs | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    confidence: float | Intervals = 0.95,
) -> SampleRecord:
    """``validate()`` with a per-sample record: save it (``record.save(path)``) to compare with another run later.

    Arguments as for ``validate()``; ``confidence`` sets the level, replicates and seed of the intervals (two
    records compare replicate by replicate only with the same seed). The record's ``values`` are ``validate()``'s
    result, intervals included.
    """
    spec = _spec(confidence)
    values, tracker = _validate(model, dataloader, criterion=criterion, metrics=metrics, step=step,
                                metric_inputs=metric_inputs, device=device, progress=progress, desc="Record",
                                confidence=spec)
    assert tracker is not None
    record = tracker.record()
    assert record is not None
    record.values = dict(values)
    return record


def _spec(confidence: float | Intervals) -> Intervals:
    spec = intervals_from(confidence, "argument `confidence`")
    if spec is None:
        raise ValueError("Expected argument `confidence` to be a level such as 0.95 or `Intervals(...)` but got None.")
    return Intervals(spec.confidence, spec.replicates, spec.seed, record=True)


def _shuffles(dataloader: object) -> bool:
    sampler = getattr(dataloader, "sampler", None)
    return isinstance(sampler, torch.utils.data.RandomSampler) or bool(getattr(sampler, "shuffle", False))


def paired_comparison(
    a: nn.Module | SampleRecord | str | Path,
    b: nn.Module | SampleRecord | str | Path,
    dataloader: Iterable[Any] | None = None,
    *,
    criterion: Callable[[Any, Any], Tensor | LossTerms] | None = None,
    metrics: Mapping[str, Metric] | MetricCollection | None = None,
    step: Step | None = None,
    metric_inputs: MetricInputs | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    confidence: float | Intervals = 0.95,
) -> PairedReport:
    """Compare two models (or checkpoints' records) on the same samples: per value, B - A, its interval, p-values.

    ``a`` and ``b`` are either two models, evaluated here on ``dataloader`` with the same ``criterion`` and
    ``metrics`` (arguments as for ``validate()``), or two ``SampleRecord`` (or paths to saved ones) from separate
    runs: ``record_samples`` in plain PyTorch, ``ValidationMixin.sample_record`` with
    ``confidence = Intervals(record=True)`` in Lightning, or ``python -m lightning_validate.paired``.

    Per value (``metrics.paired``): McNemar's exact test for accuracy-like values, the paired t-test (delta method
    for ratios) for losses, MAE and MSE, the paired Poisson bootstrap on shared weights for the rest; p-values
    Holm-adjusted over the values. ``str(report)`` is a table.

    Raises:
        ValueError: if models come without a dataloader, the dataloader shuffles (the two passes would pair
            different samples), or the records do not cover the same samples.
        TypeError: if ``a`` and ``b`` are not two models or two records.
    """
    spec = _spec(confidence)
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        if dataloader is None:
            raise ValueError("Expected a `dataloader` to evaluate the two models on but got None: "
                             "`paired_comparison(model_a, model_b, val_loader, criterion=..., metrics=...)`.")
        if _shuffles(dataloader):
            raise ValueError(
                "Expected a dataloader that yields the samples in the same order each time (a paired comparison "
                "pairs them by position) but it shuffles. Pass a loader with `shuffle=False`."
            )
        kwargs: dict[str, Any] = dict(criterion=criterion, metrics=metrics, step=step, metric_inputs=metric_inputs,
                                      device=device, progress=progress, confidence=spec)
        first = record_samples(a, dataloader, **kwargs)
        second = record_samples(b, dataloader, **kwargs)
        return compare_records(first, second, spec.confidence)
    return compare_records(_record(a, "a"), _record(b, "b"), spec.confidence)


def _record(value: object, name: str) -> SampleRecord:
    if isinstance(value, SampleRecord):
        return value
    if isinstance(value, (str, Path)):
        return SampleRecord.load(value)
    raise TypeError(
        f"Expected argument `{name}` to be a model (with the other a model too), a `SampleRecord` or the path of a "
        f"saved one but got {type(value).__name__}."
    )
