import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from host_sync import no_host_sync
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lightning_validate import ValidationMixin

BATCH = 64  # 1797 % 64 == 5: the last batch is short


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def loader(x, y, batch_size=BATCH):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Lit(ValidationMixin, pl.LightningModule):
    num_classes = 10

    def __init__(self, metrics=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()
        self._metrics = metrics

    def forward(self, x):
        return self.net(x)

    def configure_metrics(self):
        return self._metrics() if self._metrics is not None else super().configure_metrics()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def acc_f1():
    return {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def reference(model, x, y):
    """Full-data sklearn values of the model in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    prob = logits.softmax(1).numpy()
    pred = logits.argmax(1).numpy()
    return {
        "loss": log_loss(y.numpy(), prob / prob.sum(1, keepdims=True), labels=list(range(10))),
        "acc": accuracy_score(y.numpy(), pred),
        "f1": f1_score(y.numpy(), pred, average="macro"),
    }


def test_validate_and_test_equal_sklearn_on_full_data(digits):
    x, y = digits
    model = Lit(acc_f1)
    t = trainer()
    (val,) = t.validate(model, loader(x, y), verbose=False)
    (test,) = t.test(model, loader(x, y, batch_size=100), verbose=False)  # 1797 % 100 == 97
    ref = reference(model, x, y)
    assert sorted(val) == ["val/acc", "val/f1", "val/loss"]
    for name in ("loss", "acc", "f1"):
        assert val[f"val/{name}"] == pytest.approx(ref[name], abs=1e-6)
        assert test[f"test/{name}"] == pytest.approx(ref[name], abs=1e-6)


def test_default_accuracy_from_num_classes_or_hparams(digits):
    x, y = digits

    class FromHparams(Lit):
        num_classes = None

        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"num_classes": 10})

    model = FromHparams()
    (val,) = trainer().validate(model, loader(x, y), verbose=False)
    assert val["val/acc"] == pytest.approx(reference(model, x, y)["acc"], abs=1e-6)
    metric = model.lv_metrics["val_0"]["acc"]
    assert isinstance(metric, MulticlassAccuracy) and metric.average == "micro"

    class NoClasses(Lit):
        num_classes = None

    (val,) = trainer().validate(NoClasses(), loader(x, y), verbose=False)
    assert sorted(val) == ["val/loss"]


def test_several_dataloaders_get_lightning_suffixes_or_names(digits):
    x, y = digits
    parts = [(x[:1000], y[:1000]), (x[1000:], y[1000:])]

    model = Lit()
    results = trainer().validate(model, [loader(*p) for p in parts], verbose=False)
    for i, (px, py) in enumerate(parts):
        ref = reference(model, px, py)
        assert results[i][f"val/loss/dataloader_idx_{i}"] == pytest.approx(ref["loss"], abs=1e-6)
        assert results[i][f"val/acc/dataloader_idx_{i}"] == pytest.approx(ref["acc"], abs=1e-6)

    class Named(Lit):
        test_dataloader_names = ("clean", "noisy")

    results = trainer().test(Named(), [loader(*p) for p in parts], verbose=False)
    assert results[0]["test/acc/noisy"] == pytest.approx(reference(model, *parts[1])["acc"], abs=1e-6)

    class Miscounted(Lit):
        val_dataloader_names = ("only",)

    with pytest.raises(ValueError, match=r"`val_dataloader_names` to name each of the 2 val dataloaders but got 1"):
        trainer().validate(Miscounted(), [loader(*p) for p in parts], verbose=False)


class StepLosses(pl.Callback):
    """Per-step training losses and batch sizes, the reference for the epoch mean."""

    def __init__(self):
        self.losses, self.sizes = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.sizes.append(len(batch[1]))


class Seen(Metric):
    """Number of samples counted, updated in place (fails on an inference tensor outside inference_mode)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs, target):
        self.n += target.shape[0]

    def compute(self):
        return self.n


def test_validate_then_fit_history_and_monitoring(digits, tmp_path):
    """validate() first (states made under inference_mode), then fit: in-place updates still work."""
    x, y = digits
    tx, ty, vx, vy = x[:1200], y[:1200], x[1200:], y[1200:]
    model = Lit(lambda: {"acc": MulticlassAccuracy(10, average="micro"), "seen": Seen()})
    steps = StepLosses()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min")
    stop = EarlyStopping(monitor="val/acc", mode="max", patience=5)
    t = trainer(max_epochs=2, num_sanity_val_steps=2, enable_checkpointing=True, callbacks=[steps, checkpoint, stop])
    (before,) = t.validate(model, loader(vx, vy), verbose=False)
    assert before["val/seen"] == len(vy)
    t.fit(model, loader(tx, ty), loader(vx, vy))

    history = model.metrics_history
    assert [h["epoch"] for h in history] == [0.0, 1.0]  # no record for the sanity check or validate()
    assert {"train/loss", "train/acc", "train/seen", "val/loss", "val/acc", "val/seen"} <= set(history[0])
    per_epoch = len(steps.losses) // 2
    for e in range(2):
        epoch = slice(e * per_epoch, (e + 1) * per_epoch)
        assert history[e]["train/loss"] == pytest.approx(
            np.average(steps.losses[epoch], weights=steps.sizes[epoch]), abs=1e-6
        )
        assert history[e]["val/seen"] == len(vy)  # the sanity check's 2 batches are not in epoch 0
    ref = reference(model, vx, vy)
    assert history[-1]["val/loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert history[-1]["val/acc"] == pytest.approx(ref["acc"], abs=1e-6)
    assert t.callback_metrics["val/acc"].item() == pytest.approx(ref["acc"], abs=1e-6)
    assert "train/loss_epoch" in t.callback_metrics and "train/acc" in t.callback_metrics
    assert checkpoint.best_model_score.item() == pytest.approx(min(h["val/loss"] for h in history), abs=1e-6)
    assert stop.best_score.item() == pytest.approx(max(h["val/acc"] for h in history), abs=1e-6)


def test_user_step_wins_and_can_keep_the_epoch_metrics(digits):
    x, y = digits
    seen = []

    class OwnStep(Lit):
        def validation_step(self, batch, batch_idx):
            inputs, target = batch
            seen.append(batch_idx)
            return self.update_metrics("val", self(inputs), target)

    model = OwnStep()
    (val,) = trainer().validate(model, loader(x, y), verbose=False)
    assert len(seen) == math.ceil(len(y) / BATCH)
    assert val["val/acc"] == pytest.approx(reference(model, x, y)["acc"], abs=1e-6)

    class NoSuper(Lit):
        def on_validation_epoch_start(self):
            pass

    with pytest.raises(RuntimeError, match=r"call `super\(\).on_validation_epoch_start\(\)` in it"):
        trainer().validate(NoSuper(), loader(x, y), verbose=False)

    class NoSuperAtEnd(Lit):
        def on_validation_epoch_end(self):
            pass

    model = NoSuperAtEnd()
    with pytest.warns(UserWarning, match=r"call `super\(\).on_validation_epoch_end\(\)` in it"):  # in the run itself
        assert trainer().validate(model, loader(x, y), verbose=False) == [{}]


def test_loss_reductions_agree(digits):
    """The default mean and per-sample losses give the mean over the set; a criterion that sums gives the sum."""
    x, y = digits

    class Summed(Lit):
        def __init__(self):
            super().__init__()
            self.criterion = nn.CrossEntropyLoss(reduction="sum")

    class PerSample(Lit):
        def compute_loss(self, outputs, target):
            return F.cross_entropy(outputs, target, reduction="none")

    values = [trainer().validate(cls(), loader(x, y), verbose=False)[0]["val/loss"] for cls in (Lit, Summed, PerSample)]
    mean = reference(Lit(), x, y)["loss"]
    assert values == pytest.approx([mean, mean * len(y), mean], rel=1e-6)


FORBIDDEN = {
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "cpu"),
    (torch.Tensor, "numpy"),
    (torch.Tensor, "__bool__"),
    (torch.Tensor, "__float__"),
    (torch.Tensor, "__int__"),
    (torch.Tensor, "nonzero"),
    (torch, "unique"),
    (torch, "nonzero"),
    (torch, "bincount"),
    (torch, "masked_select"),
}


def test_step_path_makes_no_sync_forcing_call(digits, monkeypatch):
    x, y = digits
    steps = []

    class Guarded(Lit):
        def training_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().training_step(batch, batch_idx)
            steps.append("train")
            return out

        def validation_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().validation_step(batch, batch_idx)
            steps.append("val")
            return out

    model = Guarded(acc_f1)
    model.configure_metrics = lambda: {"acc": MulticlassAccuracy(10, average="micro", validate_args=False)}
    trainer(max_epochs=1, limit_train_batches=3).fit(model, loader(x, y), loader(x[:300], y[:300]))
    assert steps.count("train") == 3 and steps.count("val") > 2
    with no_host_sync(monkeypatch, FORBIDDEN), pytest.raises(AssertionError, match="host-device sync: item"):
        torch.ones(1).item()


@pytest.mark.parametrize(
    "criterion",
    [
        nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=3),  # the total-weight path
        nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=3, label_smoothing=0.1),
        nn.KLDivLoss(reduction="batchmean"),  # a count from shapes
    ],
    ids=["ce_weight_ignore", "ce_weight_ignore_smoothing", "kl_div"],
)
def test_exact_loss_paths_make_no_sync_forcing_call(digits, monkeypatch, criterion):
    x, y = digits
    steps = []

    class Guarded(Lit):
        def __init__(self):
            super().__init__()
            self.criterion = criterion

        def unpack_batch(self, batch):
            x, y = batch
            return x, (y if isinstance(self.criterion, nn.CrossEntropyLoss) else F.one_hot(y, 10).float())

        def forward(self, x):
            out = self.net(x)
            return out if isinstance(self.criterion, nn.CrossEntropyLoss) else out.log_softmax(1)

        def training_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().training_step(batch, batch_idx)
            steps.append("train")
            return out

        def validation_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().validation_step(batch, batch_idx)
            steps.append("val")
            return out

    model = Guarded()
    classes = isinstance(criterion, nn.CrossEntropyLoss)
    acc = MulticlassAccuracy(10, average="micro", validate_args=False)
    model.configure_metrics = lambda: {"acc": acc} if classes else {}
    trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0).fit(model, loader(x, y),
                                                                          loader(x[:300], y[:300]))
    assert steps.count("train") == 2 and steps.count("val") == 5


