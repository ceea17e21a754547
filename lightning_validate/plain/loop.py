"""``validate()``: the usual hand-written validation loop for plain PyTorch, done right.

The usual hand-written loop (``model.eval()``, ``torch.no_grad()``, a tqdm bar with running loss and accuracy, then
``model.train()``; shown in ``docs/rules.md``) averages batch means (wrong whenever the last batch is smaller),
advances its bar by ``dataloader.batch_size`` (overshooting on the last batch), calls ``.item()`` twice per batch
(two host-device synchronizations per batch on a GPU), calls ``model.train()`` at the end (un-freezing every
submodule that was in eval on purpose) and leaves the model in eval mode when a batch raises. ``validate()`` keeps
its shape (a tqdm bar "Valid" with running values) and fixes all five:

- the loss is the criterion applied once to the whole set, ``criterion(cat(outputs), cat(targets))``, from a sum
  and a weight per batch kept on the device (exact also for ``CrossEntropyLoss(weight=..., ignore_index=...)``);
- metrics are torchmetrics objects, which accumulate exact epoch statistics;
- the bar counts samples, advances by each batch's real size and reads running values at most four times per
  second, so nothing synchronizes with the device per batch;
- the model runs under ``evaluating()``: every submodule gets back its own mode, and grad mode comes back, also
  when a batch raises.

Example:
    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout())
    >>> result = validate(model, loader, criterion=torch.nn.CrossEntropyLoss(),
    ...                   metrics={"accuracy": MulticlassAccuracy(num_classes=3)}, progress=False)
    >>> sorted(result), model.training  # plain floats; the model is back in train mode
    (['accuracy', 'loss'], True)

"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from lightning_validate.metrics.accumulators import LossAccumulator, sum_dtype
from lightning_validate.metrics.batches import batch_size_of, describe, to_device, unpack_example
from lightning_validate.metrics.checks import check_metric_dict
from lightning_validate.metrics.inputs import split_inputs, update_metric
from lightning_validate.metrics.intervals import Intervals, intervals_from
from lightning_validate.metrics.loss_calls import recorded_terms
from lightning_validate.metrics.loss_terms import LossMean, LossTerms, loss_plan, value_terms
from lightning_validate.metrics.perplexity import PPL
from lightning_validate.metrics.perplexity import perplexity as perplexity_of
from lightning_validate.metrics.states import restore_states, save_states
from lightning_validate.metrics.uncertainty import EvaluationIntervals
from lightning_validate.plain.context import evaluating
from lightning_validate.plain.intervals import finish_intervals, per_metric, tracker_for
from lightning_validate.progress import DEFAULT_INTERVAL, Throttle, format_postfix

__all__ = ["validate"]

#: ``step(batch, model) -> (outputs, target)``.
Step = Callable[[Any, nn.Module], Sequence[Any]]

#: ``metric_inputs(outputs, target) -> (preds, target)`` for every metric, or ``{name: (preds, target)}``.
MetricInputs = Callable[[Any, Any], Sequence[Any] | Mapping[str, Sequence[Any]]]
_CRITERION = "`criterion(outputs, target)`"

#: Seconds between two reads of the running values for the bar (each read is one host-device synchronization).
_REFRESH_INTERVAL = DEFAULT_INTERVAL

def validate(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    criterion: Callable[[Any, Any], Tensor | LossTerms | LossMean] | None = None,
    metrics: Mapping[str, Metric] | MetricCollection | None = None,
    step: Step | None = None,
    metric_inputs: MetricInputs | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "Valid",
    perplexity: bool = False,
    confidence: float | Intervals | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on every batch of ``dataloader``; return the loss and metrics as plain floats.

    Batches of the form ``(inputs, target)`` (a tuple or list of two) work as they are: ``outputs = model(inputs)``.
    Any other batch (a dict: its keys differ from one dataset to the next, so none are guessed; extra fields;
    several inputs) goes through ``step(batch, model) -> (outputs, target)``;
    ``validate()`` then computes the loss with ``criterion(outputs, target)`` and updates every metric with
    ``metric.update(outputs, target)``, so a step only says how a batch feeds the model, never how to average:

    ```python
    validate(model, loader, criterion=nn.CrossEntropyLoss(),
             step=lambda batch, model: (model(batch["image"]), batch["label"]))
    ```

    The model runs under ``evaluating()``: every submodule in eval mode, and afterwards, also
    when a batch raises, each submodule gets back its own mode (a frozen BatchNorm stays frozen) and grad mode is
    what it was. Without ``step`` the loop runs under ``torch.inference_mode()`` (fastest); with a ``step`` it runs
    under ``torch.no_grad()``, so that the step may open ``with torch.enable_grad():`` for input gradients. (A
    tensor the model creates lazily during the first inference-mode run, a cache or an accumulator, is an inference
    tensor and cannot be updated in place in training later; a ``step`` avoids that too.)

    Batches (tensors inside tuples, lists and dicts) are moved to ``device`` with ``non_blocking=True``; the model
    is not moved: it must already be there. The metrics are: they are modules, moved with ``.to(device)`` and left
    there, as ``model.to()`` would.

    The loss is ``criterion(cat(all outputs), cat(all targets))``: the criterion applied once to the whole
    dataloader (``reduction="sum"``: the sum over it). For every ``torch.nn`` loss module this is exact by
    itself: each batch adds torch's own numerator and denominator (for ``CrossEntropyLoss(weight=w,
    ignore_index=i)``, ``sum(w[y])`` over the targets not ignored; a batch with every target ignored adds nothing).
    Any other criterion is exact when it returns what a torch loss call inside it returned (``lambda logits, y:
    F.cross_entropy(logits.flatten(0, 1), y.flatten())``: that call's own denominator, the tokens not ignored), one
    loss per sample (or per element: each counts once), ``LossTerms(sum, weight)`` or ``LossMean(mean, weight)``;
    any other 0-dim value is weighted by the batch size (the first dimension of ``target``), which is exact only for
    a mean over samples (``docs/losses.md``, ``docs/language-models.md``). Sums stay on the device until the end.

    The metrics are reset when ``validate()`` starts (a metric that was updated before, during training, would
    otherwise mix in training data) and are left holding this run's states, so ``metric.compute()`` afterwards
    gives the returned value again and per-class or plotted results can be read from them. If ``validate()`` raises,
    the metrics get back the states they had before the call.

    Nothing is read back from the device per batch: the bar's running values (loss and metrics, computed with
    ``metric.compute()``) are read at most four times per second, and the results once at the end. When
    ``torch.distributed`` is initialized the bar shows the loss only (``compute()`` would start a collective that
    other processes do not join at the same moment); the returned metrics are synchronized by torchmetrics, the loss
    is this process's.

    Args:
        model: the model (a ``torch.compile``d or DDP-wrapped module is fine).
        dataloader: any iterable of batches, usually a ``torch.utils.data.DataLoader``.
        criterion: a ``torch.nn`` loss module, e.g. ``nn.CrossEntropyLoss(ignore_index=255)``, or any
            ``criterion(outputs, target)`` returning the batch mean, one loss per sample, ``LossTerms`` or
            ``LossMean``. Its value over the whole dataloader is returned as ``"loss"``.
        metrics: a dict of torchmetrics ``Metric`` objects or a ``MetricCollection``; results keep their names.
        step: ``step(batch, model) -> (outputs, target)`` for batches that are not ``(inputs, target)``. It gets
            the batch already on ``device``.
        metric_inputs: ``metric_inputs(outputs, target)`` returns what the metrics take, when the model's outputs
            are not (the criterion still gets ``outputs`` and ``target``): a tuple, the arguments of every
            metric's ``update`` (``lambda outputs, target: (outputs[0], target[0])`` for a forward that returns
            ``(logits, aux)`` and a target ``(y, weight)``), or a dict from metric name to that metric's arguments
            (one metric per head; needs ``metrics`` as a dict). Default: ``(outputs, target)``.
        device: where batches go; default: the device of the model's first parameter or buffer (CPU if none).
        progress: show a tqdm bar counting samples, with the running values in its postfix.
        desc: the bar's label.
        perplexity: also return ``"ppl"``, ``exp`` of the exact loss over the whole dataloader (the perplexity of
            the set for a token-mean cross-entropy; never a mean of batch perplexities). Needs a mean ``criterion``.
        confidence: a confidence level (``0.95``) or ``Intervals(...)``: every value also gets its interval, as
            ``"<name>_low"`` and ``"<name>_high"`` (``docs/uncertainty.md``: which method for which value). A value
            without one is named in a warning. Default ``None``: no intervals, and nothing extra per batch.

    Returns:
        ``{"loss": ..., "ppl": ..., <metric name>: ...}`` as Python floats: ``"loss"`` when a criterion is given,
        ``"ppl"`` with ``perplexity=True``, one entry per metric (a metric that computes a dict, such as
        ``ClasswiseWrapper``, adds one entry per key); with ``confidence``, ``"<name>_low"`` and ``"<name>_high"``
        after them.

    Raises:
        TypeError: if ``metrics`` are not torchmetrics objects, a batch cannot be unpacked as ``(inputs, target)``,
            ``step`` does not return ``(outputs, target)``, the criterion returns neither a float tensor nor
            ``LossTerms``/``LossMean``, ``perplexity`` is not a bool, ``metric_inputs`` returns something else than
            a tuple or a dict of tuples, a metric fails on inputs that are not tensors (the message gives the
            ``metric_inputs`` to write), or a metric computes something other than a scalar.
        ValueError: if neither ``criterion`` nor ``metrics`` is given, a metric is named ``"loss"`` next to a
            criterion (or ``"ppl"`` with ``perplexity``), ``perplexity`` has no mean criterion, two results share a
            name, the dataloader yields no batch, the criterion returns a per-sample loss whose first dimension is
            not the batch size, or ``confidence`` is not a level.

    """
    return _validate(model, dataloader, criterion=criterion, metrics=metrics, step=step, metric_inputs=metric_inputs,
                     device=device, progress=progress, desc=desc, perplexity=perplexity, confidence=confidence)[0]


