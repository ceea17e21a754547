"""The texts of the mixin's errors and warnings, each saying what was expected, what came, and the fix as code.

Kept apart from the logic that raises them so that a step or an epoch reads as what it does, and so that the
wording of every message the mixin gives can be read (and kept consistent) in one place. Plain functions of the
values a message shows; nothing here raises or warns.

Example:
    >>> never_logged("val", "last")  # doctest: +NORMALIZE_WHITESPACE
    'The last validation epoch was never logged: if you override `on_validation_epoch_end`, call
    `super().on_validation_epoch_end()` in it.'

"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchmetrics import Metric

from lightning_validate.metrics.batches import describe, unpack_example
from lightning_validate.stages import hook_word, log_stage

__all__ = [
    "MISSING_CRITERION",
    "PERPLEXITY_NAME",
    "PERPLEXITY_OF_SUM",
    "UNPACK_HINT",
    "bad_targets",
    "bad_values",
    "criterion_error",
    "default_metric_error",
    "hook",
    "hook_fix",
    "names_error",
    "never_logged",
    "not_scalar",
    "on",
    "outside_epoch",
    "shape_error",
    "unpack_error",
]

MISSING_CRITERION = (
    "`{name}` has no loss: set `self.criterion = nn.CrossEntropyLoss()` in `__init__`, or override "
    "`def compute_loss(self, outputs, target): return F.cross_entropy(outputs, target)`."
)

PERPLEXITY_OF_SUM = (
    "Expected a mean loss with `log_perplexity = True` (perplexity is `exp` of the mean token loss) but "
    "`self.criterion` has `reduction='sum'`. Use `reduction='mean'`, e.g. `nn.CrossEntropyLoss()`, or set "
    "`log_perplexity = False`."
)

PERPLEXITY_NAME = (
    "Expected no metric named 'ppl' with `log_perplexity = True` (the mixin logs `val/ppl` itself) but "
    "`configure_metrics()` returned one. Rename it, e.g. `{'my_ppl': ...}`, or set `log_perplexity = False`."
)

UNPACK_HINT = "Override `unpack_batch(self, batch)` to return `(inputs, target)`."


def hook(stage: str) -> str:
    """The word of ``stage``'s hooks: ``"val"`` -> ``"validation"``."""
    running = log_stage(stage)
    return hook_word(running) if running is not None else stage


def unpack_error(batch: object) -> str:
    """The default ``unpack_batch`` got a batch it cannot split: the override that would, written for this batch."""
    inputs, target = unpack_example(batch)
    return (
        f"`ValidationMixin.unpack_batch` expects a batch `(inputs, target)` (a tuple or list of 2) but got "
        f"{describe(batch)}. Override it in your LightningModule:\n\n"
        f"    def unpack_batch(self, batch):\n        return {inputs}, {target}\n"
    )


def shape_error(outputs: object, target: object) -> str:
    """Outputs and target of different batch sizes."""
    return (
        f"Expected `outputs` and `target` to have the same batch size (first dimension) but got outputs "
        f"{describe(outputs)} and target {describe(target)}. Check `forward` and `unpack_batch`."
    )


def hook_fix(outputs: str, target: str) -> str:
    """The fix for metrics that do not take the raw outputs: a ``metric_inputs`` override, as code."""
    return (
        "override `metric_inputs` in your LightningModule (a dict from metric name to its inputs gives each metric its "
        f"own):\n\n    def metric_inputs(self, outputs, target):\n        return {outputs}, {target}\n"
    )


def not_scalar(key: str, metric: Metric, value: object) -> str:
    """A metric computed more than one value: a logged metric must be a scalar."""
    return (
        f"Metric `{key}` ({type(metric).__name__}) returned {describe(value)}; a logged metric must be a scalar. For "
        "per-class values use `average='macro'` (or 'micro'/'weighted'), or log them yourself."
    )


def outside_epoch(stage: str, dataloader_idx: int, open_: bool) -> str:
    """``update_metrics`` called for a stage or dataloader the mixin did not open an epoch for."""
    if log_stage(stage) is None:
        return f"Expected argument `stage` to be 'train', 'val' or 'test' but got {stage!r}."
    if open_:
        return (
            f"`update_metrics({stage!r}, ..., dataloader_idx={dataloader_idx})`: the mixin saw fewer {stage} "
            "dataloaders when the epoch started."
        )
    word = hook(stage)
    return (
        f"`update_metrics({stage!r}, ...)` ran outside a {word} epoch the mixin saw start. If you override "
        f"`on_{word}_epoch_start`, call `super().on_{word}_epoch_start()` in it."
    )


