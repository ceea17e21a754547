"""Tests for ``validate()``: values against sklearn and full-data loops, the usual hand-written loop's five flaws,
errors, no syncs."""

from __future__ import annotations

import io
import math
import sys
from collections import namedtuple
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.wrappers import ClasswiseWrapper
from tqdm import tqdm

from lightning_validate import validate
from lightning_validate.metrics.batches import to_device
from lightning_validate.plain import loop

# --------------------------------------------------------------------------------------------------------------
# The usual hand-written loop, as a well-known blog post publishes it, with its `model_fn` returning batch means.


def model_fn(batch: Any, model: nn.Module, criterion: nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (t.to(device) for t in batch)
    out = model(x)
    return criterion(out, y), (out.argmax(dim=-1) == y).float().mean()


def usual_valid(dataloader: DataLoader, model: nn.Module, criterion: nn.Module, device: str) -> float:
    """Validate on validation set."""
    model.eval()
    running_loss = 0.0
    running_accuracy = 0.0
    pbar = tqdm(total=len(dataloader.dataset), ncols=0, desc="Valid", unit=" uttr")

    for i, batch in enumerate(dataloader):
        with torch.no_grad():
            loss, accuracy = model_fn(batch, model, criterion, device)
            running_loss += loss.item()
            running_accuracy += accuracy.item()

        pbar.update(dataloader.batch_size)
        pbar.set_postfix(
            loss=f"{running_loss / (i+1):.2f}",
            accuracy=f"{running_accuracy / (i+1):.2f}",
        )

    pbar.close()
    model.train()

    return running_accuracy / len(dataloader)


def run_usual(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    return {"accuracy": usual_valid(loader, model, nn.CrossEntropyLoss(), "cpu")}


def run_validate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    return validate(model, loader, criterion=nn.CrossEntropyLoss(),
                    metrics={"accuracy": MulticlassAccuracy(num_classes=10, average="micro")})


USUAL_FAILS = pytest.mark.xfail(strict=True, reason="the usual hand-written loop has this flaw")
BOTH = [pytest.param(run_usual, id="usual-loop", marks=USUAL_FAILS), pytest.param(run_validate, id="validate")]


# --------------------------------------------------------------------------------------------------------------
# Helpers


def mlp(features: int = 64, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, classes))


def data(n: int, features: int = 64, classes: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, **kw: Any) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kw)


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A plain loop over the whole data at once, in eval mode: summed loss / N and the predictions."""
    was = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = nn.CrossEntropyLoss(reduction="sum")(out.double(), y).item() / len(y)
    for m, flag in zip(model.modules(), was, strict=True):
        m.training = flag
    return loss, out.argmax(1)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


class RecordingTqdm(tqdm):  # type: ignore[misc]
    """A tqdm that writes to a buffer and remembers every bar it made."""

    bars: ClassVar[list[RecordingTqdm]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("file", io.StringIO())
        super().__init__(*args, **kwargs)
        RecordingTqdm.bars.append(self)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[RecordingTqdm]:
    RecordingTqdm.bars.clear()
    monkeypatch.setattr(loop, "tqdm", RecordingTqdm)
    monkeypatch.setattr(sys.modules[__name__], "tqdm", RecordingTqdm)
    return RecordingTqdm.bars


# --------------------------------------------------------------------------------------------------------------
# Values against independent references


def test_digits_against_sklearn_and_full_data_loop(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits  # 1797 samples: batches of 64 leave a last batch of 5
    model = mlp()
    result = validate(
        model, loader(x, y, 64), criterion=nn.CrossEntropyLoss(),
        metrics={"accuracy": MulticlassAccuracy(num_classes=10, average="micro"),
                 "f1": MulticlassF1Score(num_classes=10, average="macro")},
        progress=False,
    )
    ref_loss, pred = reference(model, x, y)
    assert set(result) == {"loss", "accuracy", "f1"}
    assert all(type(v) is float for v in result.values())
    assert result["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert result["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert result["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)


@pytest.mark.parametrize(("n", "batch_size"), [(101, 10), (7, 3), (64, 64), (5, 8)])
def test_generated_data_dict_and_collection_agree_with_references(n: int, batch_size: int) -> None:
    x, y = data(n, features=8, classes=4)
    model = mlp(features=8, classes=4)
    ref_loss, pred = reference(model, x, y)
    by_dict = validate(model, loader(x, y, batch_size), criterion=nn.CrossEntropyLoss(),
                       metrics={"acc": MulticlassAccuracy(num_classes=4, average="micro"),
                                "f1": MulticlassF1Score(num_classes=4, average="macro")}, progress=False)
    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=4, average="micro"),
                                   "f1": MulticlassF1Score(num_classes=4, average="macro")}, prefix="val_")
    by_collection = validate(model, loader(x, y, batch_size), criterion=nn.CrossEntropyLoss(), metrics=collection,
                             progress=False)
    assert by_dict["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert by_dict["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert by_dict["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert by_collection == pytest.approx({"loss": by_dict["loss"], "val_acc": by_dict["acc"], "val_f1": by_dict["f1"]})


def test_metrics_only_and_criterion_only() -> None:
    x, y = data(30, features=8, classes=4)
    model = mlp(features=8, classes=4)
    ref_loss, pred = reference(model, x, y)
    only_metric = validate(model, loader(x, y, 7), metrics={"acc": MulticlassAccuracy(num_classes=4, average="micro")},
                           progress=False)
    only_loss = validate(model, loader(x, y, 7), criterion=nn.CrossEntropyLoss(), progress=False)
    assert only_metric == pytest.approx({"acc": accuracy_score(y, pred)})
    assert only_loss == pytest.approx({"loss": ref_loss}, rel=1e-6)


def test_metrics_are_reset_at_start_and_left_computed() -> None:
    x, y = data(50, features=8, classes=4)
    model = mlp(features=8, classes=4)
    acc = MulticlassAccuracy(num_classes=4, average="micro")
    acc.update(torch.zeros(100, dtype=torch.long), torch.zeros(100, dtype=torch.long))  # stale "training" state
    result = validate(model, loader(x, y, 16), metrics={"acc": acc}, progress=False)
    _, pred = reference(model, x, y)
    assert result["acc"] == pytest.approx(accuracy_score(y, pred))
    assert acc.compute().item() == pytest.approx(result["acc"])  # the states are this run's, left for inspection
    acc.update(pred, y)  # usable afterwards, outside inference mode
    assert acc.compute().item() == pytest.approx(accuracy_score(y, pred))


def test_classwise_wrapper_adds_one_entry_per_class() -> None:
    x, y = data(40, features=8, classes=3)
    model = mlp(features=8, classes=3)
    _, pred = reference(model, x, y)
    result = validate(model, loader(x, y, 16), progress=False, metrics={
        "per_class": ClasswiseWrapper(MulticlassAccuracy(num_classes=3, average=None), labels=["a", "b", "c"])})
    per_class = [(pred[y == c] == c).float().mean().item() for c in range(3)]
    assert list(result) == ["multiclassaccuracy_a", "multiclassaccuracy_b", "multiclassaccuracy_c"]
    assert list(result.values()) == pytest.approx(per_class)


def test_step_for_dict_batches_and_input_gradients() -> None:
    x, y = data(20, features=8, classes=4)
    model = mlp(features=8, classes=4)
    batches = [{"image": x[i:i + 6], "label": y[i:i + 6]} for i in range(0, 20, 6)]
    grad_norms: list[torch.Tensor] = []

    def step(batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():  # input gradients (saliency): allowed because a step runs under no_grad
            inputs = batch["image"].clone().requires_grad_()
            out = model(inputs)
            (grad,) = torch.autograd.grad(out.sum(), inputs)
        grad_norms.append(grad.norm())
        return out.detach(), batch["label"]

    result = validate(model, batches, criterion=nn.CrossEntropyLoss(), step=step, progress=False)
    assert result["loss"] == pytest.approx(reference(model, x, y)[0], rel=1e-6)
    assert len(grad_norms) == 4 and all(g > 0 for g in grad_norms)
    assert all(p.grad is None for p in model.parameters())


def test_samples_counted_right_for_per_task_and_per_sample_targets() -> None:
    x, y = data(21, features=8, classes=4)
    model = mlp(features=8, classes=4)
    expected = reference(model, x, y)[0]

    def first_task(out: torch.Tensor, target: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target[0])

    # per-task targets as default_collate gives them: a list of batch tensors; 8 + 8 + 5 samples, not 2 per batch
    per_task = [(x[i:i + 8], [y[i:i + 8], y[i:i + 8].float()]) for i in range(0, 21, 8)]
    result = validate(model, per_task, criterion=first_task, progress=False)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)

    # per-sample targets as detection collates give them: one dict per sample
    def per_sample_loss(out: torch.Tensor, target: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(out, torch.stack([t["label"] for t in target]))

    per_sample = [(x[i:i + 8], [{"label": y[j]} for j in range(i, min(i + 8, 21))]) for i in range(0, 21, 8)]
    result = validate(model, per_sample, criterion=per_sample_loss, progress=False)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_batches_moved_to_device_keep_their_structure() -> None:
    pair = namedtuple("pair", "a b")
    batch = {"x": [torch.ones(2), (torch.zeros(1), pair(torch.ones(1), 3))], "s": "keep"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["s"] == "keep" and isinstance(moved["x"][1][1], pair) and moved["x"][1][1].b == 3
    assert moved["x"][0] is batch["x"][0]  # already there: not copied


def test_device_string_and_model_without_parameters() -> None:
    x, y = data(10, features=4, classes=4)
    result = validate(nn.Identity(), loader(x, y, 4), device="cpu", criterion=nn.CrossEntropyLoss(), progress=False)
    expected = nn.CrossEntropyLoss()(x, y).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_torch_compiled_model() -> None:
    x, y = data(45, features=8, classes=4)
    model = mlp(features=8, classes=4)
    model[1].eval()
    compiled = torch.compile(model, backend="eager")
    result = validate(compiled, loader(x, y, 20), criterion=nn.CrossEntropyLoss(), progress=False)
    assert result["loss"] == pytest.approx(reference(model, x, y)[0], rel=1e-5)
    assert model.training and compiled.training and not model[1].training


# --------------------------------------------------------------------------------------------------------------
# The usual loop's flaws: each assertion fails on it (xfail, strict) and passes on validate()


@pytest.mark.parametrize("run", BOTH)
def test_flaw_batch_mean_averaging(run: Any) -> None:
    x, y = data(65, features=64)  # batches of 64 and 1: the usual loop gives the last sample the weight of 64
    model = mlp()
    _, pred = reference(model, x, y)
    result = run(model, loader(x, y, 64))
    assert result["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)


@pytest.mark.parametrize("run", BOTH)
def test_flaw_bar_overshoots(run: Any, bars: list[RecordingTqdm]) -> None:
    x, y = data(100)
    run(mlp(), loader(x, y, 64))
    (bar,) = bars
    assert bar.total == 100
    assert bar.n == 100


@pytest.mark.parametrize("run", BOTH)
def test_flaw_host_syncs_per_batch(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_REFRESH_INTERVAL", 1e9)  # only the first batch's refresh, then the end
    model = mlp()

    def syncs(num_batches: int) -> int:
        x, y = data(10 * num_batches)
        with CountSyncs() as calls:
            run(model, loader(x, y, 10))
        return len(calls)

    # Reads scale with the number of batches only if something reads a value every batch.
    assert syncs(12) == syncs(3)


@pytest.mark.parametrize("run", BOTH)
def test_flaw_train_unfreezes_frozen_submodules(run: Any) -> None:
    x, y = data(20)
    model = mlp()
    model[1].eval()  # a frozen BatchNorm
    model[3].eval()  # and a frozen Dropout
    run(model, loader(x, y, 8))
    assert model.training
    assert not model[1].training and not model[3].training


class Boom(RuntimeError):
    pass


def raising_loader(x: torch.Tensor, y: torch.Tensor, at: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i, batch in enumerate(loader(x, y, 5)):
        if i == at:
            raise Boom("bad batch")
        yield batch


class LoaderWithDataset:
    """What the usual loop reads from a DataLoader (dataset, batch_size, len), around a raising iterator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.dataset, self.batch_size, self._x, self._y = TensorDataset(x, y), 5, x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return raising_loader(self._x, self._y, at=2)

    def __len__(self) -> int:
        return 4


