"""The loss over a whole evaluation set, accumulated batch by batch: a sum and a weight per batch.

Torch defines ``reduction="mean"`` per criterion, and for several it is not a mean over samples:
``CrossEntropyLoss(weight=w, ignore_index=i)`` divides ``sum(w[y] * l)`` over the elements not ignored by
``sum(w[y])`` over the same elements; ``KLDivLoss(reduction="batchmean")`` divides the sum by the batch size;
``MSELoss`` by the number of elements. So the loss of a set is ``criterion(cat(outputs), cat(targets))`` only
when each batch contributes its numerator and its denominator, and the epoch value is
``sum(numerators) / sum(denominators)`` (``reduction="sum"``: the sum of the numerators).

``batch_loss(criterion, outputs, target)`` returns a batch's value (what the criterion returns, for the step
and for backward) and its weight, with at most one extra operation on the device and never a host-device sync:
no ``.item()``, no branch on tensor values, no boolean-mask indexing. ``sample_terms`` splits the same
numerator and denominator per sample, for code that must drop single samples.

Known criteria: every loss module of ``torch.nn`` called as ``criterion(outputs, target)`` (see ``docs/losses.md``).
A criterion that takes three inputs (``MarginRankingLoss``, ``CosineEmbeddingLoss``, ``TripletMarginLoss``,
``TripletMarginWithDistanceLoss``, ``GaussianNLLLoss``, ``CTCLoss``), a subclass that overrides ``forward``, a
criterion with forward hooks, and any other callable are not seen into: ``batch_loss`` returns ``None`` and the
caller uses what the criterion returns (``value_terms``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> criterion = nn.CrossEntropyLoss(ignore_index=255)
    >>> batches = [(torch.randn(2, 3, 4), torch.tensor([[0, 1, 255, 2], [1, 255, 255, 0]])),
    ...            (torch.randn(1, 3, 4), torch.tensor([[255, 255, 255, 2]]))]
    >>> total = weight = 0.0
    >>> for outputs, target in batches:
    ...     batch = batch_loss(criterion, outputs, target)  # the batch mean, over `weight` pixels not ignored
    ...     total, weight = total + batch.value.item() * batch.weight.item(), weight + batch.weight.item()
    >>> whole = criterion(torch.cat([o for o, _ in batches]), torch.cat([t for _, t in batches]))
    >>> abs(total / weight - whole.item()) < 1e-6, weight
    (True, 6.0)

"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["BatchLoss", "LossTerms", "batch_loss", "known", "sample_terms", "value_terms"]


class LossTerms(NamedTuple):
    """A batch's share of an exact epoch loss: the epoch value is ``sum of sum / sum of weight`` over the batches.

    Return it from ``compute_loss`` (``ValidationMixin``) or from a ``criterion`` (``validate()``) when the loss
    is a weighted mean that is not a mean over samples, e.g. a masked per-pixel loss:

    ```python
    def compute_loss(self, outputs, target):
        per_pixel = F.cross_entropy(outputs, target, ignore_index=255, reduction="none")  # (N, H, W), 0 if void
        return LossTerms(sum=per_pixel.sum(), weight=(target != 255).sum())
    ```

    Attributes:
        sum: the batch's numerator, a 0-dim tensor (it may carry gradients: the training step gets
            ``sum / weight``).
        weight: the batch's denominator, a 0-dim tensor or a number; a batch of weight 0 adds nothing.
    """

    sum: Tensor
    weight: Tensor | float


class BatchLoss(NamedTuple):
    """One batch: ``value`` is the batch's loss (a mean over ``weight``, or a sum), ``weight`` its denominator.

    With ``is_sum`` the value is a numerator: the batch adds ``value`` (and ``weight``) to the epoch sums;
    otherwise it adds ``value * weight`` (0 when ``weight`` is 0, where ``value`` is nan). ``loss`` is what a
    step returns (for backward) when it is not ``value``.
    """

    value: Tensor
    weight: Tensor | float
    is_sum: bool = False
    loss: Tensor | None = None

    @property
    def step_loss(self) -> Tensor:
        """The batch's loss as the criterion defines it: what a training or evaluation step returns."""
        return self.value if self.loss is None else self.loss


