"""The loss over a whole evaluation set, accumulated batch by batch: a sum and a weight per batch.

Torch defines ``reduction="mean"`` per criterion, and for several it is not a mean over samples:
``CrossEntropyLoss(weight=w, ignore_index=i)`` divides ``sum(w[y] * l)`` over the elements not ignored by
``sum(w[y])`` over the same elements; ``KLDivLoss(reduction="batchmean")`` divides the sum by the batch size;
``MSELoss`` by the number of elements. So the loss of a set is ``criterion(cat(outputs), cat(targets))`` only
when each batch contributes its numerator and its denominator, and the epoch value is
``sum(numerators) / sum(denominators)`` (``reduction="sum"``: the sum of the numerators).

``batch_loss(criterion, outputs, target)`` calls the criterion (the public call: autocast, hooks and all, so the
step's loss is exactly what the criterion returns, in its dtype, with its gradient) and adds the batch's weight: a
count from shapes, or one reduction on the device (``sum(weight[y])`` over the targets not ignored). Never a
host-device sync: no ``.item()``, no branch on tensor values, no boolean-mask indexing. ``call_terms`` does the same
for a call someone else made (the arguments the criterion saw and what it returned). ``sample_terms`` splits the
same numerator and denominator per sample, for code that must drop single samples.

Precision: under autocast (``bf16-mixed``, ``16-mixed``) torch computes every loss in float32, and so does the
criterion called here. A bfloat16 or float16 value (``bf16-true``, ``16-true``: outputs and criterion in half
precision) is kept as the step's loss, and the epoch's numerator is the criterion recomputed in float32 on the same
outputs; the epoch sums are float64 in every case.

Known criteria: every loss module of ``torch.nn`` called as ``criterion(outputs, target)`` (see ``docs/losses.md``).
A criterion that takes three inputs (``MarginRankingLoss``, ``CosineEmbeddingLoss``, ``TripletMarginLoss``,
``TripletMarginWithDistanceLoss``, ``GaussianNLLLoss``, ``CTCLoss``), a subclass that overrides ``forward``, and
any other callable are not seen into: ``batch_loss`` returns ``None`` and the caller uses what the criterion returns
(``value_terms``). Forward hooks on the criterion run as part of its call; a hook that changes the criterion's
inputs or replaces its output is not seen by the weight.

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

__all__ = [
    "BatchLoss", "LossMean", "LossPlan", "LossTerms", "batch_loss", "call_terms", "known", "loss_plan",
    "sample_terms", "value_terms",
]


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


class LossMean(NamedTuple):
    """A batch's loss that is already a mean over ``weight`` elements, e.g. the tokens a language model scored.

    Return it from ``compute_loss`` (``ValidationMixin``) or from a ``criterion`` (``validate()``) when the loss was
    computed elsewhere, such as a Hugging Face model's own ``outputs.loss`` (the mean over the labels that are not
    ``-100``, after the shift for a causal LM). The step returns ``mean`` itself, the very tensor (with its
    gradient); the epoch value is ``sum of mean * weight / sum of weight`` over the batches, the mean over every
    element of the set:

    ```python
    def compute_loss(self, outputs, target):                      # a causal LM: the labels are shifted inside
        return LossMean(outputs.loss, weight=(target[:, 1:] != -100).sum())
    ```

    Attributes:
        mean: the batch's mean, a 0-dim float tensor.
        weight: how many elements it averages, a 0-dim tensor or a number; a batch of weight 0 adds nothing (its
            mean is nan).
    """

    mean: Tensor
    weight: Tensor | float


class BatchLoss(NamedTuple):
    """One batch: ``value`` is the batch's loss (a mean over ``weight``, or a sum), ``weight`` its denominator.

    With ``is_sum`` the value is a numerator: the batch adds ``value`` (and ``weight``) to the epoch sums;
    otherwise it adds ``value * weight`` (0 when ``weight`` is 0, where ``value`` is nan). ``loss`` is what a
    step returns (for backward) when it is not ``value``. ``per_sample`` is the per-sample loss a criterion
    returned, or its per-row ``LossTerms`` (``value_terms``), kept as they came (nothing computed), for the loss's
    interval (``metrics.uncertainty``).
    """

    value: Tensor
    weight: Tensor | float
    is_sum: bool = False
    loss: Tensor | None = None
    per_sample: Tensor | LossTerms | None = None

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

#: Loss values of these dtypes are recomputed in float32 for the epoch sums (a bfloat16 batch mean is off by up to
#: 0.4%); the step still returns the criterion's own value.
_LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Criteria that autocast does not run in float32 from end to end (it runs the others in float32: their ATen
#: operator is on its float32 list). MultiLabelSoftMarginLoss is composed in Python of ``logsigmoid`` and a mean, which
#: autocast leaves in bfloat16; LinearCrossEntropyLoss's matrix product is autocast to bfloat16 by design. Under
#: autocast their value comes back as float32 but is 1e-4 off the float64 loss: the epoch's numerator is recomputed.
_PARTLY_LOW_UNDER_AUTOCAST = (nn.MultiLabelSoftMarginLoss.forward, *_LINEAR_CE)


def _forward_of(criterion: object) -> Callable[..., Any] | None:
    """The criterion's ``forward`` when the library knows its denominator: a torch loss whose forward is torch's."""
    if not isinstance(criterion, nn.Module) or getattr(criterion, "reduction", None) not in _REDUCTIONS:
        return None
    forward = type(criterion).forward
    return forward if forward in _COUNTED or forward in _CLASS_INDEX or forward in _LINEAR_CE else None


def known(criterion: object) -> bool:
    """Whether ``batch_loss`` computes exact terms for ``criterion`` (else it returns ``None``)."""
    return _forward_of(criterion) is not None


class LossPlan:
    """How to read one known criterion's exact terms: built once (per epoch, per ``validate()`` call), used per batch.

    Calling it calls the criterion and returns ``BatchLoss`` (see ``batch_loss``); ``terms`` does the same for a call
    already made (``call_terms``). What can change between batches (the reduction, the class weights, the
    ``ignore_index``) is read at each call; what cannot (which torch loss it is) is decided here, once.
    """

    __slots__ = ("class_index", "counted", "criterion", "linear", "partly_low")

    def __init__(self, criterion: nn.Module, forward: Callable[..., Any]) -> None:
        self.criterion = criterion
        self.linear = forward in _LINEAR_CE
        self.class_index = self.linear or forward in _CLASS_INDEX
        self.counted = _COUNTED.get(forward)
        self.partly_low = forward in _PARTLY_LOW_UNDER_AUTOCAST

    def __call__(self, outputs: Any, target: Any) -> BatchLoss | None:
        """Call the criterion on one batch; its value and weight, or ``None`` for outputs that are not a tensor."""
        if not isinstance(outputs, Tensor) or not isinstance(target, Tensor):
            return None  # structured outputs: the user's compute_loss says what the loss takes
        return self.terms(outputs, target, self.criterion(outputs, target))

    def terms(self, outputs: Tensor, target: Tensor, value: Tensor) -> BatchLoss | None:
        """The terms of ``value = criterion(outputs, target)``, or ``None`` where no denominator is known."""
        c: Any = self.criterion
        weight: Tensor | int
        if self.counted is not None:
            weight = self.counted(c, outputs, target)
        elif not target.is_floating_point():  # class indices (tokens, pixels): sum(w[y]) over those not ignored
            ignore = c.ignore_index
            kept = target != (-100 if ignore is None else ignore)
            w: Tensor | None = c._buffers.get("weight")  # the class weights are a buffer of torch's losses
            if w is None:
                weight = kept.sum()  # int64: exact
            else:  # float64 whatever the weights' own dtype (bfloat16 under bf16-true); float32 on MPS
                dtype = torch.float32 if target.device.type == "mps" else torch.float64
                weight = (w.take(target.masked_fill(~kept, 0)) * kept).sum(dtype=dtype)
        elif self.linear:
            return None  # class probabilities over features: no denominator known here
        else:  # class probabilities: the mean over the elements, class weights not normalized
            weight = outputs.numel() // outputs.shape[1] if outputs.ndim > 1 else 1
        if value.dtype in _LOW_PRECISION or (self.partly_low and _autocast_on(outputs.device)):
            with torch.no_grad(), torch.autocast(outputs.device.type, enabled=False):
                total = _variant(c, "sum", torch.float32)(
                    outputs.float(), target.float() if target.is_floating_point() else target
                )
            return BatchLoss(total, weight, True, value)
        return BatchLoss(value, weight, c.reduction == "sum")


def loss_plan(criterion: object) -> LossPlan | None:
    """The ``LossPlan`` of a known criterion (``known``), else ``None``."""
    forward = _forward_of(criterion)
    if forward is None:
        return None
    assert isinstance(criterion, nn.Module)
    return LossPlan(criterion, forward)


def batch_loss(criterion: object, outputs: Any, target: Any) -> BatchLoss | None:
    """Call ``criterion(outputs, target)`` and return its value with its weight, or ``None`` for an unknown criterion.

    The value is the criterion's own result, computed by the criterion itself in the caller's context (autocast,
    hooks and all): the same value, dtype and gradient as calling it by hand. The weight is its ``reduction="mean"``
    denominator, from shapes or one small reduction on the device (``call_terms``). No host-device sync, and the
    criterion is never modified. A loop calls ``loss_plan(criterion)`` once and the plan per batch instead.
    """
    plan = loss_plan(criterion)
    return plan(outputs, target) if plan is not None else None


def call_terms(criterion: object, outputs: Any, target: Any, value: Any) -> BatchLoss | None:
    """The exact terms of one call ``value = criterion(outputs, target)`` already made, or ``None`` if unknown.

    Use it where the criterion was called by someone else (a user's ``compute_loss`` on reshaped outputs): given
    the arguments the criterion saw and what it returned, the batch's weight is the criterion's ``reduction="mean"``
    denominator: ``sum(weight[y])`` over the targets not ignored for ``CrossEntropyLoss``/``NLLLoss`` with class
    indices (tokens, pixels), else a count from shapes. The value is kept as the step's loss. When it is bfloat16
    or float16 (``precision="bf16-true"``), the epoch's numerator is the criterion recomputed in float32 on the same
    outputs, so that the epoch value stays within float32 rounding of the float64 reference.
    """
    plan = loss_plan(criterion)
    if (
        plan is None
        or not isinstance(outputs, Tensor)
        or not isinstance(target, Tensor)
        or not isinstance(value, Tensor)
        or value.ndim != 0
    ):
        return None
    return plan.terms(outputs, target, value)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()


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

    - ``LossTerms(sum, weight)``: exact, as given; also one ``sum`` per row (shape ``(batch_size,)``, with one
      weight per row or one for all): the batch's terms are their sums, and the rows are kept as ``per_sample`` for
      the loss's interval (a language model's per-sequence token losses and token counts);
    - ``LossMean(mean, weight)``: exact, as given; the step's loss is ``mean`` itself;
    - a tensor with a leading batch dimension (per sample, or per element): every value counts once, so the epoch
      value is the mean of all of them;
    - a 0-dim tensor: the batch mean (or the batch sum when ``is_sum``), weighted by ``batch_size``: exact only when
      the loss is a mean over samples.

    Raises:
        TypeError: for anything else (``what`` names the source in the message).
        ValueError: when the leading dimension is not ``batch_size``.
    """
    if isinstance(value, LossTerms) and _one_per_row(value, batch_size):
        total, weight = value
        batch_weight = weight.sum() if isinstance(weight, Tensor) else weight * batch_size
        batch_sum = total.sum()
        return BatchLoss(batch_sum, batch_weight, True, batch_sum / batch_weight, value)
    if isinstance(value, (LossTerms, LossMean)):
        total, weight = value
        kind, field = ("LossTerms", "sum") if isinstance(value, LossTerms) else ("LossMean", "mean")
        if not isinstance(total, Tensor) or total.ndim != 0 or not total.is_floating_point():
            rows = f" or one per row, of shape ({batch_size},)" if kind == "LossTerms" else ""
            raise TypeError(f"Expected `{kind}.{field}` from {what} to be a 0-dim float tensor{rows} but got "
                            f"{_describe(total)}.")
        if isinstance(weight, Tensor) and weight.ndim == 0:
            pass
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"Expected `{kind}.weight` from {what} to be a 0-dim tensor or a number but got "
                            f"{_describe(weight)}.")
        if isinstance(value, LossMean):
            return BatchLoss(total, weight)
        return BatchLoss(total, weight, True, total / weight)
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"Expected {what} to return a float tensor (the batch mean or one loss per sample), "
            f"`LossTerms(sum, weight)` or `LossMean(mean, weight)` but got {_describe(value)}."
        )
    if value.ndim == 0:
        return BatchLoss(value, batch_size, is_sum)
    if value.shape[0] != batch_size:
        raise ValueError(
            f"Expected a per-sample loss of first dimension {batch_size} (the batch size) but got shape "
            f"{tuple(value.shape)}. Return the batch mean (a 0-dim tensor), one loss per sample, or "
            "`LossTerms(sum, weight)`."
        )
    return BatchLoss(value.sum(), value.numel(), True, value.mean(), value)


