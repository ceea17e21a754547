"""ValidationMixin with `confidence`: intervals logged beside the values, exact against references, changing nothing
else, without a sync per batch, the same at any batch size."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from host_sync import no_host_sync
from scipy import stats
from sklearn.datasets import load_digits
from statsmodels.stats.proportion import proportion_confint
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from lightning_validate import Intervals, ModeCheck, ValidationMixin

FORBIDDEN = [(Tensor, "item"), (Tensor, "tolist"), (Tensor, "cpu"), (Tensor, "numpy"), (Tensor, "__bool__"),
             (Tensor, "__float__"), (Tensor, "__int__"), (Tensor, "nonzero"), (torch, "nonzero"),
             (torch, "unique"), (Tensor, "masked_select")]


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:400] / 16.0, dtype=torch.float32), torch.tensor(y[:400])


class Lit(ValidationMixin, pl.LightningModule):
    num_classes = 10
    confidence = Intervals(replicates=200, record=True)

    def __init__(self, criterion: nn.Module | None = None, auroc: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.auroc = auroc

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_metrics(self):  # type: ignore[no-untyped-def]
        metrics = {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}
        if self.auroc:
            metrics["auroc"] = MulticlassAUROC(10)
        return metrics

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.2)


def trainer(**kwargs: object) -> pl.Trainer:
    defaults: dict[str, object] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                       enable_checkpointing=False, enable_model_summary=False,
                                       enable_progress_bar=False)
    return pl.Trainer(**{**defaults, **kwargs})  # type: ignore[arg-type]


def loader(x: Tensor, y: Tensor, batch_size: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_intervals_are_logged_beside_the_values_exact_and_kept_in_the_history(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    model = Lit()
    fit = trainer(limit_train_batches=2)
    fit.fit(model, loader(x, y), [loader(x[:200], y[:200]), loader(x[200:], y[200:])])
    record = model.metrics_history[-1]
    for name in ("loss", "acc", "f1"):
        for i in (0, 1):
            value = record[f"val/{name}/dataloader_idx_{i}"]
            low, high = record[f"val/{name}_low/dataloader_idx_{i}"], record[f"val/{name}_high/dataloader_idx_{i}"]
            assert low < value < high
            assert f"val/{name}_low/dataloader_idx_{i}" in fit.callback_metrics
            assert f"val/{name}_low/dataloader_idx_{i}" not in fit.progress_bar_metrics  # bounds stay off the bar
    assert not any(key.startswith("train/") and key.endswith(("_low", "_high")) for key in record)
    # The references, on the second dataloader's 200 samples: Wilson of sklearn's counts, t of per-sample losses.
    model.eval()
    with torch.no_grad():
        logits = model(x[200:]).double()
    correct = int((logits.argmax(1) == y[200:]).sum())
    wilson = proportion_confint(correct, 200, alpha=0.05, method="wilson")
    assert (record["val/acc_low/dataloader_idx_1"], record["val/acc_high/dataloader_idx_1"]) == pytest.approx(wilson,
                                                                                                               abs=1e-9)
    losses = F.cross_entropy(logits, y[200:], reduction="none").numpy()
    t = stats.t.interval(0.95, 199, loc=record["val/loss/dataloader_idx_1"], scale=stats.sem(losses))
    assert (record["val/loss_low/dataloader_idx_1"], record["val/loss_high/dataloader_idx_1"]) == pytest.approx(
        t, rel=1e-6)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("criterion", [
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2, 10), ignore_index=3),
], ids=["ce", "ce_w_ignore"])
def test_turning_intervals_on_changes_no_value(digits, precision, criterion) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    results = []
    for confidence in (None, 0.95):
        model = Lit(criterion)
        model.confidence = confidence
        callbacks = [ModeCheck(on_violation="raise")] if precision == "bf16-mixed" else []
        run = trainer(precision=precision, callbacks=callbacks)
        results.append(run.validate(model, loader(x, y), verbose=False)[0])
    off, on = results
    assert set(on) == set(off) | {f"val/{n}_{b}" for n in ("loss", "acc", "f1") for b in ("low", "high")}
    assert {k: on[k] for k in off} == off


def test_the_step_path_makes_no_sync_with_intervals(digits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    steps: list[int] = []

    class Guarded(Lit):
        def configure_metrics(self):  # type: ignore[no-untyped-def]
            # validate_args=False: torchmetrics' own input checks read values back (torch.unique), not ours to test
            return {"acc": MulticlassAccuracy(10, average="micro", validate_args=False),
                    "f1": MulticlassF1Score(10, average="macro", validate_args=False)}  # the bootstrap's path

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().validation_step(batch, batch_idx)
            steps.append(batch_idx)
            return out

    model = Guarded()
    model.confidence = Intervals(replicates=50, record=True)
    values = trainer().validate(model, loader(x, y), verbose=False)[0]
    assert len(steps) == 7 and {"val/acc_low", "val/loss_high", "val/f1_low"} <= set(values)


def test_the_intervals_and_replicates_are_the_same_at_any_batch_size(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    x, y = x[:150], y[:150]
    runs = []
    for batch_size in (1, 7, 64):
        model = Lit()
        values = trainer().validate(model, loader(x, y, batch_size), verbose=False)[0]
        runs.append((values, model.sample_record("val")))
    (first, record), rest = runs[0], runs[1:]
    for values, other in rest:
        torch.testing.assert_close(other.replicates["f1"], record.replicates["f1"], rtol=1e-9, atol=0.0)
        for name in ("acc", "f1"):  # exact counts: the same bounds
            assert values[f"val/{name}_low"] == first[f"val/{name}_low"]
        assert values["val/loss_high"] == pytest.approx(first["val/loss_high"], rel=1e-6)  # float32 forward per batch


def test_values_without_an_interval_are_named_once_per_run(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    model = Lit(auroc=True)
    text = (r"No interval for `val/auroc`: MulticlassAUROC keeps every sample's values \(list states `preds`, "
            r"`target`\), which a fixed-size replicated state cannot weight; its value is logged without one\.")
    with pytest.warns(UserWarning, match=text) as caught:
        values = trainer(max_epochs=2, limit_train_batches=1).fit(model, loader(x, y), loader(x[:100], y[:100]))
    assert values is None and sum("val/auroc" in str(w.message) for w in caught) == 1
    assert "val/auroc" in model.metrics_history[-1] and "val/auroc_low" not in model.metrics_history[-1]


def test_a_record_is_kept_only_when_asked_for_and_a_bad_setting_is_refused(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    model = Lit()
    model.confidence = 0.9
    trainer().validate(model, loader(x, y), verbose=False)
    with pytest.raises(RuntimeError, match=r"No per-sample record of stage 'val', dataloader 0: records are kept with "
                                           r"`confidence = Intervals\(record=True\)`.*Records kept: none\."):
        model.sample_record("val")
    model.confidence = 95
    with pytest.raises(ValueError, match=r"Expected attribute `confidence` to be None \(no intervals\), a confidence "
                                         r"level in \(0, 1\) such as 0.95, .* but got 95\."):
        trainer().validate(model, loader(x, y), verbose=False)
    assert math.isfinite(Lit().confidence.confidence)  # type: ignore[union-attr]
