"""Checks of the metrics a user passes: a dict of torchmetrics objects or a ``MetricCollection``, each a scalar.

Example:
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> check_metrics({"acc": MulticlassAccuracy(3, average=None)})
    Traceback (most recent call last):
    ...
    ValueError: Metric `acc` from `configure_metrics()` is not a scalar: `MulticlassAccuracy(average=None)` \
returns one value per class: use `MulticlassAccuracy(..., average='macro')`.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torchmetrics import Metric, MetricCollection

from lightning_validate.metrics.batches import describe

__all__ = ["check_metric_dict", "check_metrics"]


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
