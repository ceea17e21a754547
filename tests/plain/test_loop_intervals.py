"""validate(confidence=...): each value with its bounds, against references; off by default; warnings pinned."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from statsmodels.stats.proportion import proportion_confint
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from lightning_validate import Intervals, validate


def data(n: int = 300) -> tuple[nn.Module, DataLoader, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    return nn.Linear(6, 3), DataLoader(TensorDataset(x, y), batch_size=32), x, y


def test_without_confidence_nothing_is_added() -> None:
    model, loader, _, _ = data()
    values = validate(model, loader, criterion=nn.CrossEntropyLoss(), metrics={"acc": MulticlassAccuracy(3)},
                      progress=False)
    assert sorted(values) == ["acc", "loss"]


def test_each_value_gets_its_bounds_equal_to_the_references() -> None:
    model, loader, x, y = data()
    metrics = MetricCollection({"acc": MulticlassAccuracy(3, average="micro"), "f1": MulticlassF1Score(3)},
                               prefix="val_")
    values = validate(model, loader, criterion=nn.CrossEntropyLoss(), metrics=metrics, progress=False,
                      confidence=Intervals(confidence=0.9, replicates=200))
    assert list(values) == ["loss", "val_acc", "val_f1", "loss_low", "loss_high", "val_acc_low", "val_acc_high",
                            "val_f1_low", "val_f1_high"]
    with torch.no_grad():
        logits = model(x).double()
    correct = int((logits.argmax(1) == y).sum())
    assert (values["val_acc_low"], values["val_acc_high"]) == pytest.approx(
        proportion_confint(correct, 300, alpha=0.1, method="wilson"), abs=1e-9)
    losses = F.cross_entropy(logits, y, reduction="none").numpy()
    assert (values["loss_low"], values["loss_high"]) == pytest.approx(
        stats.t.interval(0.9, 299, loc=values["loss"], scale=stats.sem(losses)), rel=1e-6)
    assert values["val_f1_low"] < values["val_f1"] < values["val_f1_high"]


def test_a_value_without_an_interval_is_named_in_a_warning_at_the_call() -> None:
    model, loader, _, _ = data()
    with pytest.warns(UserWarning, match=r"No interval for `auroc`: MulticlassAUROC keeps every sample's values") as w:
        values = validate(model, loader, metrics={"auroc": MulticlassAUROC(3)}, progress=False, confidence=0.95)
    assert w[0].filename == __file__  # the warning points at the validate() call
    assert "auroc" in values and "auroc_low" not in values
    with pytest.raises(ValueError, match=r"Expected argument `confidence` to be None \(no intervals\), a confidence "
                                         r"level in \(0, 1\).* but got 'high'\."):
        validate(model, loader, metrics={"acc": MulticlassAccuracy(3)}, progress=False, confidence="high")


def test_per_class_recall_gets_a_wilson_interval_per_class() -> None:
    from torchmetrics.classification import MulticlassRecall
    from torchmetrics.wrappers import ClasswiseWrapper

    model, loader, x, y = data()
    wrapper = ClasswiseWrapper(MulticlassRecall(3, average=None), labels=["cat", "dog", "eel"], prefix="recall_")
    values = validate(model, loader, metrics={"recall": wrapper}, progress=False, confidence=0.95)
    with torch.no_grad():
        pred = model(x).argmax(1)
    for c, label in enumerate(["cat", "dog", "eel"]):
        right, total = int(((pred == c) & (y == c)).sum()), int((y == c).sum())
        expected = proportion_confint(right, total, alpha=0.05, method="wilson")
        assert (values[f"recall_{label}_low"], values[f"recall_{label}_high"]) == pytest.approx(expected, abs=1e-9)
