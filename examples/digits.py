"""Train a small network on scikit-learn's handwritten digits with ValidationMixin and ModeCheck.

The digits ship with scikit-learn (1,797 8x8 images, no download). The run shows:

- Lightning's progress bars, with running validation loss and metrics on the validation bar (ValidationMixin);
- exact per-epoch validation metrics with their 95% confidence intervals (``val/acc_low``, ``val/acc_high``), logged
  to CSV (``<out>/logs/version_N/metrics.csv``);
- ModeCheck checking eval mode, grad state and that validation gives the model back unchanged, with its summary;
- a final table of validation and test metrics of the best checkpoint (by ``val/loss``), each with its interval;
- a plot of loss and accuracy per epoch for training and validation (``curves.png`` next to the CSV), from the
  mixin's ``metrics_history``, the validation curves in their 95% bands.

The intervals cover the sampling of the 360 validation and 360 test digits, not another seed or split: with this few
samples an accuracy is known to about +-2 points.

Run: ``python examples/digits.py`` (about a minute on a 2-core CPU), ``--help`` for options.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import ModeCheck, ValidationMixin
from lightning_validate.metrics.intervals import format_interval

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8 x 8 pixels


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split into stratified train/validation/test sets, pixels scaled to [0, 1].

    Args:
        batch_size: samples per batch.
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for the final test.
        seed: seed of the split (the split does not depend on the training seed).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0):
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "Expected `val_fraction` and `test_fraction` in (0, 1) with a sum below 1 but got "
                f"{val_fraction} and {test_fraction}."
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = load_digits(return_X_y=True)
        idx = list(range(len(y)))
        rest, test = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=self.seed)
        inputs = torch.tensor(x / 16.0, dtype=torch.float32)
        targets = torch.tensor(y, dtype=torch.long)
        self.splits = {name: TensorDataset(inputs[part], targets[part])
                       for name, part in (("train", train), ("val", val), ("test", test))}

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)


class DigitsClassifier(ValidationMixin, pl.LightningModule):
    """An MLP with BatchNorm and Dropout (so eval mode matters) for the 10 digit classes.

    ValidationMixin supplies ``training_step``, ``validation_step`` and ``test_step``: exact epoch loss, accuracy and
    macro F1, logged as ``train/...``, ``val/...`` and ``test/...``, and kept per epoch in ``metrics_history``;
    ``confidence`` adds each validation and test value's 95% interval (``val/acc_low``, ``val/acc_high``).

    Args:
        hidden: width of the two hidden layers.
        dropout: dropout probability after each hidden layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    confidence = 0.95

    def __init__(self, hidden: int = 128, dropout: float = 0.2, lr: float = 3e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_metrics(self) -> dict[str, Any]:
        return {
            "acc": MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "f1": MulticlassF1Score(NUM_CLASSES, average="macro"),
        }

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch (``ValidationMixin.metrics_history``), training and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for stage, style in (("train", "o-"), ("val", "s-")):
            key = f"{stage}/{metric}"
            # Epochs count from 0, as on Lightning's progress bar and in the checkpoint name `best-epoch=N`.
            points = [(int(r["epoch"]), r[key]) for r in history if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                line = ax.plot(xs, ys, style, label="training" if stage == "train" else "validation", markersize=3)
                bands = [(int(r["epoch"]), r[f"{key}_low"], r[f"{key}_high"]) for r in history if f"{key}_low" in r]
                if bands:  # validation values: their 95% confidence interval over the validation set's sampling
                    bx, low, high = zip(*bands, strict=True)
                    ax.fill_between(bx, low, high, color=line[0].get_color(), alpha=0.2, linewidth=0,
                                    label="validation, 95% interval")
        ax.set_xlabel("epoch (from 0)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("digits: training and validation per epoch")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(val: dict[str, float], test: dict[str, float]) -> None:
    """Each value with its 95% interval, ``0.975 [0.958, 0.985]``."""
    names = sorted({k.split("/", 1)[1] for k in [*val, *test] if not k.endswith(("_low", "_high"))},
                   key=lambda n: (n != "loss", n))
    print(f"\n{'metric':<8} {'validation (95% interval)':<26} test (95% interval)")
    for name in names:
        cells = [
            format_interval(d.get(f"{stage}/{name}", math.nan), d.get(f"{stage}/{name}_low", math.nan),
                            d.get(f"{stage}/{name}_high", math.nan))
            for d, stage in ((val, "val"), (test, "test"))
        ]
        print(f"{name:<8} {cells[0]:<26} {cells[1]:<26}".rstrip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=20, help="training epochs (default: 20)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder (default: runs/digits)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: 0)")
    parser.add_argument("--fast", action="store_true", help="a 2-epoch smoke run, for tests")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    max_epochs = 2 if args.fast else args.max_epochs
    # Lightning's advice for large data sets; the digits fit in memory, worker processes would only add start-up.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about your model.
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    model = DigitsClassifier()
    mode_check = ModeCheck()
    logger = CSVLogger(save_dir=args.out, name="logs")
    checkpoint = ModelCheckpoint(monitor="val/loss", mode="min", filename="best-{epoch}")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=logger,
        # TQDM named explicitly, for the classic one-line bars; with `rich` installed Lightning picks its Rich bar,
        # which shows the same running values in its metrics column.
        callbacks=[mode_check, checkpoint, *([] if args.no_progress_bar else [TQDMProgressBar()])],
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
    )
    trainer.fit(model, datamodule=data)

    log_dir = Path(logger.log_dir)
    plot_path = log_dir / "curves.png"
    plot_curves(model.metrics_history, plot_path)

    val = trainer.validate(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    test = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    print_table(val, test)
    verdict = "clean" if not mode_check.findings else f"{len(mode_check.findings)} finding(s)"
    print(f"\nModeCheck: {verdict}")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"metrics CSV:     {log_dir / 'metrics.csv'}")
    print(f"plot:            {plot_path}")
    return {**val, **test}


if __name__ == "__main__":
    main()
