"""Two heads, one metric each: ``metric_inputs`` hands every metric the predictions and targets of its head.

The scikit-learn digits (bundled, no download): one head predicts the digit, the other its parity. The steps are
the mixin's; the model only says what the loss and each metric take.

    python examples/two_heads.py
"""

from __future__ import annotations

import warnings

# --8<-- [start:model]
import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import ValidationMixin


class TwoHeads(ValidationMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.digit = nn.Linear(32, 10)
        self.parity = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"digit": self.digit(h), "parity": self.parity(h)}

    def unpack_batch(self, batch):
        x, y = batch
        return x, {"digit": y, "parity": y % 2}

    def compute_loss(self, outputs, target):  # the loss sees the model's outputs as they are
        return F.cross_entropy(outputs["digit"], target["digit"]) + F.cross_entropy(outputs["parity"], target["parity"])

    def configure_metrics(self):
        return {
            "digit_acc": MulticlassAccuracy(num_classes=10, average="micro"),
            "digit_f1": MulticlassF1Score(num_classes=10, average="macro"),
            "parity_acc": MulticlassAccuracy(num_classes=2, average="micro"),
        }

    def metric_inputs(self, outputs, target):  # each metric gets the (preds, target) of its head
        return {
            "digit_acc": (outputs["digit"], target["digit"]),
            "digit_f1": (outputs["digit"], target["digit"]),
            "parity_acc": (outputs["parity"], target["parity"]),
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


# --8<-- [end:model]


def main() -> dict[str, float]:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=64)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    model = TwoHeads()
    trainer.fit(model, train, val)
    (result,) = trainer.validate(model, val, verbose=False)
    for key, value in result.items():
        print(f"{key:<16} {value:.4f}")
    return result


if __name__ == "__main__":
    # Lightning's advice for large data sets; the digits fit in memory, worker processes would only add start-up.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about your model.
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
    main()
