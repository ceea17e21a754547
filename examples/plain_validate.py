"""`validate()` in plain PyTorch: train a tiny MLP on sklearn's digits, then validate it. Runs in seconds on a CPU.

    python examples/plain_validate.py

The validation set (360 samples) does not divide by the batch size (64): the last batch holds 40 samples, and the
loss and metrics are still exact per-sample values over the whole set. From the second epoch on, the BatchNorm
layer is frozen (eval mode on purpose) and stays frozen after each validation; the model comes back in train mode,
grad on. The last line checks the accuracy against sklearn on one full-set forward pass.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import validate


def main() -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_all, y_all = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y_all))
    train_idx, val_idx = perm[:-360], perm[-360:]
    train = DataLoader(TensorDataset(x_all[train_idx], y_all[train_idx]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x_all[val_idx], y_all[val_idx]), batch_size=64)

    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    metrics = {
        "accuracy": MulticlassAccuracy(num_classes=10, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes=10, average="macro"),
    }

    for epoch in range(3):
        model.train()
        if epoch > 0:
            model[1].eval()  # BatchNorm's statistics frozen after the first epoch: validate() keeps it frozen
        for inputs, target in train:
            optimizer.zero_grad()
            criterion(model(inputs), target).backward()
            optimizer.step()
        result = validate(model, val, criterion=criterion, metrics=metrics, desc=f"Valid {epoch}")
        print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))

    # The metrics hold the last run's states: per-class numbers or a plot can be read from them afterwards.
    print("the metric objects keep the last run's states:", metrics["f1_macro"].compute().item() == result["f1_macro"])
    print("model.training:", model.training, "| frozen BatchNorm still eval:", not model[1].training,
          "| grad enabled:", torch.is_grad_enabled())

    # An independent check: one forward pass over the whole validation set, sklearn's accuracy.
    model.eval()
    with torch.no_grad():
        pred = model(x_all[val_idx]).argmax(1)
    print(f"sklearn accuracy on the same set: {accuracy_score(y_all[val_idx], pred):.4f}")


if __name__ == "__main__":
    main()
