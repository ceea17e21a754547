"""What the metrics take: the result of a ``metric_inputs`` hook, handed to each metric, and errors that name it.

A model's outputs are not always what a metric takes: a forward may return ``(logits, aux)``, a target may carry
per-sample weights ``(y, w)``, a two-head model wants one metric per head. A ``metric_inputs(outputs, target)``
hook (Hugging Face's ``preprocess_logits_for_metrics`` plays the same part) returns either

- a tuple, the positional arguments of every metric's ``update``: ``return outputs[0], target[0]``; or
- a mapping from metric name to that metric's arguments: ``return {"acc_a": (a, y_a), "acc_b": (b, y_b)}``.

Nothing here reads a tensor's value: dispatching costs no host-device synchronization.

Example:
    >>> import torch
    >>> split_inputs({"a": (1, 2), "b": (3, 4)}, ["a", "b"], hook="`metric_inputs`")
    [(1, 2), (3, 4)]
    >>> split_inputs((torch.zeros(2), torch.ones(2)), ["a"], hook="`metric_inputs`")[0][1]
    tensor([1., 1.])
    >>> fix_code(("logits", "aux"), {"y": 1, "w": 2}, lambda o, t: f"return {o}, {t}")
    "return outputs[0], target['y']"

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from torchmetrics import Metric

from lightning_validate.metrics.batches import describe

__all__ = ["METRIC_ERRORS", "fix_code", "split_inputs", "update_metric"]

#: What a metric's ``update`` raises on inputs it cannot take (torchmetrics reads ``.ndim`` of a tuple: AttributeError).
METRIC_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError)


def split_inputs(result: Any, names: Sequence[str], *, hook: str) -> list[tuple[Any, ...]]:
    """One tuple of ``update`` arguments per metric in ``names``, from what ``hook`` returned.

    Raises:
        TypeError: if the result is neither a tuple/list nor a mapping, or a mapping's value is not a tuple/list.
        ValueError: if a mapping's keys are not exactly ``names``.

    """
    if isinstance(result, Mapping):
        if len(result) != len(names) or any(n not in result for n in names):
            missing = [n for n in names if n not in result]
            extra = [k for k in result if k not in names]
            raise ValueError(
                f"Expected {hook} to return the inputs of each metric by name, {list(names)!r}, but got "
                f"{'missing ' + repr(missing) if missing else ''}{' and ' if missing and extra else ''}"
                f"{'unknown ' + repr(extra) if extra else ''}. Return one `(preds, target)` per metric: "
                f"`return {{{', '.join(f'{n!r}: (preds, target)' for n in names)}}}`."
            )
        out = []
        for name in names:
            args = result[name]
            if not isinstance(args, (tuple, list)):
                raise TypeError(
                    f"Expected {hook} to map metric {name!r} to a tuple `(preds, target)` but got {describe(args)}. "
                    f"Return e.g. `{{{name!r}: (preds, target)}}`."
                )
            out.append(tuple(args))
        return out
    if isinstance(result, (tuple, list)):
        args = tuple(result)
        return [args] * len(names)
    raise TypeError(
        f"Expected {hook} to return a tuple `(preds, target)` for every metric, or a dict from metric name to its "
        f"`(preds, target)`, but got {describe(result)}."
    )


def _expression(obj: object, name: str) -> str:
    """An expression that takes the first tensor-like part out of ``obj``, for a fix written as code."""
    if isinstance(obj, Mapping) and obj:
        return f"{name}[{next(iter(obj))!r}]"
    if isinstance(obj, (tuple, list)) and obj:
        return f"{name}[0]"
    return name


def fix_code(outputs: object, target: object, template: Callable[[str, str], str]) -> str:
    """``template(outputs_expr, target_expr)``: the code that hands a metric tensors taken out of the structures."""
    return template(_expression(outputs, "outputs"), _expression(target, "target"))


def update_metric(
    metric: Metric | Any,
    args: tuple[Any, ...],
    *,
    key: str,
    outputs: object,
    target: object,
    fix: Callable[[str, str], str],
) -> None:
    """``metric.update(*args)``; on failure, re-raise with the metric's name, what it got and the fix as code.

    ``outputs`` and ``target`` are the model's (before the hook), used to write the fix; ``fix`` turns two
    expressions into that code (the mixin's method, or ``validate()``'s keyword argument).
    """
    try:
        metric.update(*args)
    except METRIC_ERRORS as err:
        labels = ("outputs" if args and args[0] is outputs else "preds", "target")  # the model's own, or the hook's
        got = " and ".join(f"{label} {describe(a)}" for label, a in zip(labels, args, strict=False))
        if len(args) > 2:
            got += f" (and {len(args) - 2} more)"
        text = f"Metric `{key}` ({type(metric).__name__}) failed on {got}: {err}"
        if all(isinstance(a, Tensor) for a in args):
            raise type(err)(text) from err
        raise TypeError(
            f"{text}. A metric takes tensors; to hand it the tensors inside the model's outputs and target, "
            f"{fix_code(outputs, target, fix)}"
        ) from err
