import math

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate.metrics.accumulators import FOLD_EVERY as _FOLD_EVERY
from lightning_validate.metrics.accumulators import LossAccumulator, TargetRange
from lightning_validate.metrics.batches import batch_size_of
from lightning_validate.metrics.checks import check_metrics
from lightning_validate.metrics.fast_accuracy import FastMulticlassAccuracy, default_metrics
from lightning_validate.metrics.loss_terms import BatchLoss, LossTerms
from lightning_validate.metrics.padding import PaddingFilter, real_samples, take_first
from lightning_validate.metrics.states import local_value


def test_loss_accumulator_is_the_per_sample_mean_across_folds():
    gen = torch.Generator().manual_seed(0)
    per_sample = torch.rand(1000, generator=gen, dtype=torch.float64)
    acc = LossAccumulator()
    sizes = [3] * 330 + [10]  # more batches than one fold, a different last batch
    start = 0
    for n in sizes:
        acc.update(per_sample[start : start + n].float().mean(), n)
        start += n
    assert acc.batches > _FOLD_EVERY
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert (weight, nonfinite, batches) == (1000, 0, len(sizes))
    assert acc.value(total, weight) == pytest.approx(per_sample.mean().item(), abs=1e-6)
    assert acc.running_value().item() == pytest.approx(per_sample.mean().item(), abs=1e-6)


def test_loss_accumulator_sum_per_sample_and_terms():
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    per_sample, as_mean, as_terms = LossAccumulator(), LossAccumulator(), LossAccumulator()
    for acc, first, second in [
        (per_sample, losses[:3], losses[3:]),
        (as_mean, losses[:3].mean(), losses[3:].mean()),
        (as_terms, LossTerms(losses[:3].sum(), 3), LossTerms(losses[3:].sum(), torch.tensor(1))),
    ]:
        acc.update(first, 3)
        acc.update(second, 1)
        assert acc.running_value().item() == pytest.approx(3.0)
    as_sum = LossAccumulator("sum")  # reduction="sum": the sum over the set
    as_sum.update(losses[:3].sum(), 3)
    as_sum.update(losses[3:].sum(), 1)
    assert as_sum.running_value().item() == pytest.approx(12.0)
    assert as_sum.value(*as_sum.summary().tolist()[:2]) == pytest.approx(12.0)
    pixels = LossAccumulator()
    pixels.update(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), 2)  # per-element losses: each counts once
    pixels.update(torch.tensor([[10.0, 10.0]]), 1)
    assert pixels.running_value().item() == pytest.approx(36 / 6)


def test_loss_accumulator_batches_of_weight_zero_add_nothing():
    acc = LossAccumulator()
    acc.add(BatchLoss(torch.tensor(math.nan), torch.tensor(0.0)))  # a mean over nothing: torch gives nan
    acc.add(BatchLoss(torch.tensor(2.0), torch.tensor(4.0)))
    acc.add(BatchLoss(torch.tensor(0.0), torch.tensor(0), True))
    acc.add(BatchLoss(torch.tensor(math.nan), 0))  # host weight 0
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert (total, weight, nonfinite, batches) == (8.0, 4.0, 0.0, 4.0)
    empty = LossAccumulator()
    empty.add(BatchLoss(torch.tensor(math.nan), torch.tensor(0.0)))
    total, weight, nonfinite, batches = empty.summary().tolist()
    assert (total, weight, nonfinite, batches) == (0.0, 0.0, 0.0, 1.0)
    assert math.isnan(empty.value(total, weight))


def test_loss_accumulator_counts_nonfinite_batches_and_rejects_bad_input():
    acc = LossAccumulator()
    assert acc.running_value() is None
    assert acc.summary().tolist() == [0.0, 0.0, 0.0, 0.0]
    for value in [1.0, math.nan, 2.0, math.inf]:
        acc.update(torch.tensor(value), 2)
    acc.add(BatchLoss(torch.tensor(math.nan), torch.tensor(3.0)))
    total, weight, nonfinite, batches = acc.summary().tolist()
    assert (weight, nonfinite, batches) == (11, 3, 5) and math.isnan(total)
    with pytest.raises(ValueError, match=r"first dimension 4 \(the batch size\) but got shape \(3,\)"):
        acc.update(torch.ones(3), 4)
    with pytest.raises(TypeError, match=r"Expected the loss function to return a float tensor .* but got a "
                                        r"tensor of shape \(\) and dtype torch.int64"):
        acc.update(torch.tensor(1), 4)
    with pytest.raises(TypeError, match=r"Expected `LossTerms.weight` from the loss function to be a 0-dim tensor "
                                        r"or a number but got a tensor of shape \(2,\)"):
        acc.update(LossTerms(torch.tensor(1.0), torch.ones(2)), 2)
    with pytest.raises(TypeError, match=r"Expected `LossTerms.sum` from the loss function to be a 0-dim float tensor "
                                        r"or one per row, of shape \(2,\) but got a tensor of shape \(3,\)"):
        acc.update(LossTerms(torch.ones(3), 2), 2)
    with pytest.raises(ValueError, match="Expected argument `reduction` to be 'mean' or 'sum' but got 'none'"):
        LossAccumulator("none")


