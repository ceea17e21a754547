"""The exact terms of a loss that code the library does not see into computed: the loss call its value came from.

Language-model code reshapes or shifts before it calls the loss, in a ``compute_loss`` (``ValidationMixin``) or a
``criterion=`` callable (``validate()``)::

    self.criterion(outputs.flatten(0, 1), target.flatten())                     # nn.CrossEntropyLoss(), -100 padding
    F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())     # the causal shift

What comes back is a mean over the tokens that are not ignored, and their number varies from batch to batch with
the padding: weighted by the batch size, as a value the library cannot see into is, the epoch loss would depend on
the batch size. ``recorded_terms(compute, outputs, target, is_sum=...)`` runs ``compute(outputs, target)`` while a
``TorchFunctionMode`` records the calls to torch's loss functions (every ``torch.nn`` loss module calls one:
``nn.CrossEntropyLoss`` calls ``F.cross_entropy``). When the value returned is the very tensor one of those calls
returned (identity, not equality), that call's arguments give its exact terms (``loss_terms.call_terms``: the
count of tokens not ignored, a float32 recomputation for a bfloat16 value) and the value stays the step's loss.
Otherwise (no loss call, or a new tensor: the sum of two calls, a call times a factor, a ``.float()`` of one) the
terms are ``None`` and the caller reads the value as before (``loss_terms.value_terms``).

The mode sees only the torch calls made inside ``compute`` (a few per batch, microseconds each), never the forward;
nothing is read back from the device.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> logits, labels = torch.randn(2, 4, 10), torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    >>> def causal(logits, labels):
    ...     return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    >>> value, terms = recorded_terms(causal, logits, labels, is_sum=False)
    >>> terms.value is value, terms.weight.item()  # the step's loss as it came; 2 tokens scored, not 2 samples
    (True, 2)

"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_validate.metrics.loss_terms import BatchLoss, LossPlan, loss_plan

__all__ = ["recorded_terms"]

#: Torch's loss functions whose ``reduction="mean"`` denominator ``call_terms`` knows, with the loss module that
#: calls each one with its own attributes as keyword arguments.
_MODULE_OF: dict[Callable[..., Any], type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.nll_loss: nn.NLLLoss,
    F.mse_loss: nn.MSELoss,
    F.l1_loss: nn.L1Loss,
    F.smooth_l1_loss: nn.SmoothL1Loss,
    F.huber_loss: nn.HuberLoss,
    F.binary_cross_entropy: nn.BCELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
    F.kl_div: nn.KLDivLoss,
    F.poisson_nll_loss: nn.PoissonNLLLoss,
    F.hinge_embedding_loss: nn.HingeEmbeddingLoss,
    F.soft_margin_loss: nn.SoftMarginLoss,
    F.multilabel_soft_margin_loss: nn.MultiLabelSoftMarginLoss,
    F.multilabel_margin_loss: nn.MultiLabelMarginLoss,
    F.multi_margin_loss: nn.MultiMarginLoss,
}

#: The deprecated reduction arguments: a call that sets them is not read (its reduction is spelled another way).
_LEGACY = ("size_average", "reduce")

#: The plans of loss modules built for calls without tensor arguments, by class and arguments: one per distinct call.
_PLANS: dict[tuple[Any, ...], LossPlan | None] = {}
_MAX_PLANS = 64


class _LossCalls(TorchFunctionMode):
    """Records ``(function, args, kwargs, result)`` of each call to a loss function in ``_MODULE_OF``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = {} if kwargs is None else kwargs
        out = func(*args, **kwargs)  # the mode is off inside: the loss function's own torch calls are not seen
        if func in _MODULE_OF:
            self.calls.append((func, args, kwargs, out))
        return out


def recorded_terms(
    compute: Callable[[Any, Any], Any], outputs: Any, target: Any, *, is_sum: bool
) -> tuple[Any, BatchLoss | None]:
    """Call ``compute(outputs, target)``; return its value and the exact terms of the loss call it returned, if any.

    The terms are those of the recorded call whose result *is* the value (``call_terms`` on the arguments that call
    saw), or ``None``: when no call returned it, when torch's terms of that call are unknown (``reduction="none"``,
    class probabilities of ``LinearCrossEntropyLoss``, the deprecated ``size_average``/``reduce``), or when the
    call's reduction is not the caller's (``is_sum``: the epoch is a sum, so a mean is read as before, and vice
    versa).
    """
    recorder = _LossCalls()
    with recorder:
        value = compute(outputs, target)
    if not recorder.calls or not isinstance(value, Tensor):
        return value, None
    for func, args, kwargs, out in reversed(recorder.calls):  # the last call returned: the usual `return loss`
        if out is value:
            return value, _terms(func, args, kwargs, value, is_sum)
    return value, None


def _terms(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], value: Tensor,
           is_sum: bool) -> BatchLoss | None:
    """``call_terms`` for one recorded call, through the loss module that makes the same call."""
    names = _parameters(func)
    # The call succeeded, so its arguments bind to the function's parameters: by position, then by name.
    arguments = dict(zip(names, args, strict=False))  # fewer positional arguments than parameters
    arguments.update(kwargs)
    if (arguments.get("reduction", "mean") == "sum") != is_sum:
        return None
    outputs, target = arguments.get(names[0]), arguments.get(names[1])
    if not isinstance(outputs, Tensor) or not isinstance(target, Tensor) or value.ndim != 0:
        return None
    plan = _plan(func, arguments, names)
    return None if plan is None else plan.terms(outputs, target, value)


@cache
def _parameters(func: Callable[..., Any]) -> tuple[str, ...]:
    """The loss function's parameter names, input and target first."""
    return tuple(inspect.signature(func).parameters)


@cache
def _init_parameters(func: Callable[..., Any]) -> frozenset[str]:
    """What the loss module of ``func`` takes in ``__init__``, but the deprecated reduction arguments."""
    return frozenset(inspect.signature(_MODULE_OF[func].__init__).parameters) - {"self", *_LEGACY}


def _plan(func: Callable[..., Any], arguments: dict[str, Any], names: tuple[str, ...]) -> LossPlan | None:
    """How to read the terms of the loss module whose forward makes this call; ``None`` if no module makes it.

    ``mse_loss(weight=...)`` is such a call. Kept per distinct call without tensor arguments: a batch builds nothing.
    """
    cls = _MODULE_OF[func]
    accepted = _init_parameters(func)
    init: dict[str, Any] = {}
    tensors = False
    for name, given in arguments.items():
        if name == names[0] or name == names[1]:
            continue
        if name in _LEGACY:
            if given is not None:
                return None
        elif name in accepted:
            init[name] = given
            tensors = tensors or isinstance(given, Tensor)
        elif given is not None:  # an argument the module lacks (the functional `weight` of mse_loss, l1_loss)
            return None
    if tensors:  # class weights: built for this call, never kept (a tensor's id can be reused)
        return loss_plan(cls(**init))
    key = (cls, *sorted(init.items()))
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable argument: built for this call
        return loss_plan(cls(**init))
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = loss_plan(cls(**init))
    return plan