class BarSpy(TQDMProgressBar):
    """Record the validation bar's postfix at the end of validation."""

    def __init__(self):
        super().__init__()
        self.postfixes = []

    def on_validation_end(self, trainer, pl_module):
        self.postfixes.append(self.val_progress_bar.postfix)
        super().on_validation_end(trainer, pl_module)


def test_tqdm_bar_shows_running_values_throttled(digits, monkeypatch):
    x, y = digits
    reads = []

    import lightning_validate.mixin.epoch as epoch_module

    original = epoch_module._show_running

    def counting(bar, loader_state):
        reads.append(1)
        original(bar, loader_state)

    monkeypatch.setattr(epoch_module, "_show_running", counting)
    class Rarely(Lit):
        progress_interval = 3600.0

    spy = BarSpy()
    model = Rarely(acc_f1)
    (val,) = trainer(enable_progress_bar=True, callbacks=[spy]).validate(model, loader(x, y), verbose=False)
    assert len(reads) == 1  # the first batch; then the interval has not passed
    # the bar ends on the exact epoch values
    assert spy.postfixes[-1] == f"loss={val['val/loss']:.3f}, acc={val['val/acc']:.3f}, f1={val['val/f1']:.3f}"

    class EveryBatch(Lit):
        progress_interval = 0.0

    reads.clear()
    trainer(enable_progress_bar=True, callbacks=[TQDMProgressBar()]).validate(EveryBatch(), loader(x, y), verbose=False)
    assert len(reads) == math.ceil(len(y) / BATCH)


