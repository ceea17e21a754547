"""``metrics_history`` travels in checkpoints: a resumed run's history covers every epoch, with exact values."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, log_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ValidationMixin


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:500] / 16.0, dtype=torch.float32), torch.tensor(y[:500])
    return (x[:300], y[:300]), (x[300:], y[300:])


class Lit(ValidationMixin, pl.LightningModule):
    """No dropout and unshuffled loaders: a resumed run computes exactly what an uninterrupted one does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def configure_metrics(self):
        return {"acc": MulticlassAccuracy(10, average="micro")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model, data, max_epochs, callbacks=(), ckpt_path=None):
    (tx, ty), (vx, vy) = data
    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_model_summary=False,
                   enable_progress_bar=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                   num_sanity_val_steps=0)
    t.fit(model, DataLoader(TensorDataset(tx, ty), batch_size=64), DataLoader(TensorDataset(vx, vy), batch_size=64),
          ckpt_path=ckpt_path)
    return model.metrics_history


def assert_same_history(got, expected):
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-6)


# The resumed runs attach no ModelCheckpoint (a second one in the same folder would warn about it being non-empty);
# Lightning advises to attach the callbacks the checkpoint was written with. Its advice, not a fault here.
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used:UserWarning")


@pytest.fixture(scope="module")
def uninterrupted(digits):
    return fit(Lit(), digits, 4)


@pytest.mark.parametrize("at_train_epoch_end", [True, False], ids=["saved-at-train-epoch-end", "saved-at-val-end"])
def test_a_resumed_history_covers_every_epoch(digits, uninterrupted, tmp_path, at_train_epoch_end):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=at_train_epoch_end)
    first = fit(Lit(), digits, 2, [checkpoint])
    assert_same_history(first, uninterrupted[:2])

    model = Lit()
    resumed = fit(model, digits, 4, ckpt_path=checkpoint.last_model_path)
    assert [r["epoch"] for r in resumed] == [0.0, 1.0, 2.0, 3.0]
    assert_same_history(resumed, uninterrupted)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(resumed[1])
    (vx, vy) = digits[1]
    model.eval()
    with torch.no_grad():
        prob = model(vx).double().softmax(1).numpy()
    assert resumed[-1]["val/loss"] == pytest.approx(log_loss(vy.numpy(), prob, labels=list(range(10))), abs=1e-6)
    assert resumed[-1]["val/acc"] == pytest.approx(accuracy_score(vy.numpy(), prob.argmax(1)), abs=1e-6)

    loaded = Lit.load_from_checkpoint(checkpoint.last_model_path)
    assert_same_history(loaded.metrics_history, uninterrupted[:2] if at_train_epoch_end else uninterrupted[:1])


def test_a_checkpoint_without_history_still_loads(digits, uninterrupted, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Lit(), digits, 2, [checkpoint])
    old = torch.load(checkpoint.last_model_path, weights_only=False)
    del old["lightning_validate"]  # as written before the history was saved
    torch.save(old, tmp_path / "old.ckpt")

    assert Lit.load_from_checkpoint(tmp_path / "old.ckpt").metrics_history == []
    resumed = fit(Lit(), digits, 4, ckpt_path=tmp_path / "old.ckpt")
    assert_same_history(resumed, uninterrupted[2:])  # the epochs of this run, exact


def test_the_saved_history_loads_with_weights_only(digits, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    history = fit(Lit(), digits, 1, [checkpoint])
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["lightning_validate"]
    assert_same_history(saved["metrics_history"], history)