def test_target_range_counts_bad_batches_and_extremes():
    tr = TargetRange(num_classes=10, ignore_index=-100)
    for target in [torch.tensor([0, 9]), torch.tensor([-100, 3]), torch.tensor([2, 12]), torch.tensor([-1, 5])]:
        tr.update(target)
    tr.update(torch.tensor([0.5, 20.0]))  # float targets (regression): not class indices, ignored
    tr.update(torch.tensor([], dtype=torch.long))
    bad, extremes = tr.summary(torch.device("cpu"))
    assert bad.tolist() == [2]
    assert extremes.tolist() == [100, 12]  # -smallest (the ignore_index), largest
    empty_bad, _ = TargetRange(3).summary(torch.device("cpu"))
    assert empty_bad.tolist() == [0]


def test_target_range_folds_long_epochs():
    tr = TargetRange(num_classes=3)
    for i in range(_FOLD_EVERY + 5):
        tr.update(torch.tensor([0, 3 if i % 100 == 0 else 2]))
    bad, extremes = tr.summary(torch.device("cpu"))
    assert bad.tolist() == [3] and extremes.tolist() == [0, 3]


@pytest.mark.parametrize("size", [10, 11, 12, 3])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_real_samples_and_padding_filter_count_every_sample_once(size, world):
    data = list(range(size))
    seen: list[int] = []
    for rank in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, sampler=sampler, batch_size=2)
        keep = PaddingFilter(real_samples(loader))
        for batch in loader:
            seen += batch[: keep.keep(len(batch))].tolist()
    assert sorted(seen) == data


def test_real_samples_recognizes_lightning_wrappers_and_nothing_else():
    data = list(range(11))
    wrapped = DistributedSamplerWrapper(SequentialSampler(data), num_replicas=2, rank=1, shuffle=False)
    assert real_samples(DataLoader(data, sampler=wrapped, batch_size=4)) == 5  # 6 with one repeat
    unrepeated = UnrepeatedDistributedSamplerWrapper(SequentialSampler(data), num_replicas=2, rank=1, shuffle=False)
    assert real_samples(DataLoader(data, sampler=unrepeated, batch_size=4)) == 5

    class Custom(DistributedSampler):  # its order is not known: not guessed
        pass

    assert real_samples(DataLoader(data, sampler=Custom(data, num_replicas=2, rank=1), batch_size=4)) is None
    dropping = DistributedSampler(data, num_replicas=2, rank=1, drop_last=True)
    assert real_samples(DataLoader(data, sampler=dropping, batch_size=4)) is None
    assert real_samples(DataLoader(data, batch_size=4)) is None
    assert real_samples(object()) is None


def test_padding_filter_without_limit_keeps_everything():
    f = PaddingFilter()
    assert [f.keep(4) for _ in range(3)] == [4, 4, 4]
    f = PaddingFilter(limit=5)
    assert [f.keep(4), f.keep(4), f.keep(4)] == [4, 1, 0]


def test_batch_size_of_and_take_first():
    x, y = torch.zeros(5, 3), torch.arange(5)
    assert batch_size_of(y) == 5
    assert batch_size_of({"a": [torch.tensor(1.0), x]}) == 5
    assert batch_size_of(["text"]) == 1  # per-sample items: their count
    assert batch_size_of((y, x)) == 5  # per-task targets (default_collate): the shared batch dimension
    assert batch_size_of([torch.zeros(3, 4), torch.zeros(1, 4)]) == 2  # per-sample tensors of different sizes
    assert batch_size_of([]) is None and batch_size_of(torch.tensor(1.0)) is None and batch_size_of(3) is None
    cut = take_first({"x": x, "y": y, "scale": torch.tensor(2.0), "other": torch.zeros(7)}, 5, 2)
    assert cut["x"].shape == (2, 3) and cut["y"].tolist() == [0, 1]
    assert cut["scale"].ndim == 0 and cut["other"].shape == (7,)


def test_local_value_does_not_cache_or_sync():
    acc = MulticlassAccuracy(3, average="micro")
    assert local_value(acc) is None  # no update yet
    acc.update(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 2]))
    assert local_value(acc).item() == pytest.approx(0.5)
    assert acc._computed is None
    assert local_value(MeanMetric() + SumMetric()) is None  # compositions call their children's compute()
    per_class = MulticlassAccuracy(3, average=None)
    per_class.update(torch.eye(3), torch.arange(3))
    assert local_value(per_class) is None


def test_default_metrics():
    assert default_metrics(None) == {}
    metric = default_metrics(4)["acc"]
    assert isinstance(metric, MulticlassAccuracy) and metric.average == "micro"
    with pytest.raises(ValueError, match=r"Expected `num_classes` to be an int >= 2 but got 1"):
        default_metrics(1)