#: The reduction="mean" denominator of a criterion's batch, from shapes only: ``(criterion, outputs, target)``.
_Count = Callable[[Any, Tensor, Tensor], int]


def _broadcast(criterion: Any, outputs: Tensor, target: Tensor) -> int:
    """Number of elements of the unreduced loss: input, target and any weight broadcast together."""
    shapes = [outputs.shape, target.shape]
    for name in ("weight", "pos_weight"):
        extra = getattr(criterion, name, None)
        if isinstance(extra, Tensor):
            shapes.append(extra.shape)
    return math.prod(torch.broadcast_shapes(*shapes))


def _per_row(criterion: Any, outputs: Tensor, target: Tensor) -> int:
    """Losses with one value per sample over the last dimension (classes): ``(N, C) -> (N,)``."""
    return math.prod(torch.broadcast_shapes(outputs.shape, target.shape)[:-1]) if outputs.ndim else 1


def _multi_margin(criterion: Any, outputs: Tensor, target: Tensor) -> int:
    return max(1, target.numel()) if outputs.ndim <= 1 else outputs.shape[0]


def _kl_div(criterion: Any, outputs: Tensor, target: Tensor) -> int:
    if criterion.reduction == "batchmean":  # the sum over the batch size (torch: the sum for a 0-dim input)
        return outputs.shape[0] if outputs.ndim else 1
    return math.prod(torch.broadcast_shapes(outputs.shape, target.shape))


#: Criteria whose mean divides by a count known from shapes; the value is the criterion's own result.
_COUNTED: dict[Callable[..., Any], _Count] = {
    nn.MSELoss.forward: _broadcast,
    nn.L1Loss.forward: _broadcast,
    nn.SmoothL1Loss.forward: _broadcast,
    nn.HuberLoss.forward: _broadcast,
    nn.BCELoss.forward: _broadcast,
    nn.BCEWithLogitsLoss.forward: _broadcast,
    nn.PoissonNLLLoss.forward: _broadcast,
    nn.HingeEmbeddingLoss.forward: _broadcast,
    nn.SoftMarginLoss.forward: _broadcast,
    nn.KLDivLoss.forward: _kl_div,
    nn.MultiLabelSoftMarginLoss.forward: _per_row,
    nn.MultiLabelMarginLoss.forward: _per_row,
    nn.MultiMarginLoss.forward: _multi_margin,
}

#: Criteria whose class-index mean divides by ``sum(weight[y])`` over the targets not ignored.
_CLASS_INDEX = (nn.CrossEntropyLoss.forward, nn.NLLLoss.forward)


def _linear_ce() -> tuple[Callable[..., Any], ...]:
    cls = getattr(nn, "LinearCrossEntropyLoss", None)  # new in torch 2.13
    return (cls.forward,) if cls is not None else ()


_LINEAR_CE = _linear_ce()

#: Reductions whose result is one number per batch; "none" is not one.
_REDUCTIONS = ("mean", "sum", "batchmean")


def _forward_of(criterion: object) -> Callable[..., Any] | None:
    """The criterion's ``forward`` when the library may compute its terms: a torch loss, no hooks, no override."""
    if not isinstance(criterion, nn.Module) or criterion._forward_hooks or criterion._forward_pre_hooks:
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    if getattr(criterion, "reduction", None) not in _REDUCTIONS:
        return None
    forward = type(criterion).forward
    return forward if forward in _COUNTED or forward in _CLASS_INDEX or forward in _LINEAR_CE else None


def known(criterion: object) -> bool:
    """Whether ``batch_loss`` computes exact terms for ``criterion`` (else it returns ``None``)."""
    return _forward_of(criterion) is not None