def never_logged(stage: str, which: str) -> str:
    """An epoch opened but never closed: an end hook override without ``super()``."""
    word = hook(stage)
    return (
        f"The {which} {word} epoch was never logged: if you override `on_{word}_epoch_end`, call "
        f"`super().on_{word}_epoch_end()` in it."
    )


def criterion_error(criterion: object, outputs: object, target: object, err: Exception) -> str:
    """The criterion failed on a batch: what it got, and the usual fix for a target with a trailing 1."""
    hint = (
        " If the target has a trailing dimension of 1, return `x, y.squeeze(1)` from `unpack_batch`."
        if isinstance(target, Tensor) and target.ndim >= 2 and target.shape[-1] == 1
        else ""
    )
    return (
        f"`criterion` ({criterion!r}) failed on outputs {describe(outputs)} and target {describe(target)}: "
        f"{err}.{hint}"
    )


def default_metric_error(num_classes: int | None, preds: object, labels: object, fix: str) -> str:
    """The default accuracy got inputs of the wrong shape; ``fix`` is the code when they were not tensors."""
    if not (isinstance(preds, Tensor) and isinstance(labels, Tensor)):
        hint = f"to hand it the tensors inside them, {fix}"
    elif labels.ndim >= 2 and labels.shape[-1] == 1:
        hint = "return `x, y.squeeze(1)` from `unpack_batch`."
    else:
        hint = "for another task return your own metrics from `configure_metrics()`."
    return (
        f"The default metric `MulticlassAccuracy(num_classes={num_classes})` expects outputs of shape "
        f"(N, {num_classes}, ...) (class scores in dimension 1) and integer targets of shape (N, ...), but got "
        f"outputs {describe(preds)} and target {describe(labels)}: {hint}"
    )


def bad_values(stage: str, key: str, loss: float, weight: float, nonfinite: float, batches: float,
               mean: bool) -> str | None:
    """What was wrong with a dataloader's loss in an epoch, if anything."""
    if nonfinite:
        return (
            f"{int(nonfinite)} of {int(batches)} {stage} batches gave a non-finite loss (nan or inf), so "
            f"`{key}` is {loss}. Check the inputs and `compute_loss`"
        )
    if weight == 0 and mean:
        return (
            f"`{key}` is nan: the loss's weight summed to 0 over the {int(batches)} {stage} batches "
            "(every target was `ignore_index`, or every class weight 0)"
        )
    return None


def bad_targets(stage: str, suffix: str, bad: float, batches: float, num_classes: int | None, low: float,
                high: float) -> str:
    """Targets outside ``[0, num_classes)`` in some batches: they count as wrong predictions."""
    return (
        f"{int(bad)} of {int(batches)} {stage} batches{on(suffix)} had targets outside "
        f"[0, {num_classes}) (smallest {int(low)}, largest {int(high)}); they count as wrong "
        "predictions. Check `num_classes` and the labels"
    )


def on(suffix: str) -> str:
    """`` (name)`` for a dataloader's log suffix ``/name``, empty for a single dataloader."""
    return f" ({suffix[1:]})" if suffix else ""


def names_error(stage: str, names: Sequence[str], count: int) -> str:
    """``{stage}_dataloader_names`` with a name count that does not match the dataloaders."""
    return (
        f"Expected attribute `{stage}_dataloader_names` to name each of the {count} {stage} dataloaders "
        f"but got {len(names)} names: {list(names)!r}."
    )


def no_record(stage: str, index: int, kept: list[tuple[str, int]]) -> str:
    """``sample_record`` asked for an epoch that kept no record."""
    have = ", ".join(f"({s!r}, {i})" for s, i in kept) or "none"
    return (
        f"No per-sample record of stage {stage!r}, dataloader {index}: records are kept with "
        "`confidence = Intervals(record=True)` (a class attribute of your LightningModule, or set on the instance "
        f"before `trainer.validate`), for the last epoch of each stage and dataloader. Records kept: {have}."
    )
