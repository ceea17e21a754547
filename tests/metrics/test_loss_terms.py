"""The loss over a whole set from per-batch terms, against torch's criterion applied once to the set in float64."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from host_sync import no_host_sync
from loss_cases import CASE_IDS, CASES, VOID, Case, segmentation
from torch import Tensor, nn

from lightning_validate import LossTerms
from lightning_validate.metrics.accumulators import LossAccumulator
from lightning_validate.metrics.loss_terms import batch_loss, known, sample_terms, value_terms

#: Python-level reads of a tensor's value (each is a host-device sync on a GPU) and value-dependent shapes.
FORBIDDEN = [
    (Tensor, "item"), (Tensor, "tolist"), (Tensor, "cpu"), (Tensor, "numpy"), (Tensor, "__bool__"),
    (Tensor, "__float__"), (Tensor, "__int__"), (Tensor, "__index__"), (Tensor, "nonzero"),
    (Tensor, "masked_select"), (torch, "nonzero"), (torch, "masked_select"), (torch, "unique"),
]


def fill(case: Case, criterion: nn.Module) -> LossAccumulator:
    acc = LossAccumulator("sum" if criterion.reduction == "sum" else "mean")
    for outputs, target in case.batches():
        batch = batch_loss(criterion, outputs, target)
        assert batch is not None
        acc.add(batch)
    acc.summary()  # folds on the device: no read either
    return acc


def accumulate(case: Case, criterion: nn.Module) -> float:
    acc = fill(case, criterion)
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert nonfinite == 0 and batches == len(case.batches())
    return acc.value(total, weight)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_batch_terms_give_the_criterion_on_the_whole_set(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    criterion = case.make()
    before = dict(vars(criterion))
    with no_host_sync(monkeypatch, FORBIDDEN), torch.no_grad():
        acc = fill(case, criterion)
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert nonfinite == 0 and batches == len(case.batches())
    value = acc.value(total, weight)
    assert value == pytest.approx(case.reference(), abs=1e-6, rel=1e-6)
    assert vars(criterion) == before  # the user's criterion is not modified (not even its reduction)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_batch_value_is_what_the_criterion_returns(case: Case) -> None:
    criterion = case.make()
    for outputs, target in case.batches():
        batch = batch_loss(criterion, outputs, target)
        assert batch is not None
        expected = criterion(outputs, target)
        got = batch.step_loss
        if torch.isnan(expected):  # a batch whose targets are all ignored: torch's mean is 0/0
            assert torch.isnan(got) and float(batch.weight) == 0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_batch_value_carries_the_gradient_of_the_criterion() -> None:
    x, y = segmentation()
    criteria = [nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 4.0]), ignore_index=VOID),
                nn.CrossEntropyLoss(ignore_index=VOID, label_smoothing=0.1)]
    for criterion in criteria:
        ours, theirs = x[:4].clone().requires_grad_(), x[:4].clone().requires_grad_()
        batch = batch_loss(criterion, ours, y[:4])
        assert batch is not None
        batch.step_loss.backward()
        criterion(theirs, y[:4]).backward()
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("case", [c for c in CASES if "segmentation" in c.name], ids=lambda c: c.name)
def test_a_batch_entirely_ignored_adds_nothing(case: Case) -> None:
    criterion = case.make()
    outputs, target = case.batches()[2]
    assert (target == VOID).all()
    batch = batch_loss(criterion, outputs, target)
    assert batch is not None and float(batch.weight) == 0
    acc = LossAccumulator("sum" if criterion.reduction == "sum" else "mean")
    acc.add(batch)
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert (total, weight, nonfinite, batches) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sample_terms_split_the_set_per_sample(case: Case) -> None:
    """Per-sample terms sum to the whole set's value, and masking samples gives the value on the others."""
    criterion = case.make()
    with torch.no_grad():
        parts = [sample_terms(criterion, o, t) for o, t in case.batches()]
    sums, weights = torch.cat([p.sum for p in parts]), torch.cat([p.weight for p in parts])
    assert sums.dtype == weights.dtype == torch.float64 and sums.shape == weights.shape == case.target.shape[:1]
    n = case.target.shape[0]
    keep = torch.arange(n) % 3 != 0  # drop every third sample, as padding removal would drop repeats
    sub = Case(case.name, case.make, case.outputs[keep], case.target[keep], case.batch_size)
    for mask, ref in ((torch.ones(n, dtype=torch.bool), case.reference()), (keep, sub.reference())):
        total = (sums * mask).sum().item()
        value = total if criterion.reduction == "sum" else total / (weights * mask).sum().item()
        assert value == pytest.approx(ref, abs=1e-6, rel=1e-6)


