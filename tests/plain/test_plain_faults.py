"""Fault injection for plain PyTorch: an exception at each batch position and inside the metric update.

After each one, ``evaluating()`` and ``validate()`` must give everything back (each submodule's own mode, the
``requires_grad`` flags, grad mode, the metrics' states), let the user's exception through unchanged, and a rerun
on the same objects must give exact values against a plain float64 loop over the whole data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import evaluating, validate

N, BATCH = 23, 5  # five batches, the last one short
POSITIONS = [0, 2, 4]  # first, middle, last batch


class Boom(RuntimeError):
    pass


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    model[1].eval()  # a frozen BatchNorm: it must stay in eval mode afterwards
    model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(N, 6, generator=g), torch.randint(0, 4, (N,), generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, fail_at: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    for i, start in enumerate(range(0, N, BATCH)):
        if i == fail_at:
            raise Boom(f"batch {i}")
        yield x[start:start + BATCH], y[start:start + BATCH]


def state(model: nn.Module) -> tuple[list[bool], list[bool], bool]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()], \
        torch.is_grad_enabled()


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with evaluating(model), torch.no_grad():
        out = model(x).double()
    loss = nn.functional.cross_entropy(out, y).item()
    return loss, float(accuracy_score(y.numpy(), out.argmax(1).numpy()))


class FailingAccuracy(MulticlassAccuracy):
    """Raises inside its update on one batch (a metric that cannot take that batch)."""

    fail_at: int | None = None
    calls = 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.calls == self.fail_at:
            self.calls += 1
            raise Boom("inside the metric update")
        self.calls += 1
        super().update(preds, target)


@pytest.mark.parametrize("at", POSITIONS, ids=["first", "middle", "last"])
def test_evaluating_gives_everything_back_at_each_batch_position(at: int) -> None:
    model, x, y = model_and_data()
    before = state(model)
    with pytest.raises(Boom, match=f"^batch {at}$"), evaluating(model, check="raise"):
        for inputs, _ in batches(x, y, fail_at=at):
            model(inputs)
    assert state(model) == before
    with evaluating(model, check="raise"):  # the rerun: clean and exact
        out = torch.cat([model(inputs) for inputs, _ in batches(x, y)])
    assert state(model) == before
    assert torch.allclose(out.double().softmax(1).sum(), torch.tensor(float(N), dtype=torch.float64))
    with evaluating(model):  # batched and whole-set matrix products may round differently (BLAS blocking)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["first", "middle", "last", "metric update"])
def test_validate_gives_everything_back_then_reruns_exactly(where: str) -> None:
    model, x, y = model_and_data()
    acc = FailingAccuracy(num_classes=4, average="micro")
    acc.update(torch.tensor([0, 1]), torch.tensor([0, 0]))  # a state from before: given back as it was
    acc_state, count = acc.tp.clone(), acc.update_count
    before = state(model)
    if where == "metric update":
        # The message names the metric and what it got, then the original text (the cause is chained).
        acc.fail_at, fail_at = acc.calls + 2, None
        match = r"^Metric `acc` \(FailingAccuracy\) failed on .*: inside the metric update$"
    else:
        fail_at = POSITIONS[["first", "middle", "last"].index(where)]
        match = f"^batch {fail_at}$"
    with pytest.raises(Boom, match=match):
        validate(model, batches(x, y, fail_at), criterion=nn.CrossEntropyLoss(), metrics={"acc": acc},
                 progress=False)
    assert state(model) == before
    assert acc.update_count == count and torch.equal(acc.tp, acc_state)
    acc.fail_at = None
    results = validate(model, list(batches(x, y)), criterion=nn.CrossEntropyLoss(), metrics={"acc": acc},
                       progress=False)
    assert state(model) == before
    loss, accuracy = reference(model, x, y)
    assert results["loss"] == pytest.approx(loss, abs=1e-6)
    assert results["acc"] == pytest.approx(accuracy, abs=1e-7)  # torchmetrics computes in float32


def test_validate_under_no_grad_keeps_the_callers_grad_mode() -> None:
    model, x, y = model_and_data()
    with torch.no_grad(), pytest.raises(Boom, match=r"^batch 2$"):
        validate(model, batches(x, y, 2), criterion=nn.CrossEntropyLoss(), progress=False)
    assert torch.is_grad_enabled()
    results: dict[str, Any] = validate(model, batches(x, y), criterion=nn.CrossEntropyLoss(), progress=False)
    assert results["loss"] == pytest.approx(reference(model, x, y)[0], abs=1e-6)
