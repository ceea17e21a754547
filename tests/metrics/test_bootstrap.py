"""The Poisson bootstrap: its weights, its replicates against the metrics' own values, invariance and coverage."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from host_sync import no_host_sync
from scipy import stats
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MultilabelAccuracy,
    MultilabelF1Score,
)
from torchmetrics.regression import ExplainedVariance, PearsonCorrCoef, R2Score

from lightning_validate.metrics.bootstrap import PoissonWeights, Replicated, Unsupported, family_of, poisson_weight
from lightning_validate.metrics.intervals import percentile

CPU = torch.device("cpu")
N, C = 300, 4
SETS = 2000

FORBIDDEN = [(Tensor, "item"), (Tensor, "tolist"), (Tensor, "cpu"), (Tensor, "numpy"), (Tensor, "__bool__"),
             (Tensor, "__float__"), (Tensor, "__int__"), (Tensor, "nonzero"), (torch, "nonzero"),
             (torch, "bincount"), (torch, "unique")]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Simulations of many small sets: one thread (two compete with each other on small tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Ones:
    """Every sample once, in one replicate: the replicate is the metric on the data itself."""

    replicates = 1

    def at(self, start: int, count: int, world: int = 1, rank: int = 0, device: torch.device | None = None) -> Tensor:
        return torch.ones(count, 1)

    def __call__(self, ids: Tensor) -> Tensor:
        return torch.ones(ids.numel(), 1)


def data() -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "scores": (torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g)),
        "pixels": (torch.randn(N, C, 3, 2, generator=g), torch.randint(0, C, (N, 3, 2), generator=g)),
        "labels": (torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)),
        "probs": (torch.rand(N, generator=g), torch.randint(0, 2, (N,), generator=g)),
        "logits": (torch.randn(N, generator=g) * 3, torch.randint(0, 2, (N,), generator=g)),
        "multilabel": (torch.randn(N, 3, generator=g), torch.randint(0, 2, (N, 3), generator=g)),
        "regression": (torch.randn(N, generator=g), torch.randn(N, generator=g) * 2 + 0.5),
    }


CASES = [
    (lambda: MulticlassF1Score(C, average="macro"), "scores"),
    (lambda: MulticlassF1Score(C, average="weighted"), "scores"),
    (lambda: MulticlassF1Score(C, average="micro"), "pixels"),
    (lambda: MulticlassF1Score(C, average="macro", ignore_index=2), "pixels"),
    (lambda: MulticlassAccuracy(C, average="macro"), "scores"),
    (lambda: MulticlassAccuracy(C, average="micro", top_k=2), "scores"),
    (lambda: MulticlassRecall(C, average="macro", top_k=2), "scores"),
    (lambda: MulticlassPrecision(C, average="macro", ignore_index=1), "labels"),
    (lambda: MulticlassSpecificity(C, average="weighted"), "scores"),
    (lambda: BinaryF1Score(), "probs"),
    (lambda: BinaryF1Score(threshold=0.3), "logits"),
    (lambda: BinaryAccuracy(ignore_index=0), "probs"),
    (lambda: MultilabelF1Score(3, average="macro"), "multilabel"),
    (lambda: MultilabelAccuracy(3, average="micro"), "multilabel"),
    (lambda: MulticlassJaccardIndex(C), "scores"),
    (lambda: MulticlassJaccardIndex(C, ignore_index=0), "pixels"),
    (lambda: MulticlassCohenKappa(C), "scores"),
    (lambda: MulticlassMatthewsCorrCoef(C), "labels"),
    (lambda: BinaryJaccardIndex(), "probs"),
    (lambda: BinaryMatthewsCorrCoef(), "logits"),
    (lambda: R2Score(), "regression"),
    (lambda: ExplainedVariance(), "regression"),
]
IDS = [f"{make().__class__.__name__}-{getattr(make(), 'average', '')}-{inputs}" for make, inputs in CASES]


@pytest.mark.parametrize(("make", "inputs"), CASES, ids=IDS)
def test_a_replicate_that_weighs_every_sample_once_is_the_metrics_own_value(make, inputs) -> None:  # type: ignore[no-untyped-def]
    args = data()[inputs]
    metric: Metric = make()
    replicated = Replicated(metric, family_of(metric), Ones())  # type: ignore[arg-type]
    for start in range(0, N, 64):
        batch = tuple(a[start : start + 64] for a in args)
        metric.update(*batch)
        replicated.update(batch, torch.arange(start, min(start + 64, N)))
    value = replicated.values(replicated.pack(CPU))
    assert value.shape == (1,)
    assert value.item() == pytest.approx(metric.compute().item(), rel=1e-5, abs=1e-7)


def test_weights_are_the_python_definition_on_any_layout() -> None:
    weights = PoissonWeights(7, 42)
    ids = torch.arange(0, 3000)
    expected = torch.tensor([[poisson_weight(42, b, i) for i in range(3000)] for b in range(7)], dtype=torch.float32)
    assert torch.equal(weights(ids), expected.t())  # one row per sample
    # Rank 2 of 3 processes sees positions 2, 5, 8, ...: the same weights as those samples on one process.
    assert torch.equal(weights.at(10, 50, world=3, rank=2), expected.t()[32:182:3])
    assert torch.equal(weights.at(4090, 20), weights(torch.arange(4090, 4110)))  # across a block of hashed keys
    with pytest.raises(ValueError, match=r"Expected a sample index in \[0, 2\*\*31\) but got -1"):
        poisson_weight(0, 0, -1)


def test_weights_are_poisson_1_independent_across_samples_and_replicates() -> None:
    w = PoissonWeights(200, 3)(torch.arange(5000)).double().t()  # 1e6 draws, (replicates, samples)
    counts = torch.bincount(w.long().flatten(), minlength=8)[:8].double()
    expected = torch.tensor([stats.poisson.pmf(k, 1.0) for k in range(8)], dtype=torch.float64) * w.numel()
    assert ((counts - expected).abs() <= 5 * expected.sqrt() + 2).all(), (counts, expected)
    assert w.mean().item() == pytest.approx(1.0, abs=0.005) and w.var().item() == pytest.approx(1.0, abs=0.01)
    centred = w - 1.0
    bound = 5 / math.sqrt(centred[:, 1:].numel())
    assert abs((centred[:, 1:] * centred[:, :-1]).mean().item()) < bound  # neighbouring samples
    assert abs((centred[1:] * centred[:-1]).mean().item()) < bound  # neighbouring replicates
    other_seed = PoissonWeights(200, 4)(torch.arange(5000)).double().t() - 1.0
    assert abs((centred * other_seed).mean().item()) < bound


@pytest.mark.parametrize("make", [lambda: MulticlassF1Score(C, average="macro"), lambda: R2Score()],
                         ids=["f1-counts", "r2-float64"])
def test_replicates_are_the_same_at_any_batch_size_and_on_any_number_of_processes(make) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    if isinstance(make(), R2Score):
        args = (torch.randn(N, generator=g), torch.randn(N, generator=g))
    else:
        args = (torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g))
    weights = PoissonWeights(500, 0)
    results = []
    for batch in (1, 7, 64):
        metric = make()
        replicated = Replicated(metric, family_of(metric), weights)
        for start in range(0, N, batch):
            replicated.update(tuple(a[start : start + batch] for a in args), torch.arange(start, min(start + batch, N)))
        results.append(replicated.values(replicated.pack(CPU)))
    world = 2  # DistributedSampler(shuffle=False): rank r has positions r, r + 2, ...; one sum of the packed states
    packed = torch.zeros_like(replicated.pack(CPU))
    for rank in range(world):
        metric = make()
        replicated = Replicated(metric, family_of(metric), weights)
        rows = torch.arange(rank, N, world)
        for chunk in rows.split(13):
            replicated.update(tuple(a[chunk] for a in args), chunk)
        packed += replicated.pack(CPU)
    results.append(replicated.values(packed))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-9, atol=0.0)
    assert results[0].std() > 0


def test_a_metric_it_cannot_replicate_says_why() -> None:
    with pytest.raises(Unsupported, match=r"BinaryAUROC keeps every sample's values \(list states `preds`, `target`\)"):
        family_of(BinaryAUROC())
    with pytest.raises(Unsupported, match="PearsonCorrCoef is not a metric whose states this bootstrap can split"):
        family_of(PearsonCorrCoef())
    metric = R2Score()
    replicated = Replicated(metric, family_of(metric), PoissonWeights(10, 0))
    with pytest.raises(Unsupported, match=r"R2Score on several outputs \(shape \(4, 2\)\)"):
        replicated.update((torch.randn(4, 2), torch.randn(4, 2)), torch.arange(4))


def test_update_never_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    metric = MulticlassJaccardIndex(C, ignore_index=0)
    replicated = Replicated(metric, family_of(metric), PoissonWeights(50, 0))
    preds, target = data()["pixels"]
    with no_host_sync(monkeypatch, FORBIDDEN):
        for start in range(0, N, 64):
            replicated.update((preds[start : start + 64], target[start : start + 64]),
                              torch.arange(start, min(start + 64, N)))
        packed = replicated.pack(CPU)
    assert replicated.values(packed).shape == (50,)


def test_macro_f1_is_covered_95_percent_of_the_time(one_thread: None) -> None:
    # A known population: the joint distribution of (target, prediction) over 3 classes.
    joint = torch.tensor([[0.25, 0.05, 0.03], [0.06, 0.20, 0.04], [0.04, 0.08, 0.25]], dtype=torch.float64)
    truth = (2 * joint.diag() / (joint.sum(0) + joint.sum(1))).mean().item()
    n, replicates = 400, 400
    cells = torch.from_numpy(np.random.default_rng(0).choice(9, size=(SETS, n), p=joint.flatten().numpy()))
    weights = PoissonWeights(replicates, 0)
    metric = MulticlassF1Score(3, average="macro")
    family = family_of(metric)
    covered = 0
    for s in range(SETS):
        target, pred = cells[s] // 3, cells[s] % 3
        replicated = Replicated(metric, family, weights)
        replicated.update((pred, target), torch.arange(n) + s * n)  # each set its own samples
        low, high = percentile(replicated.values(replicated.pack(CPU)), 0.95)
        covered += low <= truth <= high
    assert 0.935 <= covered / SETS <= 0.965, covered / SETS