def test_kl_div_mean_is_the_mean_over_elements() -> None:
    x, t = torch.randn(13, 4).log_softmax(1), torch.randn(13, 4).softmax(1)
    criterion = nn.KLDivLoss(reduction="mean")
    case = Case("kl_mean", lambda: nn.KLDivLoss(reduction="mean"), x, t, 4)
    with pytest.warns(UserWarning, match="reduction: 'mean' divides the total loss by both the batch size"):
        assert accumulate(case, criterion) == pytest.approx(case.reference(), abs=1e-6)


def test_criteria_not_seen_into_return_none() -> None:
    class Overridden(nn.CrossEntropyLoss):
        def forward(self, input: Tensor, target: Tensor) -> Tensor:
            return super().forward(input, target) * 2

    class Inherited(nn.CrossEntropyLoss):  # forward not overridden: torch's own definition still holds
        pass

    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    unknown = [Overridden(), nn.CrossEntropyLoss(reduction="none"), nn.MarginRankingLoss(), nn.CTCLoss(),
               nn.GaussianNLLLoss(), nn.CosineEmbeddingLoss(), nn.TripletMarginLoss(), nn.functional.cross_entropy]
    for criterion in unknown:
        assert not known(criterion)
        assert batch_loss(criterion, x, y) is None
    assert known(Inherited()) and batch_loss(Inherited(), x, y) is not None
    assert batch_loss(nn.CrossEntropyLoss(), (x, x), y) is None  # a tuple of outputs: the user's compute_loss
    with pytest.raises(TypeError, match=r"Expected a torch loss module called as `criterion\(outputs, target\)` but "
                                        r"got MarginRankingLoss\(\)"):
        sample_terms(nn.MarginRankingLoss(), x, y.float())


def test_hooks_on_the_criterion_run_and_change_no_weight() -> None:
    """Hooks are part of the criterion's call: the step gets what the hooked criterion returns, the weight stays
    torch's denominator, and a hook that only looks (a recorder, ModeCheck's probe before 0.3) changes nothing."""
    case = next(c for c in CASES if c.name == "ce_weight_imbalanced")
    looking, doubling = case.make(), case.make()
    seen: list[int] = []
    looking.register_forward_pre_hook(lambda module, args: seen.append(len(args[1])))
    doubling.register_forward_hook(lambda module, args, out: out * 2)
    assert known(looking) and known(doubling)
    assert accumulate(case, looking) == pytest.approx(case.reference(), rel=1e-6)
    assert len(seen) == len(case.batches())
    assert accumulate(case, doubling) == pytest.approx(2 * case.reference(), rel=1e-6)
    for outputs, target in case.batches():
        batch = batch_loss(doubling, outputs, target)
        assert batch is not None
        torch.testing.assert_close(batch.step_loss, doubling(outputs, target))