def _validate(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    criterion: Callable[[Any, Any], Tensor | LossTerms | LossMean] | None,
    metrics: Mapping[str, Metric] | MetricCollection | None,
    step: Step | None,
    metric_inputs: MetricInputs | None,
    device: torch.device | str | None,
    progress: bool,
    desc: str,
    perplexity: bool = False,
    confidence: float | Intervals | None = None,
) -> tuple[dict[str, float], EvaluationIntervals | None]:
    """``validate()``, and the tracker of its intervals (for a per-sample record); arguments as there."""
    spec = intervals_from(confidence, "argument `confidence`")
    collection, metric_list = _check_metrics(metrics, with_criterion=criterion is not None)
    _check_perplexity(perplexity, criterion, metric_list)
    if criterion is None and collection is None and not metric_list:
        raise ValueError(
            "validate() has nothing to compute: expected `criterion` or `metrics` but got neither. Pass one, e.g. "
            "`validate(model, loader, criterion=nn.CrossEntropyLoss(), "
            "metrics={'accuracy': MulticlassAccuracy(num_classes=10)})`."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module but got {type(model).__name__}.")
    if step is not None and not callable(step):
        raise TypeError(
            f"Expected argument `step` to be a callable `step(batch, model) -> (outputs, target)` but got "
            f"{type(step).__name__}."
        )
    if metric_inputs is not None and not callable(metric_inputs):
        raise TypeError(
            "Expected argument `metric_inputs` to be a callable `metric_inputs(outputs, target) -> (preds, target)` "
            f"but got {describe(metric_inputs)}. Pass e.g. "
            "`metric_inputs=lambda outputs, target: (outputs[0], target)`."
        )
    if _known_len(dataloader) == 0:
        raise ValueError(_EMPTY)
    target_device = torch.device(device) if device is not None else _model_device(model)

    # Bad arguments were rejected above, before anything was touched; from here on an error restores the metrics.
    roots: list[Metric | MetricCollection] = [collection] if collection is not None else [m for _, m in metric_list]
    for root in roots:
        root.to(target_device)
    saved = save_states(roots)
    named: list[tuple[str | None, Any]] = [(None, collection)] if collection is not None else list(metric_list)
    tracker = tracker_for(spec, named, criterion, dataloader) if spec is not None else None
    bar = None
    try:
        for root in roots:
            root.reset()  # outside inference mode, so the fresh states are normal tensors
        if progress:
            bar = tqdm(total=_num_samples(dataloader), desc=desc, unit=" samples")
        with evaluating(model, inference_mode=step is None):
            loss = _run(model, dataloader, criterion, named, step, target_device, bar, metric_inputs, perplexity,
                        tracker)
            values = _values(loss, named, perplexity)
            if tracker is not None:
                values.update(finish_intervals(tracker, values, target_device))
        if bar is not None:
            bar.set_postfix(format_postfix(values), refresh=False)
        return values, tracker
    except BaseException:
        restore_states(saved)
        raise
    finally:
        if bar is not None:
            bar.close()


_EMPTY = (
    "validate() got no batches: expected a dataloader that yields at least one batch but it yielded none. Check "
    "that the dataset is not empty and, with `drop_last=True`, that it holds at least `batch_size` samples."
)


def _run(
    model: nn.Module,
    dataloader: Iterable[Any],
    criterion: Callable[[Any, Any], Tensor | LossTerms | LossMean] | None,
    named: list[tuple[str | None, Any]],
    step: Step | None,
    device: torch.device,
    bar: Any,
    metric_inputs: MetricInputs | None = None,
    with_perplexity: bool = False,
    tracker: EvaluationIntervals | None = None,
) -> LossAccumulator | None:
    """Run the batch loop: on-device sums only; the host learns batch sizes from shapes, never from values."""
    throttle = Throttle(_REFRESH_INTERVAL)
    show_metrics = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    loss = None
    if criterion is not None:
        loss = LossAccumulator("sum" if getattr(criterion, "reduction", "mean") == "sum" else "mean")
    plan = loss_plan(criterion)  # a torch loss: its own value, with its numerator's denominator beside it
    seen = 0
    for batch in dataloader:
        batch = to_device(batch, device)
        if step is None:
            inputs, target = _unpack(batch)
            outputs = model(inputs)
        else:
            outputs, target = _check_step_result(step(batch, model))
        n = _batch_size(target, outputs)
        terms = None
        if loss is not None:
            assert criterion is not None
            terms = plan(outputs, target) if plan is not None else None
            if terms is None:  # any other callable: the terms of the torch loss call it returns, if any
                value, terms = recorded_terms(criterion, outputs, target, is_sum=loss.reduction == "sum")
                if terms is None:
                    terms = value_terms(value, n, is_sum=loss.reduction == "sum", what=_CRITERION)
            loss.add(terms)
        args = _update_metrics(named, outputs, target, metric_inputs)
        if tracker is not None:
            tracker.update(outputs, target, per_metric(named, args), terms, n)
        seen += n
        if bar is not None:
            if throttle.due():
                running = _values(loss, named if show_metrics else [], with_perplexity)
                bar.set_postfix(format_postfix(running), refresh=False)
            bar.update(n)
    if seen == 0:
        raise ValueError(_EMPTY)
    return loss


# --------------------------------------------------------------------------------------------------------------
# Arguments


def _check_metrics(
    metrics: object, *, with_criterion: bool
) -> tuple[MetricCollection | None, list[tuple[str, Metric]]]:
    """Split ``metrics`` into a collection or a list of metrics, rejecting anything else before touching it."""
    if metrics is None:
        return None, []
    if isinstance(metrics, MetricCollection):
        return metrics, []
    items = check_metric_dict(metrics, what="argument `metrics`", example="`metrics={}`")
    if with_criterion and any(name == "loss" for name, _ in items):
        raise ValueError(
            "Expected metric names other than 'loss' when a `criterion` is given ('loss' is the criterion's "
            "result) but got `metrics['loss']`. Rename it, e.g. `metrics={'my_loss': ...}`."
        )
    return None, items


def _check_perplexity(perplexity: object, criterion: object, metrics: list[tuple[str, Metric]]) -> None:
    if not isinstance(perplexity, bool):
        raise TypeError(f"Expected argument `perplexity` to be True or False but got {perplexity!r}.")
    if not perplexity:
        return
    if criterion is None or getattr(criterion, "reduction", "mean") == "sum":
        got = "no `criterion`" if criterion is None else "a `criterion` with `reduction='sum'`"
        raise ValueError(
            f"Expected a mean `criterion` with `perplexity=True` (perplexity is `exp` of the mean token loss) but got "
            f"{got}. Pass e.g. `validate(model, loader, criterion=nn.CrossEntropyLoss(), perplexity=True)`."
        )
    if any(name == PPL for name, _ in metrics):
        raise ValueError(
            "Expected metric names other than 'ppl' with `perplexity=True` ('ppl' is the criterion's perplexity) but "
            "got `metrics['ppl']`. Rename it, e.g. `metrics={'my_ppl': ...}`."
        )


def _known_len(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:  # no __len__, or an IterableDataset loader
        return None


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _num_samples(dataloader: object) -> int | None:
    """Count the samples a ``DataLoader`` will yield, when it tells without iterating; else ``None``."""
    if not isinstance(dataloader, torch.utils.data.DataLoader) or dataloader.batch_size is None:
        return None  # a plain iterable, or a custom batch_sampler whose batch sizes are unknown
    if isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
        return None
    try:
        if dataloader.drop_last:
            return len(dataloader) * dataloader.batch_size
        return len(dataloader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Batches


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    inputs, target = unpack_example(batch)
    raise TypeError(
        f"validate() expected each batch to be `(inputs, target)` (a tuple or list of 2) but got {describe(batch)}. "
        f"Say how a batch feeds the model with `step`: "
        f"`validate(model, loader, ..., step=lambda batch, model: (model({inputs}), {target}))`."
    )


def _check_step_result(result: Any) -> tuple[Any, Any]:
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result[0], result[1]
    raise TypeError(
        f"Expected `step(batch, model)` to return `(outputs, target)` but it returned {describe(result)}. "
        "Return the model's outputs and the target; validate() computes the loss and metrics from them: "
        "`def step(batch, model): return model(batch['x']), batch['y']`."
    )


def _batch_size(target: Any, outputs: Any) -> int:
    """Count a batch's samples from shapes (host metadata): the target's batch size, else the outputs'."""
    for obj in (target, outputs):
        size = batch_size_of(obj)
        if size is not None:
            return size
    raise TypeError(
        f"validate() counts samples by the first dimension of the target but got target {describe(target)} and "
        f"outputs {describe(outputs)}. Return a target with a batch dimension, e.g. `target.reshape(-1)`."
    )


def _update_metrics(
    named: list[tuple[str | None, Any]], outputs: Any, target: Any, metric_inputs: MetricInputs | None
) -> list[tuple[Any, ...]]:
    """Update every metric with what ``metric_inputs`` returned (default: ``(outputs, target)``); return that."""
    if not named:
        return []
    if metric_inputs is None:
        inputs = [(outputs, target)] * len(named)
    else:
        result = metric_inputs(outputs, target)
        if isinstance(result, Mapping) and named[0][0] is None:
            raise TypeError(
                "Expected `metrics` as a dict `{name: Metric}` when `metric_inputs` returns the inputs of each metric "
                "by name, but got a `MetricCollection` (which updates all its members with the same inputs). Pass "
                "`metrics={'acc_a': MulticlassAccuracy(num_classes=10), 'acc_b': ...}`."
            )
        inputs = split_inputs(result, [name or "" for name, _ in named], hook="`metric_inputs(outputs, target)`")
    for (name, metric), args in zip(named, inputs, strict=True):
        update_metric(metric, args, key=name or type(metric).__name__, outputs=outputs, target=target, fix=_fix)
    return inputs


def _fix(outputs: str, target: str) -> str:
    return (
        "pass `metric_inputs` to validate() (a dict from metric name to its inputs gives each metric its own): "
        f"`validate(model, loader, ..., metric_inputs=lambda outputs, target: ({outputs}, {target}))`."
    )


# --------------------------------------------------------------------------------------------------------------
# Values


def _values(
    loss: LossAccumulator | None, named: list[tuple[str | None, Any]], with_perplexity: bool = False
) -> dict[str, float]:
    """Compute the loss (and its perplexity) and every metric, and read them back to the host together."""
    values: dict[str, Tensor | float] = {}
    running = loss.running_value() if loss is not None else None
    if running is not None:
        values["loss"] = running
        if with_perplexity:
            values[PPL] = 0.0  # its place in the results, after the loss; the value follows from the loss's
    for name, metric in named:
        computed = metric.compute()
        _merge(values, computed if name is None else {name: computed})
    host = _to_host(values)
    if PPL in host and with_perplexity:
        host[PPL] = perplexity_of(host["loss"])
    return host


def _merge(values: dict[str, Tensor | float], computed: Mapping[str, Any]) -> None:
    """Add computed values by name; a metric computing a dict (``ClasswiseWrapper``) adds one entry per key."""
    for name, value in computed.items():
        if isinstance(value, Mapping):
            _merge(values, value)
            continue
        if name in values:
            raise ValueError(f"Expected unique result names but two results are named {name!r}. Rename a metric.")
        if isinstance(value, Tensor) and value.numel() != 1:
            raise TypeError(
                f"Expected metric {name!r} to compute a scalar but it computed a tensor of shape "
                f"{tuple(value.shape)}. Average it (e.g. `MulticlassAccuracy(num_classes=10, average='macro')`) or "
                f"name each element: `ClasswiseWrapper(MulticlassAccuracy(num_classes=10, average=None))`."
            )
        if not isinstance(value, (Tensor, int, float)):
            raise TypeError(
                f"Expected metric {name!r} to compute a scalar but it computed {type(value).__name__}. Pass metrics "
                "that compute scalars (or a dict of scalars)."
            )
        values[name] = value


def _to_host(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Every value as a Python float, with one device-to-host copy per device."""
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append(name)
    for dev, names in by_device.items():
        dtype = sum_dtype(dev)
        stacked = torch.stack([values[n].detach().reshape(()).to(dtype) for n in names])  # type: ignore[union-attr]
        out.update(zip(names, stacked.tolist(), strict=True))
    return {k: out[k] for k in values}
