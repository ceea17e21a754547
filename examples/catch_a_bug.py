"""See ModeCheck catch a real bug: an `on_validation_model_train` override that un-freezes a frozen BatchNorm backbone.

A common fine-tuning set-up: a pretrained backbone with BatchNorm, frozen (eval mode, ``requires_grad=False``),
under a trainable head. Lightning puts back each submodule's own mode after validation, unless the module
overrides ``on_validation_model_train``; an override that calls ``self.train()`` (or ``super()``, whose default body
is ``self.trainer.model.train()``) puts the frozen BatchNorm back into train mode. From then on it updates its running
statistics with every training batch; nothing fails, the model just quietly drifts away from its pretrained
statistics (Lightning issues #2551, #18930, #20177).

ModeCheck reports it at the first validation, naming the submodule and the fix. Run:
``python examples/catch_a_bug.py``.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from torch import nn

from lightning_validate import ModeCheck


class FineTuner(DigitsClassifier):
    """The digits model with its first block as a frozen, 'pretrained' backbone (Linear + BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(self.net[0], self.net[1])  # Linear, BatchNorm1d
        self.head = nn.Sequential(*self.net[2:])
        del self.net
        self.backbone.requires_grad_(False)
        self.backbone.eval()  # frozen: use the pretrained BatchNorm statistics, never update them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class BuggyFineTuner(FineTuner):
    def on_validation_model_train(self) -> None:
        # The bug: meant to "go back to training", but it also un-freezes the frozen backbone.
        self.train()


def run(model: FineTuner) -> ModeCheck:
    pl.seed_everything(0, verbose=False)
    pretrained = model.backbone[1].running_mean.clone()
    check = ModeCheck()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=[check],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    drifted = not torch.equal(model.backbone[1].running_mean, pretrained)
    print(f"frozen BatchNorm statistics changed by training: {'YES' if drifted else 'no'}")
    return check


def main() -> None:
    # Quiet Lightning's start-up banners so that only ModeCheck speaks.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning's one-time notice about modules in eval mode at fit start: the frozen backbone is, on purpose.
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")
    # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about your model.
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
    # Print each ModeCheck warning as one plain line (default formatting adds the source line).
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"

    print("== The buggy fine-tuner: on_validation_model_train calls self.train() ==")
    buggy = run(BuggyFineTuner())
    print("\n== The fix: delete the override (Lightning restores each submodule's own mode) ==")
    fixed = run(FineTuner())
    print(f"\nfindings: buggy {len(buggy.findings)}, fixed {len(fixed.findings)}")


if __name__ == "__main__":
    main()
