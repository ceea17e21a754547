"""``recorded_terms``: the exact terms of the loss call a value came from, and only of that call."""

from __future__ import annotations

import warnings

import pytest
import torch
from host_sync import no_host_sync
from loss_cases import CASE_IDS, CASES, Case
from test_loss_terms import FORBIDDEN
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_validate import LossTerms
from lightning_validate.metrics.accumulators import LossAccumulator
from lightning_validate.metrics.loss_calls import recorded_terms
from lightning_validate.metrics.loss_terms import batch_loss

#: torch's LinearCrossEntropyLoss calls no loss function the recorder reads.
NOT_RECORDED = {"linear_cross_entropy_weight_ignore"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_loss_module_called_inside_gives_its_own_terms(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.nn loss, called inside someone else's function: the same terms as the criterion's own."""
    criterion = case.make()
    outputs, target = case.outputs, case.target
    is_sum = criterion.reduction == "sum"
    with no_host_sync(monkeypatch, FORBIDDEN):
        value, terms = recorded_terms(lambda o, t: criterion(o, t), outputs, target, is_sum=is_sum)
    if case.name in NOT_RECORDED:
        assert terms is None
        return
    expected = batch_loss(criterion, outputs, target)
    assert terms is not None and expected is not None
    assert terms.value is value and torch.equal(value, expected.value)
    assert float(terms.weight) == float(expected.weight) and terms.is_sum == expected.is_sum


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in NOT_RECORDED], ids=lambda c: c.name)
def test_reshaped_batches_add_up_to_the_loss_of_the_set(case: Case) -> None:
    """The functional form on flattened batches, accumulated: the criterion on the whole set in float64."""
    criterion = case.make()
    acc = LossAccumulator("sum" if criterion.reduction == "sum" else "mean")
    for outputs, target in case.batches():
        _, terms = recorded_terms(lambda o, t: criterion(o.contiguous(), t), outputs, target,
                                  is_sum=acc.reduction == "sum")
        assert terms is not None
        acc.add(terms)
    total, weight = acc.summary().tolist()[:2]
    assert acc.value(total, weight) == pytest.approx(case.reference(), abs=1e-6, rel=1e-6)


def lm_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 6, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    labels[0, 4:], labels[2, 2:] = -100, -100
    return logits, labels


def shifted(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def test_the_causal_shift_counts_the_tokens_scored() -> None:
    logits, labels = lm_batch()
    value, terms = recorded_terms(shifted, logits, labels, is_sum=False)
    assert terms is not None and terms.value is value and not terms.is_sum
    assert int(terms.weight) == int((labels[:, 1:] != -100).sum()) == 9  # 3 + 5 + 1 tokens, not 3 samples


def test_hugging_face_loss_function_called_inside_is_read() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

    logits, labels = lm_batch()
    value, terms = recorded_terms(lambda o, t: ForCausalLMLoss(o, t, vocab_size=11), logits, labels, is_sum=False)
    assert terms is not None and terms.value is value and int(terms.weight) == 9
    value, terms = recorded_terms(lambda o, t: ForMaskedLMLoss(o, t, vocab_size=11), logits, labels, is_sum=False)
    assert terms is not None and terms.value is value and int(terms.weight) == int((labels != -100).sum())


def test_bfloat16_values_get_a_float32_numerator_and_stay_the_step_loss() -> None:
    logits, labels = lm_batch()
    low = logits.bfloat16()
    value, terms = recorded_terms(shifted, low, labels, is_sum=False)
    assert terms is not None and terms.is_sum and terms.step_loss is value and value.dtype == torch.bfloat16
    exact = F.cross_entropy(low.double()[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert terms.value.dtype == torch.float32 and terms.value.item() == pytest.approx(exact.item(), rel=1e-6)


def two_calls(logits: Tensor, labels: Tensor) -> Tensor:
    return shifted(logits, labels) + shifted(logits[:, :3], labels[:, :3])


def no_call(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.logsumexp(-1).mean()


@pytest.mark.parametrize("compute", [
    two_calls,                                                   # a sum of two calls: a new tensor
    lambda o, t: 0.5 * shifted(o, t),                             # a call times a factor
    lambda o, t: shifted(o.bfloat16(), t).float(),                # a cast of a call
    no_call,                                                      # no loss call at all
    lambda o, t: F.cross_entropy(o.transpose(1, 2), t, reduction="none").sum(1),  # per sample: not one number
    lambda o, t: F.mse_loss(o[..., 0], t.float(), weight=torch.ones_like(o[..., 0])),  # no module makes this call
    lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum"),  # a sum where a mean is wanted
    lambda o, t: LossTerms(shifted(o, t), 1),                     # not a tensor: read as given
], ids=["sum_of_two", "factor", "cast", "no_call", "reduction_none", "mse_weight", "sum_for_mean", "terms"])
def test_anything_but_a_calls_own_result_is_not_read(compute: object) -> None:
    logits, labels = lm_batch()
    value, terms = recorded_terms(compute, logits, labels, is_sum=False)  # type: ignore[arg-type]
    assert terms is None and value is not None


def test_the_reduction_must_be_the_callers() -> None:
    logits, labels = lm_batch()

    def summed(o: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum")

    value, terms = recorded_terms(summed, logits, labels, is_sum=True)
    assert terms is not None and terms.is_sum and terms.value is value and int(terms.weight) == 12
    assert recorded_terms(shifted, logits, labels, is_sum=True)[1] is None


def test_the_deprecated_reduction_arguments_are_not_read() -> None:
    logits, labels = lm_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation warning for size_average
        _, terms = recorded_terms(lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), size_average=True),
                                  logits, labels, is_sum=False)
    assert terms is None


def test_class_weights_and_the_modules_kept_for_calls_without_tensors() -> None:
    logits, labels = lm_batch()
    weight = torch.rand(11, generator=torch.Generator().manual_seed(3))

    def weighted(o: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(o.flatten(0, 1), t.flatten(), weight=weight, label_smoothing=0.1)

    _, terms = recorded_terms(weighted, logits, labels, is_sum=False)
    kept = labels.flatten() != -100
    assert terms is not None and float(terms.weight) == pytest.approx(float(weight[labels.flatten()[kept]].sum()))
    _, again = recorded_terms(weighted, logits, labels, is_sum=False)
    assert again is not None and float(again.weight) == float(terms.weight)
    inner = nn.CrossEntropyLoss(ignore_index=0)
    _, terms = recorded_terms(lambda o, t: inner(o.flatten(0, 1), t.flatten()), logits, labels.clamp(min=0),
                              is_sum=False)
    assert terms is not None and int(terms.weight) == int((labels.clamp(min=0) != 0).sum())


def test_the_recorder_leaves_no_mode_behind_when_the_loss_raises() -> None:
    logits, labels = lm_batch()

    def broken(o: Tensor, t: Tensor) -> Tensor:
        raise RuntimeError("inside compute_loss")

    with pytest.raises(RuntimeError, match="inside compute_loss"):
        recorded_terms(broken, logits, labels, is_sum=False)
    assert not torch.overrides._get_current_function_mode_stack()