def batch_loss(criterion: object, outputs: Any, target: Any) -> BatchLoss | None:
    """Return the batch's loss and its weight, or ``None`` for a criterion the library does not see into.

    The value equals ``criterion(outputs, target)`` (for ``CrossEntropyLoss``/``NLLLoss`` the same operations
    torch runs, with the denominator torch computes alongside); the weight is its ``reduction="mean"``
    denominator: a count from shapes, or a device tensor (``sum(weight[y])`` over the targets not ignored). No
    host-device sync, and the criterion is never modified.
    """
    forward = _forward_of(criterion)
    if forward is None or not isinstance(outputs, Tensor) or not isinstance(target, Tensor):
        return None
    assert isinstance(criterion, nn.Module)
    c: Any = criterion  # one of torch's loss modules: its attributes are known by the forward found above
    is_sum = c.reduction == "sum"
    if forward in _CLASS_INDEX and not target.is_floating_point() and (
        forward is nn.NLLLoss.forward or c.label_smoothing == 0
    ):  # the common case first: class indices, no label smoothing
        return _nll(c, outputs, target, log_softmax=forward is nn.CrossEntropyLoss.forward)
    count = _COUNTED.get(forward)
    if count is not None:
        value = criterion(outputs, target)
        return BatchLoss(value, count(criterion, outputs, target), is_sum)
    if forward in _LINEAR_CE:  # the outputs are features: only class indices have a denominator known here
        if target.is_floating_point():
            return None
        return BatchLoss(criterion(outputs, target), _class_weight(c, target).sum(), is_sum)
    if target.is_floating_point():  # class probabilities: the mean over the elements, weights not normalized
        value = criterion(outputs, target)
        return BatchLoss(value, outputs.numel() // outputs.shape[1] if outputs.ndim > 1 else 1, is_sum)
    if forward is nn.CrossEntropyLoss.forward and c.label_smoothing > 0:
        # reduction="none" gives the numerator per element (torch's own mean goes through a masked_select, a sync)
        per_element = F.cross_entropy(
            outputs, target, weight=c.weight, ignore_index=c.ignore_index, reduction="none",
            label_smoothing=c.label_smoothing,
        )
        total = per_element.sum()
        if is_sum:
            return BatchLoss(total, 0, True)
        weight = _class_weight(criterion, target).sum()
        return BatchLoss(total, weight, True, total / weight)
    raise AssertionError(f"unreachable: {criterion!r}")  # every forward in _forward_of is handled above


# The ATen operators F.nll_loss runs (its 1-2 dim and 4 dim cases); they also return the total weight, which F drops.
_NLL_FORWARD = torch.ops.aten.nll_loss_forward.default
_NLL2D_FORWARD = torch.ops.aten.nll_loss2d_forward.default


def _nll(criterion: Any, outputs: Tensor, target: Tensor, *, log_softmax: bool) -> BatchLoss | None:
    """``cross_entropy``/``nll_loss`` as torch runs them, keeping the total weight torch computes and drops."""
    nd = outputs.ndim
    if (
        nd == 0
        or (nd >= 2 and (target.ndim == 0 or target.shape[0] != outputs.shape[0]))
        or ((nd == 3 or nd > 4) and target.shape != outputs.shape[:1] + outputs.shape[2:])
    ):  # shapes torch rejects with a message of its own; the operators check the remaining cases themselves
        return _fallback(criterion, outputs, target)
    logp = F.log_softmax(outputs, 1 if nd >= 2 else 0) if log_softmax else outputs
    reduction = 2 if criterion.reduction == "sum" else 1  # torch's enum: 1 mean, 2 sum
    if nd <= 2:
        value, total = _NLL_FORWARD(logp, target, criterion.weight, reduction, criterion.ignore_index)
    else:
        if nd != 4:  # torch's nll_loss_nd views (N, C, d1, ...) as (N, C, 1, d1 * ...)
            n, c = logp.shape[:2]
            logp, target = logp.contiguous().view(n, c, 1, -1), target.contiguous().view(n, 1, -1)
        value, total = _NLL2D_FORWARD(logp, target, criterion.weight, reduction, criterion.ignore_index)
    return BatchLoss(value, total, reduction == 2)


def _fallback(criterion: Any, outputs: Tensor, target: Tensor) -> BatchLoss | None:
    criterion(outputs, target)  # shapes torch rejects: let the criterion raise its own error
    return None


def _class_weight(criterion: Any, target: Tensor) -> Tensor:
    """Per target element: ``weight[y]`` (1 without class weights), 0 where ``y == ignore_index``."""
    ignore = criterion.ignore_index if criterion.ignore_index is not None else -100
    kept = target != ignore
    weight: Tensor | None = criterion.weight
    if weight is None:
        return kept
    return weight.take(target.masked_fill(~kept, 0)) * kept


def value_terms(value: Any, batch_size: int, *, is_sum: bool = False, what: str = "the loss function") -> BatchLoss:
    """Read what a ``compute_loss``/criterion the library cannot see into returned for a batch of ``batch_size``.

    - ``LossTerms(sum, weight)``: exact, as given;
    - a tensor with a leading batch dimension (per sample, or per element): every value counts once, so the epoch
      value is the mean of all of them;
    - a 0-dim tensor: the batch mean (or the batch sum when ``is_sum``), weighted by ``batch_size``: exact only when
      the loss is a mean over samples.

    Raises:
        TypeError: for anything else (``what`` names the source in the message).
        ValueError: when the leading dimension is not ``batch_size``.
    """
    if isinstance(value, LossTerms):
        total, weight = value
        if not isinstance(total, Tensor) or total.ndim != 0 or not total.is_floating_point():
            raise TypeError(f"Expected `LossTerms.sum` from {what} to be a 0-dim float tensor but got "
                            f"{_describe(total)}.")
        if isinstance(weight, Tensor) and weight.ndim == 0:
            pass
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"Expected `LossTerms.weight` from {what} to be a 0-dim tensor or a number but got "
                            f"{_describe(weight)}.")
        return BatchLoss(total, weight, True, total / weight)
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"Expected {what} to return a float tensor (the batch mean or one loss per sample) or "
            f"`LossTerms(sum, weight)` but got {_describe(value)}."
        )
    if value.ndim == 0:
        return BatchLoss(value, batch_size, is_sum)
    if value.shape[0] != batch_size:
        raise ValueError(
            f"Expected a per-sample loss of first dimension {batch_size} (the batch size) but got shape "
            f"{tuple(value.shape)}. Return the batch mean (a 0-dim tensor), one loss per sample, or "
            "`LossTerms(sum, weight)`."
        )
    return BatchLoss(value.sum(), value.numel(), True, value.mean())


