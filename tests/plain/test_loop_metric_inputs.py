"""``validate(..., metric_inputs=...)``: tuple outputs, weighted targets and one metric per head, against sklearn."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import validate


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y), torch.linspace(0.5, 2.0, len(y))


class TwoHeads(nn.Module):
    """``forward`` returns ``{"digit": logits over 10, "parity": logits over 2}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3))
        self.digit = nn.Linear(32, 10)
        self.parity = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"digit": self.digit(h), "parity": self.parity(h)}


def full(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = {k: v.double() for k, v in model(x).items()}
    model.train()
    return out


def test_tuple_outputs_and_weighted_targets(digits: Any) -> None:
    x, y, w = digits
    model = TwoHeads()
    loader = DataLoader(TensorDataset(x, y, w), batch_size=64)  # 1797 % 64 == 5: a short last batch

    def step(batch: Any, model: nn.Module) -> tuple[Any, Any]:
        out = model(batch[0])
        return (out["digit"], out["parity"]), (batch[1], batch[2])  # outputs (logits, aux), target (y, w)

    def criterion(outputs: Any, target: Any) -> torch.Tensor:
        return (F.cross_entropy(outputs[0], target[0], reduction="none") * target[1]).mean()

    result = validate(model, loader, criterion=criterion, step=step, progress=False,
                      metrics={"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10)},
                      metric_inputs=lambda outputs, target: (outputs[0], target[0]))
    digit = full(model, x)["digit"]
    pred = digit.argmax(1).numpy()
    assert result["loss"] == pytest.approx((F.cross_entropy(digit, y, reduction="none") * w).mean().item(), abs=1e-6)
    assert result["acc"] == pytest.approx(accuracy_score(y.numpy(), pred), abs=1e-6)
    assert result["f1"] == pytest.approx(f1_score(y.numpy(), pred, average="macro"), abs=1e-6)


def test_two_heads_get_one_metric_each(digits: Any) -> None:
    x, y, _ = digits
    model = TwoHeads()
    result = validate(
        model,
        DataLoader(TensorDataset(x, y), batch_size=100),
        metrics={"digit_acc": MulticlassAccuracy(10, average="micro"), "parity_acc": MulticlassAccuracy(2)},
        metric_inputs=lambda outputs, target: {
            "digit_acc": (outputs["digit"], target),
            "parity_acc": (outputs["parity"], target % 2),
        },
        progress=False,
    )
    out = full(model, x)
    assert result["digit_acc"] == pytest.approx(accuracy_score(y.numpy(), out["digit"].argmax(1).numpy()), abs=1e-6)
    parity = (y % 2).numpy()
    # MulticlassAccuracy's default average is "macro": the mean recall over the two classes.
    recalls = [accuracy_score(parity[parity == c], out["parity"].argmax(1).numpy()[parity == c]) for c in (0, 1)]
    assert result["parity_acc"] == pytest.approx(sum(recalls) / 2, abs=1e-6)


def test_a_metric_on_a_tuple_names_the_argument_and_the_code(digits: Any) -> None:
    x, y, _ = digits
    model = TwoHeads()
    loader = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50)
    acc = MulticlassAccuracy(10)
    acc.update(torch.eye(10)[:4], torch.tensor([0, 1, 2, 0]))
    before = acc.compute().item()
    expected = (r"Metric `acc` \(MulticlassAccuracy\) failed on outputs a dict with keys \['digit', 'parity'\] and "
                r"target Tensor\(shape=\(50,\), dtype=int64\): .*\. A metric takes tensors; .* pass `metric_inputs` to "
                r"validate\(\) .*`validate\(model, loader, \.\.\., metric_inputs=lambda outputs, target: "
                r"\(outputs\['digit'\], target\)\)`\.")
    with pytest.raises(TypeError, match=expected):
        validate(model, loader, metrics={"acc": acc}, progress=False)
    assert acc.compute().item() == before  # the metric's states are given back
    assert model.training

    collection = MetricCollection({"a": MulticlassAccuracy(10), "b": MulticlassAccuracy(2)})
    with pytest.raises(TypeError, match=r"Expected `metrics` as a dict `\{name: Metric\}` when `metric_inputs` returns "
                                        r"the inputs of each metric by name, but got a `MetricCollection`"):
        validate(model, loader, metrics=collection, progress=False,
                 metric_inputs=lambda o, t: {"a": (o["digit"], t), "b": (o["parity"], t % 2)})
    # a tuple goes to every member of a collection
    result = validate(model, loader, metrics=MetricCollection({"acc": MulticlassAccuracy(10, average="micro")}),
                      metric_inputs=lambda o, t: (o["digit"], t), progress=False)
    pred = full(model, x[:100])["digit"].argmax(1).numpy()
    assert result["acc"] == pytest.approx(accuracy_score(y[:100].numpy(), pred), abs=1e-6)

    with pytest.raises(ValueError, match=r"Expected `metric_inputs\(outputs, target\)` to return the inputs of each "
                                         r"metric by name, \['acc'\], but got missing \['acc'\] and unknown \['ac'\]"):
        validate(model, loader, metrics={"acc": MulticlassAccuracy(10)}, progress=False,
                 metric_inputs=lambda o, t: {"ac": (o["digit"], t)})
    with pytest.raises(TypeError, match=r"Expected argument `metric_inputs` to be a callable `metric_inputs\(outputs, "
                                        r"target\) -> \(preds, target\)` but got a str\."):
        validate(model, loader, metrics={"acc": MulticlassAccuracy(10)}, metric_inputs="digit")  # type: ignore[arg-type]


def test_the_hook_path_reads_nothing_back_per_batch(digits: Any) -> None:
    x, y, _ = digits
    model = TwoHeads()
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def reads(num_batches: int) -> list[str]:
        calls: list[str] = []
        saved = {name: getattr(torch.Tensor, name) for name in names}

        def wrap(name: str) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return saved[name](*args, **kwargs)
            return wrapper

        metrics = {"digit_acc": MulticlassAccuracy(10, validate_args=False),
                   "parity_acc": MulticlassAccuracy(2, validate_args=False)}
        batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 10 * num_batches, 10)]
        for name in names:
            setattr(torch.Tensor, name, wrap(name))
        try:
            validate(model, batches, criterion=lambda o, t: F.cross_entropy(o["digit"], t), metrics=metrics,
                     metric_inputs=lambda o, t: {"digit_acc": (o["digit"], t), "parity_acc": (o["parity"], t % 2)},
                     progress=False)
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)
        return calls

    assert reads(3) == reads(30)