def test_exact_values_with_the_rich_bar(digits):
    x, y = digits
    from lightning.pytorch.callbacks import RichProgressBar  # rich is in the test extra

    model = Lit(acc_f1)
    t = trainer(enable_progress_bar=True, callbacks=[RichProgressBar()])
    (val,) = t.validate(model, loader(x, y), verbose=False)
    assert val["val/acc"] == pytest.approx(reference(model, x, y)["acc"], abs=1e-6)


class Shifted(Lit):
    """Targets moved out of range and a loss that tolerates them (CrossEntropyLoss would raise on CPU)."""

    def unpack_batch(self, batch):
        x, y = batch
        return x, torch.where(y == 0, torch.full_like(y, 12), y)

    def compute_loss(self, outputs, target):
        return outputs.pow(2).mean()


def test_bad_values_are_counted_and_reported_once(digits):
    x, y = digits
    with pytest.warns(UserWarning, match=r"of 29 val batches had targets outside \[0, 10\) \(smallest 1, largest 12\)"):
        (val,) = trainer().validate(Shifted(), loader(x, y), verbose=False)
    model = Shifted()
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert val["val/acc"] == pytest.approx(((pred == y) & (y != 0)).double().mean().item(), abs=1e-6)

    class NaNLoss(Lit):
        def compute_loss(self, outputs, target):
            loss = super().compute_loss(outputs, target)
            return loss * torch.where(target[:1] == 4, math.nan, 1.0).sum()  # nan in batches starting with a 4

    nan_batches = sum(int(y[i] == 4) for i in range(0, len(y), BATCH))
    assert nan_batches > 0
    with pytest.warns(UserWarning, match=rf"{nan_batches} of 29 val batches gave a non-finite loss .* is nan"):
        (val,) = trainer().validate(NaNLoss(), loader(x, y), verbose=False)
    assert math.isnan(val["val/loss"])

    class Strict(NaNLoss):
        on_bad_values = "raise"

    with pytest.raises(ValueError, match=r"val batches gave a non-finite loss"):
        trainer().validate(Strict(), loader(x, y), verbose=False)