def sample_terms(criterion: nn.Module, outputs: Tensor, target: Tensor) -> LossTerms:
    """Split a known criterion's numerator and denominator per sample: two float64 tensors of shape ``(N,)``.

    ``sum(terms.sum) / sum(terms.weight)`` over any set of samples is the criterion's ``reduction="mean"`` value on
    them (``reduction="sum"``: ``sum(terms.sum)``), so single samples (a ``DistributedSampler``'s padding) can be
    masked out. Costs a ``reduction="none"`` call; the criterion is copied, never modified.

    Raises:
        TypeError: if ``batch_loss`` does not know the criterion.
    """
    forward = _forward_of(criterion)
    if forward is None:
        raise TypeError(f"Expected a torch loss module called as `criterion(outputs, target)` but got {criterion!r}.")
    n = outputs.shape[0]
    unreduced = _copy_with(criterion, "none")(outputs, target)
    per_sample = unreduced.reshape(n, -1).sum(1, dtype=torch.float64)
    weight: Tensor
    if forward in _CLASS_INDEX or forward in _LINEAR_CE:
        if target.is_floating_point():
            weight = torch.full((n,), unreduced[0].numel(), dtype=torch.float64, device=per_sample.device)
        else:
            weight = _class_weight(criterion, target).reshape(n, -1).sum(1, dtype=torch.float64)
    elif forward is nn.KLDivLoss.forward and criterion.reduction == "batchmean":
        weight = torch.ones(n, dtype=torch.float64, device=per_sample.device)
    else:
        weight = torch.full((n,), unreduced[0].numel(), dtype=torch.float64, device=per_sample.device)
    return LossTerms(per_sample, weight)


def _copy_with(criterion: nn.Module, reduction: str) -> nn.Module:
    clone = copy.copy(criterion)  # shares parameters and buffers; the attribute set below is the copy's own
    object.__setattr__(clone, "reduction", reduction)
    return clone


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"