@pytest.mark.parametrize("run", BOTH)
def test_flaw_left_in_eval_when_a_batch_raises(run: Any) -> None:
    x, y = data(20)
    model = mlp()
    model[1].eval()
    with pytest.raises(Boom, match="bad batch"):
        run(model, LoaderWithDataset(x, y))
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


# --------------------------------------------------------------------------------------------------------------
# No host-device synchronization per batch


class CountSyncs:
    """Record every Python-level read of a tensor's value (what synchronizes with a GPU)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __enter__(self) -> list[str]:
        self.calls: list[str] = []
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self.calls

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("criterion", [
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=3),  # a weight on the device per batch
    nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=3, label_smoothing=0.1),
], ids=["ce", "ce_weight_ignore", "ce_weight_ignore_smoothing"])
@pytest.mark.parametrize("progress", [True, False])
def test_no_sync_per_batch_only_at_refreshes_and_the_end(progress: bool, criterion: nn.Module,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          bars: list[RecordingTqdm]) -> None:
    model = mlp()
    # validate_args=False: torchmetrics' argument checks may read values; those reads are the metric's, not the loop's.
    acc = MulticlassAccuracy(num_classes=10, average="micro", validate_args=False)

    def run(num_batches: int, refresh: float) -> list[str]:
        monkeypatch.setattr(loop, "_REFRESH_INTERVAL", refresh)
        x, y = data(10 * num_batches)
        batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(y), 10)]
        with CountSyncs() as calls:
            validate(model, batches, criterion=criterion, metrics={"acc": acc}, progress=progress)
        return calls

    rare, rare_many = run(5, 1e9), run(40, 1e9)
    assert rare == rare_many  # nothing per batch
    if progress:
        every = run(5, 0.0)  # a refresh per batch: one read for the running values each time
        assert len(every) == len(rare) + 4
        assert "loss=" in bars[-1].postfix and "acc=" in bars[-1].postfix


# --------------------------------------------------------------------------------------------------------------
# The bar


def test_bar_counts_samples_to_the_exact_total(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = data(70)
    validate(mlp(), loader(x, y, 32), criterion=nn.CrossEntropyLoss(), desc="Valid")
    err = capsys.readouterr().err
    assert "Valid" in err and "70/70" in err and " samples" in err and "loss=" in err


def test_bar_total_follows_sampler_and_drop_last(bars: list[RecordingTqdm]) -> None:
    x, y = data(70)
    subset = torch.utils.data.SubsetRandomSampler(range(50))
    validate(mlp(), loader(x, y, 32, sampler=subset), criterion=nn.CrossEntropyLoss())
    validate(mlp(), loader(x, y, 32, drop_last=True), criterion=nn.CrossEntropyLoss())
    validate(mlp(), list(loader(x, y, 32)), criterion=nn.CrossEntropyLoss())  # a plain list: total unknown
    assert [(b.total, b.n) for b in bars] == [(50, 50), (64, 64), (None, 70)]


def test_progress_false_shows_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = data(20)
    validate(mlp(), loader(x, y, 8), criterion=nn.CrossEntropyLoss(), progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------------------------
# Errors: pinned messages, and nothing lost


def test_error_neither_criterion_nor_metrics() -> None:
    with pytest.raises(ValueError, match=r"nothing to compute: expected `criterion` or `metrics` but got neither"):
        validate(mlp(), [])


@pytest.mark.parametrize("empty", [
    pytest.param([], id="list"),
    pytest.param(DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0))), id="empty-dataset"),
    pytest.param(DataLoader(TensorDataset(*data(5)), batch_size=8, drop_last=True), id="drop-last"),
    pytest.param(iter([]), id="iterator"),
])
def test_error_empty_dataloader(empty: Any) -> None:
    with pytest.raises(ValueError, match=r"got no batches: expected a dataloader that yields at least one batch"):
        validate(mlp(), empty, criterion=nn.CrossEntropyLoss(), progress=False)


@pytest.mark.parametrize(("batch", "match"), [
    ({"image": torch.zeros(2, 64), "label": torch.zeros(2)},
     r"got a dict with keys \['image', 'label'\]\. .*step=lambda batch, model: \(model\(batch\['image'\]\), "
     r"batch\['label'\]\)"),
    ((torch.zeros(2, 64), torch.zeros(2), [1, 2]),
     r"got a tuple of 3: \(Tensor\(shape=\(2, 64\), dtype=float32\), Tensor\(shape=\(2,\), dtype=float32\), a "
     r"list of 2\)\. .*step=lambda batch, model: \(model\(batch\[0\]\), batch\[1\]\)"),
    (torch.zeros(2, 64), r"got Tensor\(shape=\(2, 64\), dtype=float32\).*step="),
])
def test_error_batch_that_cannot_be_unpacked(batch: Any, match: str) -> None:
    with pytest.raises(TypeError, match=r"expected each batch to be `\(inputs, target\)` .*" + match):
        validate(mlp(), [batch], criterion=nn.CrossEntropyLoss(), progress=False)


def test_error_step_result() -> None:
    with pytest.raises(TypeError, match=r"Expected `step\(batch, model\)` to return `\(outputs, target\)` but it "
                                        r"returned a tuple of 3: "):
        validate(mlp(), [data(4)], criterion=nn.CrossEntropyLoss(), progress=False,
                 step=lambda batch, model: (model(batch[0]), batch[1], 0.0))


@pytest.mark.parametrize(("metrics", "match"), [
    (MulticlassAccuracy(num_classes=10), r"^Expected argument `metrics` to be a dict of torchmetrics `Metric` objects "
                                         r"or a `MetricCollection` but got a single MulticlassAccuracy\. Name it: "
                                         r"`metrics=\{'multiclassaccuracy': metric\}`\.$"),
    ([MulticlassAccuracy(num_classes=10)], r"^Expected argument `metrics` to be a dict of torchmetrics `Metric` "
                                           r"objects or a `MetricCollection` but got a list of 1: "
                                           r"\(a MulticlassAccuracy\)\. Pass e\.g\. `metrics=\{'accuracy': "),
    ({"acc": lambda p, t: (p.argmax(1) == t).float().mean()},
     r"^Expected the value for 'acc' in argument `metrics` to be a torchmetrics `Metric` but got a function \(a "
     r"function .* use the class, not the functional form\)\. Pass e\.g\. `metrics="),
    ({1: MulticlassAccuracy(num_classes=10)}, r"^Expected the names in argument `metrics` to be strings but got 1\. "
                                              r"Pass e\.g\. `metrics="),
])
def test_error_metrics_not_torchmetrics(metrics: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        validate(mlp(), [data(4)], metrics=metrics, progress=False)


def test_error_metric_named_loss() -> None:
    with pytest.raises(ValueError, match=r"other than 'loss' when a `criterion` is given"):
        validate(mlp(), [data(4)], criterion=nn.CrossEntropyLoss(), metrics={"loss": MeanSquaredError()})


def test_error_criterion_returns_neither_a_loss_nor_terms() -> None:
    with pytest.raises(ValueError, match=r"per-sample loss of first dimension 4 \(the batch size\) but got shape "
                                         r"\(2,\)\. Return the batch mean .* or `LossTerms\(sum, weight\)`"):
        validate(mlp(), [data(4)], criterion=lambda o, t: o[:2, 0], progress=False)
    with pytest.raises(TypeError, match=r"Expected `criterion\(outputs, target\)` to return a float tensor "
                                        r"\(the batch mean or one loss per sample\), `LossTerms\(sum, weight\)` or "
                                        r"`LossMean\(mean, weight\)` but got float 0.5"):
        validate(mlp(), [data(4)], criterion=lambda o, t: 0.5, progress=False)  # type: ignore[arg-type,return-value]


def test_error_metric_not_scalar_restores_states(bars: list[RecordingTqdm]) -> None:
    per_class = MulticlassAccuracy(num_classes=10, average=None)
    with pytest.raises(TypeError, match=r"Expected metric 'acc' to compute a scalar but it computed a tensor of shape "
                                        r"\(10,\)\..*ClasswiseWrapper\("):
        validate(mlp(), [data(4)], metrics={"acc": per_class})
    assert per_class.update_count == 0
    assert bars[0].disable  # closed


def test_error_in_a_batch_loses_nothing() -> None:
    x, y = data(20)
    model = mlp()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    acc = MulticlassAccuracy(num_classes=10, average="micro")
    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=10, average="micro"),
                                   "f1": MulticlassF1Score(num_classes=10, average="macro")})
    before_pred, before_target = torch.randint(0, 10, (30,)), torch.randint(0, 10, (30,))
    acc.update(before_pred, before_target)
    collection.update(before_pred, before_target)
    acc_before, coll_before = acc.compute().item(), {k: v.item() for k, v in collection.compute().items()}
    modes = [m.training for m in model.modules()]
    for metrics in ({"acc": acc}, collection):
        with torch.no_grad():
            with pytest.raises(Boom):
                validate(model, raising_loader(x, y, at=2), criterion=nn.CrossEntropyLoss(), metrics=metrics,
                         progress=False)
            assert not torch.is_grad_enabled()  # the caller's no_grad is still on
    assert torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == modes
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert acc.update_count == 1 and acc.compute().item() == acc_before
    assert {k: v.item() for k, v in collection.compute().items()} == coll_before


def test_error_model_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"Expected argument `model` to be a torch.nn.Module but got function"):
        validate(lambda x: x, [data(4)], criterion=nn.CrossEntropyLoss())  # type: ignore[arg-type]


def test_loss_is_nan_when_the_model_gives_nan() -> None:
    x, y = data(10)
    x[3] = math.nan
    result = validate(mlp(), loader(x, y, 4), criterion=nn.CrossEntropyLoss(), progress=False)
    assert math.isnan(result["loss"])


def test_error_two_results_with_one_name() -> None:
    def wrapped() -> ClasswiseWrapper:
        return ClasswiseWrapper(MulticlassAccuracy(num_classes=2, average=None), labels=["a", "b"])

    with pytest.raises(ValueError, match=r"Expected unique result names but two results are named "
                                         r"'multiclassaccuracy_a'\. Rename a metric\."):
        validate(mlp(classes=2), [data(4, classes=2)], metrics={"x": wrapped(), "y": wrapped()}, progress=False)