def test_configuration_errors(digits):
    x, y = digits

    class NoCriterion(ValidationMixin, pl.LightningModule):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match=r"`NoCriterion` has no loss: set `self.criterion = nn.CrossEntropyLoss\(\)`"):
        trainer().validate(NoCriterion(), loader(x, y), verbose=False)

    class NotCallable(NoCriterion):
        criterion = "cross_entropy"

    with pytest.raises(TypeError, match=r"Expected attribute `criterion` to be callable .* but got 'cross_entropy'"):
        trainer().validate(NotCallable(), loader(x, y), verbose=False)

    with pytest.raises(TypeError, match=r"the value for 'acc' in the result of `configure_metrics\(\)` to be a "
                                        r"torchmetrics `Metric` but got a function"):
        trainer().validate(Lit(lambda: {"acc": torch.sum}), loader(x, y), verbose=False)

    with pytest.raises(ValueError, match=r"`MulticlassF1Score\(average=None\)` returns one value per class"):
        trainer().validate(Lit(lambda: {"f1": MulticlassF1Score(10, average=None)}), loader(x, y), verbose=False)

    model = Lit(lambda: {"cm": MulticlassConfusionMatrix(10)})
    with pytest.raises(ValueError, match=r"`val/cm` \(MulticlassConfusionMatrix\) returned "
                                         r"Tensor\(shape=\(10, 10\), dtype=int64\); a logged"):
        trainer().validate(model, loader(x, y), verbose=False)

    class BadOption(Lit):
        on_bad_values = "ignore"

    with pytest.raises(ValueError, match=r"attribute `on_bad_values` to be 'warn' or 'raise' but got 'ignore'"):
        trainer().validate(BadOption(), loader(x, y), verbose=False)

    class BadClasses(Lit):
        num_classes = 1

    with pytest.raises(ValueError, match=r"Expected attribute `num_classes` to be an int >= 2 but got 1"):
        trainer().validate(BadClasses(), loader(x, y), verbose=False)

    with pytest.raises(TypeError, match=r"Put the mixin first: `class Wrong\(ValidationMixin, pl.LightningModule\)`"):

        class Wrong(pl.LightningModule, ValidationMixin):
            pass