def test_check_metrics_accepts_dicts_and_collections():
    acc = MulticlassAccuracy(3)
    assert check_metrics({"acc": acc}) == {"acc": acc}
    collection = MetricCollection({"acc": MulticlassAccuracy(3), "f1": MulticlassF1Score(3)}, prefix="m_")
    assert sorted(check_metrics(collection)) == ["m_acc", "m_f1"]


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        (
            [MulticlassAccuracy(3)],
            TypeError,
            r"^Expected the result of `configure_metrics\(\)` to be a dict of torchmetrics `Metric` objects or a "
            r"`MetricCollection` but got a list of 1: \(a MulticlassAccuracy\)\. Pass e\.g\. `return \{'accuracy': ",
        ),
        (
            {"acc": torch.sum},
            TypeError,
            r"the value for 'acc' in the result of `configure_metrics\(\)` to be a torchmetrics `Metric` but got a "
            r"function \(.* use the class, not the functional form\)",
        ),
        ({"acc": 0.5}, TypeError, r"the value for 'acc' in .* but got a float\. Pass e\.g\. "),
        (
            {1: MulticlassAccuracy(3)},
            TypeError,
            r"names in the result of `configure_metrics\(\)` to be strings but got 1\.",
        ),
        ({"loss": MeanMetric()}, ValueError, r"Metric name 'loss' .* not 'loss'"),
        ({"a.b": MeanMetric()}, ValueError, r"Metric name 'a.b' .* without '\.'"),
        ({"f1": MulticlassF1Score(3, average=None)}, ValueError, r"`f1` .* not a scalar: .*average='macro'"),
        (
            {"acc": MulticlassAccuracy(3, multidim_average="samplewise")},
            ValueError,
            r"one value per sample: use `multidim_average='global'`",
        ),
    ],
)
def test_check_metrics_errors(metrics, error, match):
    with pytest.raises(error, match=match):
        check_metrics(metrics)


@pytest.mark.parametrize("shape", [(50,), (20, 7)])
def test_fast_accuracy_equals_torchmetrics(shape):
    gen = torch.Generator().manual_seed(1)
    fast, reference = FastMulticlassAccuracy(5), MulticlassAccuracy(5, average="micro")
    for _ in range(3):
        preds = torch.randn(shape[0], 5, *shape[1:], generator=gen)
        target = torch.randint(0, 5, shape, generator=gen)
        fast.update(preds, target)
        reference.update(preds, target)
        fast.update(preds.argmax(1), target)  # labels work too
        reference.update(preds.argmax(1), target)
    assert fast.compute().item() == reference.compute().item()
    for name in ("tp", "fp", "tn", "fn"):  # up to date once read through compute()
        assert getattr(fast, name).tolist() == getattr(reference, name).tolist()


def test_fast_accuracy_pending_counts_reach_every_reader():
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(8, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(_FOLD_EVERY + 3)
    ]
    fast, reference = FastMulticlassAccuracy(4), MulticlassAccuracy(4, average="micro")
    for preds, target in batches:
        fast.update(preds, target)
        reference.update(preds, target)
    copy = fast.clone()  # pending counts travel with a copy
    assert copy.compute().item() == reference.compute().item()
    state = FastMulticlassAccuracy(4, sync_on_compute=False)
    state.persistent(True)
    state.update(*batches[0])
    assert state.state_dict()["tp"].item() == (batches[0][0].argmax(1) == batches[0][1]).sum().item()
    other = FastMulticlassAccuracy(4)
    other.update(*batches[1])
    fast.merge_state(other)
    reference.update(*batches[1])
    assert fast.compute().item() == reference.compute().item()
    batch_value = fast(*batches[2])  # forward: the batch's value, and accumulated
    reference.update(*batches[2])
    assert batch_value.item() == MulticlassAccuracy(4, average="micro")(*batches[2]).item()
    assert fast.compute().item() == reference.compute().item()
    fast.update(*batches[3])
    moved = fast.to(torch.float64)
    assert moved.tp.item() == fast.tp.item() and not fast.__dict__["_pending"]
    fast.reset()
    fast.update(*batches[0])
    assert fast.compute().item() == (batches[0][0].argmax(1) == batches[0][1]).double().mean().item()


def test_fast_accuracy_states_made_under_inference_mode_still_update_outside():
    fast = FastMulticlassAccuracy(3)
    with torch.inference_mode():
        fast.reset()
        fast.update(torch.eye(3), torch.tensor([0, 1, 1]))
    assert fast.tp.is_inference()
    fast.update(torch.eye(3), torch.tensor([0, 1, 2]))  # in place would raise here
    assert fast.compute().item() == pytest.approx(5 / 6)
    sample_wise = FastMulticlassAccuracy(3, multidim_average="samplewise")  # falls back to torchmetrics' update
    sample_wise.update(torch.eye(3)[None].repeat(2, 1, 1).transpose(1, 2), torch.tensor([[0, 1, 2], [0, 0, 0]]))
    assert sample_wise.compute().tolist() == pytest.approx([1.0, 1 / 3])
