"""Under DDP, ``metric_inputs`` sees each rank's batches with the repeated samples already cut, dict outputs too.

One ``ddp_spawn`` run on 2 CPU processes (gloo), 257 validation samples: rank 1 repeats one sample, alone in its
last batch (64 + 64 + 1), so the step sees a dict batch that is all padding and one that is not cut.
"""

import lightning.pytorch as pl
import pytest
import torch
from distributed_exit import DDPSpawn
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ValidationMixin


class TwoHeads(ValidationMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.digit = nn.Linear(32, 10)
        self.parity = nn.Linear(32, 2)

    def forward(self, x):
        h = self.body(x)
        return {"digit": self.digit(h), "parity": self.parity(h)}

    def unpack_batch(self, batch):
        x, y = batch
        return x, {"digit": y, "parity": y % 2}

    def compute_loss(self, outputs, target):
        return F.cross_entropy(outputs["digit"], target["digit"]) + F.cross_entropy(outputs["parity"], target["parity"])

    def configure_metrics(self):
        return {"digit_acc": MulticlassAccuracy(10, average="micro"), "parity_acc": MulticlassAccuracy(2)}

    def metric_inputs(self, outputs, target):
        return {"digit_acc": (outputs["digit"], target["digit"]), "parity_acc": (outputs["parity"], target["parity"])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


@pytest.mark.ddp
def test_two_heads_under_ddp_give_the_single_process_values():
    from sklearn.datasets import load_digits
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    vx, vy = x[1000:1257], y[1000:1257]
    model = TwoHeads()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPSpawn(), max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, DataLoader(TensorDataset(x[:600], y[:600]), batch_size=64),
                DataLoader(TensorDataset(vx, vy), batch_size=64))
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    model.eval()
    with torch.no_grad():
        out = {k: v.double() for k, v in model(vx).items()}
    loss = F.cross_entropy(out["digit"], vy, reduction="none") + F.cross_entropy(out["parity"], vy % 2,
                                                                                 reduction="none")
    assert logged["val/loss"] == pytest.approx(loss.mean().item(), abs=1e-6)
    digit = accuracy_score(vy.numpy(), out["digit"].argmax(1).numpy())
    assert logged["val/digit_acc"] == pytest.approx(digit, abs=1e-6)
    # MulticlassAccuracy's default average is "macro": the mean recall over the classes.
    parity = balanced_accuracy_score((vy % 2).numpy(), out["parity"].argmax(1).numpy())
    assert logged["val/parity_acc"] == pytest.approx(parity, abs=1e-6)