def test_batch_errors_name_the_fix(digits):
    x, y = digits
    dict_loader = DataLoader([{"image": x[i], "label": y[i]} for i in range(100)], batch_size=BATCH)
    expected = r"(?s)got a dict with keys \['image', 'label'\]\. Override it.*return batch\['image'\], batch\['label'\]"
    with pytest.raises(TypeError, match=expected):
        trainer().validate(Lit(), dict_loader, verbose=False)

    class Column(Lit):
        def unpack_batch(self, batch):
            return batch[0], batch[1][:, None]

    with pytest.raises(ValueError, match=r"target Tensor\(shape=\(64, 1\), dtype=int64\): return `x, y.squeeze\(1\)`"):
        trainer().validate(Column(), loader(x, y), verbose=False)

    class Truncated(Lit):
        def unpack_batch(self, batch):
            return batch[0], batch[1][:10]

    with pytest.raises(ValueError, match=r"same batch size .* outputs Tensor\(shape=\(64, 10\), dtype=float32\) "
                                         r"and target Tensor\(shape=\(10,\), dtype=int64\)\."):
        trainer().validate(Truncated(), loader(x, y), verbose=False)

    class Floats(Lit):
        def unpack_batch(self, batch):
            return batch[0], batch[1].float()

    with pytest.raises(ValueError, match=r"integer targets of shape \(N, \.\.\.\)"):
        trainer().validate(Floats(), loader(x, y), verbose=False)

    bad_f1 = Lit(lambda: {"f1": MulticlassF1Score(10)})
    bad_f1.unpack_batch = lambda batch: (batch[0], batch[1] + 20)
    bad_f1.compute_loss = lambda outputs, target: outputs.mean()
    with pytest.raises(RuntimeError, match=r"Metric `val/f1` \(MulticlassF1Score\) failed on outputs "
                                           r"Tensor\(shape=\(64,"):
        trainer().validate(bad_f1, loader(x, y), verbose=False)


def test_update_metrics_outside_an_epoch_says_so():
    with pytest.raises(RuntimeError, match=r"ran outside a validation epoch"):
        Lit().update_metrics("val", torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"Expected argument `stage` to be 'train', 'val' or 'test' but got 'valid'"):
        Lit().update_metrics("valid", torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))


def test_mode_check_sees_no_change_from_the_mixin(digits):
    """Metric clones for a dataloader first seen during evaluation are registered only at the next setup."""
    from lightning_validate import ModeCheck

    x, y = digits
    parts = [loader(x[:200], y[:200]), loader(x[200:400], y[200:400])]
    model = Lit()
    t = trainer(max_epochs=1, limit_train_batches=2, callbacks=[ModeCheck(on_violation="raise", verbose=False)])
    t.validate(model, parts, verbose=False)
    assert sorted(model.lv_metrics) == ["val_0"]
    t.fit(model, parts[0], parts)
    assert sorted(model.lv_metrics) == ["train_0", "val_0", "val_1"]
