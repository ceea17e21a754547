"""Every value's interval from one tracker, against independent references (scipy, statsmodels, sklearn, numpy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from host_sync import no_host_sync
from scipy import stats
from sklearn.metrics import f1_score
from statsmodels.stats.proportion import proportion_confint
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryHammingDistance,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassExactMatch,
    MulticlassF1Score,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError
from torchmetrics.text import Perplexity

from lightning_validate.metrics.bootstrap import poisson_weight
from lightning_validate.metrics.fast_accuracy import FastMulticlassAccuracy
from lightning_validate.metrics.intervals import Intervals
from lightning_validate.metrics.loss_terms import batch_loss, value_terms
from lightning_validate.metrics.uncertainty import EvaluationIntervals

CPU = torch.device("cpu")
FORBIDDEN = [(Tensor, "item"), (Tensor, "tolist"), (Tensor, "cpu"), (Tensor, "numpy"), (Tensor, "__bool__"),
             (Tensor, "__float__"), (Tensor, "__int__"), (Tensor, "nonzero"), (torch, "nonzero"),
             (torch, "bincount"), (torch, "unique"), (Tensor, "masked_select")]


def run(metrics: Sequence[tuple[str, Metric]], batches: Sequence[tuple[Tensor, Tensor]], *,
        criterion: Any = None, loss: Callable[[Tensor, Tensor], Any] | None = None, spec: Intervals | None = None,
        ) -> tuple[dict[str, Any], EvaluationIntervals]:
    """One evaluation: metrics updated, the tracker beside them, packed, finished; the values and the tracker."""
    tracker = EvaluationIntervals(spec or Intervals(), metrics, criterion=criterion,
                                  loss=criterion is not None or loss is not None, label=lambda name: f"val/{name}")
    total = weight = 0.0
    for outputs, target in batches:
        for _, metric in metrics:
            metric.update(outputs, target)
        batch = None
        if criterion is not None:
            batch = batch_loss(criterion, outputs, target)
        elif loss is not None:
            batch = value_terms(loss(outputs, target), target.shape[0])
        if batch is not None:
            w = float(batch.weight)
            total += float(batch.value) * (1.0 if batch.is_sum else w)
            weight += w
        tracker.update(outputs, target, [(outputs, target)] * len(metrics), batch, target.shape[0])
    values = {name: metric.compute().item() for name, metric in metrics}
    if weight:
        values["loss"] = total / weight
    values["intervals"] = tracker.finish(tracker.pack(CPU), values)
    return values, tracker


def split(*tensors: Tensor, size: int = 37) -> list[tuple[Tensor, ...]]:
    return list(zip(*(t.split(size) for t in tensors), strict=True))


def delta_reference(sums: np.ndarray, weights: np.ndarray, centre: float,
                    confidence: float = 0.95) -> tuple[float, float]:
    keep = weights != 0
    s, w = sums[keep], weights[keep]
    n = keep.sum()
    ratio = s.sum() / w.sum()
    se = math.sqrt(((s - ratio * w) ** 2).sum() / (n * (n - 1))) / w.mean()
    t = stats.t.ppf(0.5 + confidence / 2, n - 1)
    return centre - t * se, centre + t * se


def test_a_token_loss_with_class_weights_and_ignored_tokens_has_the_sequence_as_unit() -> None:
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(120, 5, 9, generator=g), torch.randint(0, 5, (120, 9), generator=g)
    target[torch.rand(120, 9, generator=g) < 0.3] = -1  # ignored tokens; row 0 entirely
    target[0] = -1
    class_weight = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0])
    criterion = nn.CrossEntropyLoss(weight=class_weight, ignore_index=-1)
    values, _ = run([], split(logits, target), criterion=criterion)
    per_token = F.cross_entropy(logits.double(), target, weight=class_weight.double(), ignore_index=-1,
                                reduction="none")
    token_weight = torch.where(target == -1, 0.0, class_weight.double()[target.clamp(min=0)])
    expected = delta_reference(per_token.sum(1).numpy(), token_weight.sum(1).numpy(), values["loss"])
    assert tuple(values["intervals"]["loss"]) == pytest.approx(expected, rel=1e-9)


def test_a_per_sample_loss_of_your_own_gets_the_t_interval_of_its_mean() -> None:
    g = torch.Generator().manual_seed(1)
    preds, target = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)
    values, _ = run([], split(preds, target), loss=lambda p, t: (p - t).pow(2).mean(1))  # one loss per sample
    per_sample = (preds - target).pow(2).mean(1).double().numpy()
    expected = stats.t.interval(0.95, 199, loc=values["loss"], scale=stats.sem(per_sample))
    assert tuple(values["intervals"]["loss"]) == pytest.approx(expected, rel=1e-9)


def test_a_loss_given_per_batch_or_as_a_sum_has_no_interval_and_says_why() -> None:
    g = torch.Generator().manual_seed(2)
    preds, target = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    values, tracker = run([], split(preds, target), loss=lambda p, t: (p - t).pow(2).mean())
    assert all(math.isnan(v) for v in values["intervals"]["loss"])
    assert tracker.warnings == [
        "No interval for `val/loss`: the loss came as one value per batch (a mean, `LossMean` or `LossTerms(sum, "
        "weight)` of the batch), and the interval needs each sample's: return one loss per sample "
        "(`reduction='none'`), or `LossTerms` with one sum and weight per row (a sequence's summed token losses "
        "and its tokens), from your `compute_loss` or criterion."
    ]
    summed = EvaluationIntervals(Intervals(), [], criterion=nn.MSELoss(reduction="sum"), loss="sum",
                                 label=lambda name: f"val/{name}")
    assert summed.names == [] and "with `reduction='sum'` its value is a sum over the set" in summed.warnings[0]


PROPORTIONS = [
    ("fast_acc", lambda: FastMulticlassAccuracy(4), "scores", lambda p, t: (p.argmax(1) == t, np.ones(len(t)))),
    ("top2", lambda: MulticlassAccuracy(4, average="micro", top_k=2), "scores",
     lambda p, t: ((p.topk(2, 1).indices == t[:, None]).any(1), np.ones(len(t)))),
    ("precision", lambda: BinaryPrecision(), "binary", lambda p, t: ((p > 0.5) & (t == 1), p > 0.5)),
    ("recall", lambda: BinaryRecall(), "binary", lambda p, t: ((p > 0.5) & (t == 1), t == 1)),
    ("specificity", lambda: BinarySpecificity(), "binary", lambda p, t: ((p <= 0.5) & (t == 0), t == 0)),
    ("exact", lambda: MulticlassExactMatch(4), "sequences", lambda p, t: ((p.argmax(1) == t).all(1), np.ones(len(t)))),
]


@pytest.mark.parametrize(("name", "make", "inputs", "counts"), PROPORTIONS, ids=[p[0] for p in PROPORTIONS])
def test_proportions_get_the_wilson_interval_of_their_counts(name, make, inputs, counts) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    data = {
        "scores": (torch.randn(300, 4, generator=g), torch.randint(0, 4, (300,), generator=g)),
        "binary": (torch.rand(300, generator=g), torch.randint(0, 2, (300,), generator=g)),
        "sequences": (torch.randn(300, 4, 2, generator=g), torch.randint(0, 4, (300, 2), generator=g)),
    }[inputs]
    values, _ = run([(name, make())], split(*data))
    k, n = (np.asarray(c).sum() for c in counts(*data))
    expected = proportion_confint(int(k), int(n), alpha=0.05, method="wilson")
    assert values[name] == pytest.approx(k / n, rel=1e-6)
    assert tuple(values["intervals"][name]) == pytest.approx(expected, abs=1e-9)


def test_hamming_distance_is_the_complement_of_the_accuracy_interval() -> None:
    g = torch.Generator().manual_seed(4)
    preds, target = torch.rand(250, generator=g), torch.randint(0, 2, (250,), generator=g)
    values, _ = run([("hamming", BinaryHammingDistance())], split(preds, target))
    correct = int(((preds > 0.5).long() == target).sum())
    low, high = proportion_confint(correct, 250, alpha=0.05, method="wilson")
    assert tuple(values["intervals"]["hamming"]) == pytest.approx((1 - high, 1 - low), abs=1e-9)


def test_pixel_accuracy_takes_the_image_as_unit_not_the_pixels() -> None:
    g = torch.Generator().manual_seed(5)
    logits, target = torch.randn(90, 3, 6, 6, generator=g), torch.randint(0, 3, (90, 6, 6), generator=g)
    target[:, :2] = 255  # void pixels
    values, _ = run([("acc", MulticlassAccuracy(3, average="micro", ignore_index=255))], split(logits, target, size=16))
    valid = target != 255
    correct = ((logits.argmax(1) == target) & valid).reshape(90, -1).sum(1).double().numpy()
    expected = delta_reference(correct, valid.reshape(90, -1).sum(1).double().numpy(), values["acc"])
    assert tuple(values["intervals"]["acc"]) == pytest.approx(expected, rel=1e-6)
    naive = proportion_confint(int(correct.sum()), int(valid.sum()), method="wilson")
    assert values["intervals"]["acc"].high - values["intervals"]["acc"].low != pytest.approx(naive[1] - naive[0])


def test_mse_mae_rmse_and_perplexity_take_the_sample_as_unit() -> None:
    g = torch.Generator().manual_seed(6)
    preds, target = torch.randn(150, 2, generator=g), torch.randn(150, 2, generator=g)
    metrics = [("mse", MeanSquaredError()), ("rmse", MeanSquaredError(squared=False)), ("mae", MeanAbsoluteError())]
    values, _ = run(metrics, split(preds, target))
    sq = (preds - target).double().pow(2).sum(1).numpy()
    mse = delta_reference(sq, np.full(150, 2.0), values["mse"])
    assert tuple(values["intervals"]["mse"]) == pytest.approx(mse, rel=1e-6)
    ratio = sq.sum() / 300
    unshifted = delta_reference(sq, np.full(150, 2.0), ratio)
    assert tuple(values["intervals"]["rmse"]) == pytest.approx(tuple(math.sqrt(v) for v in unshifted), rel=1e-9)
    mae = delta_reference((preds - target).double().abs().sum(1).numpy(), np.full(150, 2.0), values["mae"])
    assert tuple(values["intervals"]["mae"]) == pytest.approx(mae, rel=1e-6)
    logits, tokens = torch.randn(60, 7, 11, generator=g), torch.randint(0, 11, (60, 7), generator=g)
    tokens[:, 5:] = -100
    values, _ = run([("ppl", Perplexity(ignore_index=-100))], split(logits, tokens, size=16))
    nll = F.cross_entropy(logits.double().transpose(1, 2), tokens, ignore_index=-100, reduction="none").sum(1)
    kept = (tokens != -100).sum(1).double()
    low, high = delta_reference(nll.numpy(), kept.numpy(), float(nll.sum() / kept.sum()))
    assert tuple(values["intervals"]["ppl"]) == pytest.approx((math.exp(low), math.exp(high)), rel=1e-9)


def test_macro_f1_replicates_are_sklearn_on_poisson_weighted_samples() -> None:
    g = torch.Generator().manual_seed(7)
    scores, target = torch.randn(200, 3, generator=g), torch.randint(0, 3, (200,), generator=g)
    spec = Intervals(replicates=40, seed=5, record=True)
    values, tracker = run([("f1", MulticlassF1Score(3, average="macro"))], split(scores, target), spec=spec)
    replicates = tracker.record().replicates["f1"]  # type: ignore[union-attr]
    pred = scores.argmax(1).numpy()
    for b in range(40):
        weights = [poisson_weight(5, b, i) for i in range(200)]
        expected = f1_score(target.numpy(), pred, average="macro", sample_weight=weights, zero_division=0)
        assert replicates[b].item() == pytest.approx(expected, rel=1e-9)
    assert values["intervals"]["f1"].low < values["f1"] < values["intervals"]["f1"].high


def test_a_metric_without_an_interval_is_named_in_a_warning() -> None:
    tracker = EvaluationIntervals(Intervals(), [("auroc", BinaryAUROC())], label=lambda name: f"val/{name}")
    assert tracker.names == ["loss"]
    assert tracker.warnings == [
        "No interval for `val/auroc`: BinaryAUROC keeps every sample's values (list states `preds`, `target`), "
        "which a fixed-size replicated state cannot weight; its value is logged without one."
    ]


def test_two_processes_packed_and_summed_give_the_one_process_intervals() -> None:
    g = torch.Generator().manual_seed(8)
    scores, target = torch.randn(301, 4, generator=g), torch.randint(0, 4, (301,), generator=g)
    make = lambda: [("acc", MulticlassAccuracy(4, average="micro")), ("f1", MulticlassF1Score(4))]  # noqa: E731
    one, _ = run(make(), split(scores, target), criterion=nn.CrossEntropyLoss())
    world, packed, trackers = 2, None, []
    for rank in range(world):  # DistributedSampler(shuffle=False): rank r has positions r, r + 2, ...
        metrics = make()
        tracker = EvaluationIntervals(Intervals(), metrics, criterion=nn.CrossEntropyLoss(), rank=rank, world=world)
        rows = torch.arange(rank, 301, world)
        for chunk in rows.split(32):
            outputs, labels = scores[chunk], target[chunk]
            for _, metric in metrics:
                metric.update(outputs, labels)
            tracker.update(outputs, labels, [(outputs, labels)] * 2, batch_loss(nn.CrossEntropyLoss(), outputs, labels),
                           len(chunk))
        part = tracker.pack(CPU)
        packed = part if packed is None else packed + part
        trackers.append(tracker)
    values = {k: v for k, v in one.items() if k != "intervals"}
    intervals = trackers[0].finish(packed, values)
    for name in ("loss", "acc", "f1"):
        assert tuple(intervals[name]) == pytest.approx(tuple(one["intervals"][name]), rel=1e-12), name


def test_updates_and_pack_never_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    logits, target = torch.randn(4, 3, 5, 5, generator=g), torch.randint(0, 3, (4, 5, 5), generator=g)
    metrics = [("acc", MulticlassAccuracy(3, average="micro")), ("f1", MulticlassF1Score(3)),
               ("fast", FastMulticlassAccuracy(3))]
    criterion = nn.CrossEntropyLoss(ignore_index=0)
    tracker = EvaluationIntervals(Intervals(record=True), metrics, criterion=criterion)
    for _ in range(3):
        for _, metric in metrics:  # torchmetrics' own update may sync (bincount): not the tracker's
            metric.update(logits, target)
        batch = batch_loss(criterion, logits, target)
        with no_host_sync(monkeypatch, FORBIDDEN):
            tracker.update(logits, target, [(logits, target)] * 3, batch, 4)
    with no_host_sync(monkeypatch, FORBIDDEN):
        packed = tracker.pack(CPU)
    assert packed.numel() == tracker.size()


def test_the_record_keeps_each_samples_terms_and_the_replicates() -> None:
    g = torch.Generator().manual_seed(10)
    scores, target = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    metrics = [("acc", MulticlassAccuracy(3, average="micro")), ("f1", MulticlassF1Score(3))]
    _, tracker = run(metrics, split(scores, target, size=16), criterion=nn.CrossEntropyLoss(),
                     spec=Intervals(replicates=20, record=True))
    record = tracker.record()
    assert record is not None and record.samples == 50 and torch.equal(record.ids, torch.arange(50))
    assert record.kinds == {"loss": "ratio", "acc": "proportion", "f1": "bootstrap"}
    correct = (scores.argmax(1) == target).double()
    assert torch.equal(record.rows["acc"], torch.stack([correct, torch.ones(50, dtype=torch.float64)], 1))
    losses = F.cross_entropy(scores.double(), target, reduction="none")
    torch.testing.assert_close(record.rows["loss"][:, 0], losses, rtol=1e-6, atol=1e-7)
    assert record.replicates["f1"].shape == (20,)


def test_per_row_loss_terms_of_your_own_give_the_token_loss_its_interval() -> None:
    """A language model's compute_loss: each sequence's summed token losses and its tokens, as LossTerms rows."""
    from lightning_validate import LossTerms

    g = torch.Generator().manual_seed(11)
    logits, tokens = torch.randn(80, 6, 13, generator=g), torch.randint(0, 13, (80, 6), generator=g)
    tokens[torch.rand(80, 6, generator=g) < 0.25] = -100

    def per_row(outputs: Tensor, target: Tensor) -> LossTerms:
        losses = F.cross_entropy(outputs.transpose(1, 2), target, reduction="none")  # 0 where ignored
        return LossTerms(sum=losses.sum(1), weight=(target != -100).sum(1))

    batch = value_terms(per_row(logits[:16], tokens[:16]), 16)
    whole = F.cross_entropy(logits[:16].transpose(1, 2), tokens[:16])
    assert float(batch.step_loss) == pytest.approx(float(whole), rel=1e-6)  # the batch's token mean
    values, _ = run([], split(logits, tokens, size=16), loss=per_row)
    nll = F.cross_entropy(logits.double().transpose(1, 2), tokens, reduction="none").sum(1)
    kept = (tokens != -100).sum(1).double()
    assert values["loss"] == pytest.approx(float(nll.sum() / kept.sum()), rel=1e-6)
    expected = delta_reference(nll.numpy(), kept.numpy(), values["loss"])
    assert tuple(values["intervals"]["loss"]) == pytest.approx(expected, rel=1e-6)