def test_bad_shapes_raise_torch_errors() -> None:
    with pytest.raises(RuntimeError, match=r"Expected target size \[2, 3\], got \[2, 4\]"):
        batch_loss(nn.CrossEntropyLoss(), torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises((RuntimeError, ValueError), match=r"batch_size"):
        batch_loss(nn.CrossEntropyLoss(), torch.randn(2, 5), torch.zeros(3, dtype=torch.long))


def test_value_terms_from_a_loss_not_seen_into() -> None:
    per_pixel = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    mask = torch.tensor([[True, False], [True, True]])
    terms = value_terms(LossTerms((per_pixel * mask).sum(), mask.sum()), 2)
    assert terms.is_sum and terms.value.item() == 9.0 and terms.step_loss.item() == 3.0
    values = value_terms(per_pixel, 2)
    assert values.is_sum and values.weight == 4 and values.step_loss.item() == 2.25
    mean = value_terms(torch.tensor(2.0), 5)
    assert not mean.is_sum and mean.weight == 5
    with pytest.raises(TypeError, match=r"Expected `compute_loss` to return a float tensor \(the batch mean or one "
                                        r"loss per sample\), `LossTerms\(sum, weight\)` or `LossMean\(mean, "
                                        r"weight\)` but got tuple"):
        value_terms((torch.tensor(1.0), 2), 2, what="`compute_loss`")
    with pytest.raises(TypeError, match=r"`LossTerms.weight` from the loss function to be a 0-dim tensor or a "
                                        r"number but got str 'two'"):
        value_terms(LossTerms(torch.tensor(1.0), "two"), 2)  # type: ignore[arg-type]
    assert math.isnan(value_terms(LossTerms(torch.tensor(0.0), torch.tensor(0.0)), 2).step_loss.item())


PRECISIONS = ["64-true", "bf16-mixed", "bf16-true"]


Batches = list[tuple[Tensor, Tensor]]


def in_precision(case: Case, precision: str) -> tuple[nn.Module, Batches, contextlib.AbstractContextManager[object]]:
    """The criterion, the batches and the context of a step under Lightning's ``precision``.

    ``bf16-true`` converts the model (the criterion's weight buffers too) and its outputs to bfloat16; under
    ``bf16-mixed`` the outputs of autocast's matrix products are bfloat16 and the criterion runs inside autocast;
    ``64-true`` runs everything in float64.
    """
    criterion = case.make()
    dtype = {"64-true": torch.float64, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}[precision]
    if precision != "bf16-mixed":
        criterion = criterion.to(dtype)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    batches = [(cast(o), cast(t) if precision != "bf16-mixed" else t) for o, t in case.batches()]
    context: contextlib.AbstractContextManager[object] = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    return criterion, batches, context


def reference_of(criterion: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """The criterion applied once to the whole set in float64, on the same (possibly rounded) outputs and weights."""
    whole = copy.deepcopy(criterion).double()
    outputs = torch.cat([o for o, _ in batches]).double()
    target = torch.cat([t for _, t in batches])
    with torch.no_grad():
        return float(whole(outputs, target.double() if target.is_floating_point() else target))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_precision_keeps_the_criterions_value_and_an_exact_epoch(case: Case, precision: str) -> None:
    """The step's loss is the criterion's own result in the step's context (value, dtype); the epoch value is the
    float64 whole-set criterion on the same outputs within 1e-5, with float64 sums."""
    criterion, batches, context = in_precision(case, precision)
    try:
        with torch.no_grad(), context:
            criterion(*batches[0])
    except (NotImplementedError, RuntimeError) as err:  # e.g. multilabel_margin_loss has no bfloat16 CPU kernel
        pytest.skip(f"the criterion itself fails in {precision} on the CPU: {err}")
    acc = LossAccumulator("sum" if criterion.reduction == "sum" else "mean")
    with torch.no_grad(), context:
        for outputs, target in batches:
            batch = batch_loss(criterion, outputs, target)
            expected = criterion(outputs, target)
            assert batch is not None
            assert batch.step_loss.dtype == expected.dtype
            assert torch.equal(batch.step_loss, expected) or (expected.isnan() and batch.step_loss.isnan())
            acc.add(batch)
    summary = acc.summary()
    assert summary.dtype == torch.float64
    total, weight, _, _ = summary.tolist()
    assert acc.value(total, weight) == pytest.approx(reference_of(criterion, batches), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_keeps_the_criterions_gradient(precision: str) -> None:
    x, y = segmentation()
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 4.0]), ignore_index=VOID)
    dtype = torch.float64 if precision == "64-true" else torch.bfloat16
    if precision != "bf16-mixed":
        criterion = criterion.to(dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    ours, theirs = (x[:4].to(dtype).clone().requires_grad_() for _ in range(2))
    with context:
        batch = batch_loss(criterion, ours, y[:4])
        expected = criterion(theirs, y[:4])
    assert batch is not None
    batch.step_loss.backward()
    expected.backward()
    assert torch.equal(ours.grad, theirs.grad)