def _one_per_row(terms: LossTerms, batch_size: int) -> bool:
    """Whether ``terms`` holds one float ``sum`` per row of the batch, with one weight per row or one for all."""
    total, weight = terms
    if not isinstance(total, Tensor) or total.ndim != 1 or total.shape[0] != batch_size or not (
            total.is_floating_point()):
        return False
    if isinstance(weight, Tensor):
        return weight.shape == total.shape
    return isinstance(weight, (int, float)) and not isinstance(weight, bool)


def sample_terms(criterion: nn.Module, outputs: Tensor, target: Tensor, dtype: torch.dtype | None = None) -> LossTerms:
    """Split a known criterion's numerator and denominator per sample: two float64 tensors of shape ``(N,)``.

    ``sum(terms.sum) / sum(terms.weight)`` over any set of samples is the criterion's ``reduction="mean"`` value on
    them (``reduction="sum"``: ``sum(terms.sum)``), so single samples (a ``DistributedSampler``'s padding) can be
    masked out. Costs a ``reduction="none"`` call; the criterion is copied, never modified. With ``dtype`` (float32
    for bfloat16 outputs) the copy's floating tensors and the outputs are cast to it first.

    Raises:
        TypeError: if ``batch_loss`` does not know the criterion.
    """
    forward = _forward_of(criterion)
    if forward is None:
        raise TypeError(f"Expected a torch loss module called as `criterion(outputs, target)` but got {criterion!r}.")
    n = outputs.shape[0]
    if dtype is not None:
        outputs = outputs.to(dtype)
    unreduced = _variant(criterion, "none", dtype)(outputs, target)
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


def _variant(criterion: nn.Module, reduction: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``criterion`` with another reduction (and its floating tensors in ``dtype``); the original untouched.

    The copy is shallow: it shares the user's tensors unless ``dtype`` asks for a cast, and its dicts of parameters,
    buffers and submodules are its own, so nothing set on it reaches the criterion.
    """
    clone = copy.copy(criterion)
    object.__setattr__(clone, "reduction", reduction)
    if dtype is not None:
        def cast(t: Any) -> Any:
            return t.detach().to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        clone._parameters = {k: cast(v) for k, v in criterion._parameters.items()}
        clone._buffers = {k: cast(v) for k, v in criterion._buffers.items()}
        clone._modules = {k: _variant(m, getattr(m, "reduction", ""), dtype) if m is not None else None
                          for k, m in criterion._modules.items()}
    return clone


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"
