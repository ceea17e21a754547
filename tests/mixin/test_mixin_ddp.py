"""Under DDP the logged values equal the single-process ones: DistributedSampler's repeated samples are not counted.

One ``ddp_spawn`` run on 2 CPU processes (gloo); the test stage shares the validation code path. The workers
send back the final weights and ``trainer.callback_metrics``; the references are computed here, on the whole
data, with sklearn.
"""

import lightning.pytorch as pl
import pytest
import torch
from distributed_exit import DDPSpawn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import ValidationMixin
from lightning_validate.metrics.fast_accuracy import FastMulticlassAccuracy

BATCH = 64
WORLD = 2


class DigitsModel(ValidationMixin, pl.LightningModule):
    num_classes = 10
    val_dataloader_names = ("head", "tail")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def configure_metrics(self):
        return {
            "acc": MulticlassAccuracy(10, average="micro"),
            "f1": MulticlassF1Score(10, average="macro"),
            "fast_acc": FastMulticlassAccuracy(10),  # the default metric: pending counts must reach the sync
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def ddp_trainer():
    return pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPSpawn(),  # "ddp_spawn", ending the workers' process group (distributed_exit.py)
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )


def reference(model, x, y, duplicate_first=False):
    """sklearn on the whole data; with ``duplicate_first``, what a loop that counts DDP padding would see."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss  # here: the spawned workers need not load it

    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    prob, target = logits.softmax(1).numpy(), y.numpy()
    if duplicate_first:  # N odd on 2 ranks: rank 1 repeats global position 0
        prob, target = torch.cat([logits[:1], logits]).softmax(1).numpy(), torch.cat([y[:1], y]).numpy()
    pred = prob.argmax(1)
    return {
        "loss": log_loss(target, prob / prob.sum(1, keepdims=True), labels=list(range(10))),
        "acc": accuracy_score(target, pred),
        "f1": f1_score(target, pred, average="macro"),
    }


@pytest.mark.ddp
def test_fit_under_ddp_logs_the_single_process_values(digits):
    x, y = digits
    # 1001 and 257 samples: odd, so rank 1 repeats one sample. With 257, rank 1's 129th position (global 257) is
    # that repeat, alone in its last batch (64 + 64 + 1): the step sees a batch that is all padding.
    parts = {"head": (x[:1001], y[:1001]), "tail": (x[1001:1258], y[1001:1258])}
    assert all(len(py) % WORLD and len(py) % (WORLD * BATCH) for _, py in parts.values())
    model = DigitsModel()
    trainer = ddp_trainer()
    trainer.fit(model, loader(x[:1200], y[:1200]), [loader(*p) for p in parts.values()])
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    for name, (px, py) in parts.items():
        ref = reference(model, px, py)
        naive = reference(model, px, py, duplicate_first=True)
        for metric in ("loss", "acc", "f1"):
            assert logged[f"val/{metric}/{name}"] == pytest.approx(ref[metric], abs=1e-6)
        assert logged[f"val/fast_acc/{name}"] == pytest.approx(ref["acc"], abs=1e-6)
        assert abs(logged[f"val/loss/{name}"] - naive["loss"]) > 1e-5  # counting the repeat would show
    assert {"train/loss_epoch", "train/acc", "train/f1"} <= set(logged)


# --------------------------------------------------------------------------------------------------------------
# Exact losses under DDP: several criteria, one per validation dataloader, in one spawn


class PerLoaderCriterion(ValidationMixin, pl.LightningModule):
    """Outputs = inputs * 1; validation dataloader ``i`` is scored with ``criteria[i]`` (the default path)."""

    def __init__(self, criteria):
        super().__init__()
        self.criteria = nn.ModuleList(criteria)
        self.scale = nn.Parameter(torch.ones(()))
        self.which = 0

    @property
    def criterion(self):
        return self.criteria[self.which]

    def forward(self, x):
        return x * self.scale

    def configure_metrics(self):
        return {}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.which = dataloader_idx
        return super().validation_step(batch, batch_idx, dataloader_idx)


def _ddp_loss_cases():
    from loss_cases import CASES, VOID, Case, segmentation

    x, y = segmentation(n=15, batch_size=4)
    y[8:15:2] = VOID  # rank 0's second batch (global positions 8, 10, 12, 14) is entirely ignored
    seg = Case("ce_segmentation_weight_ignore", lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 1.0, 2.0, 4.0]), ignore_index=VOID), x, y, 4)
    names = ["ce_weight_imbalanced", "kl_div_batchmean", "bce_with_logits_weight_pos_weight", "mse"]
    return [seg, *(c for c in CASES if c.name in names)]


@pytest.mark.ddp
def test_losses_under_ddp_are_the_criterion_on_the_whole_set():
    from loss_cases import Case

    cases = _ddp_loss_cases()
    assert len(cases) == 5 and all(len(c.target) % WORLD for c in cases)  # odd sizes: rank 1 repeats sample 0
    model = PerLoaderCriterion([c.make() for c in cases])
    trainer = ddp_trainer()
    loaders = [DataLoader(TensorDataset(c.outputs, c.target), batch_size=c.batch_size) for c in cases]
    trainer.validate(model, loaders, verbose=False)
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    for i, case in enumerate(cases):
        assert logged[f"val/loss/dataloader_idx_{i}"] == pytest.approx(case.reference(), abs=1e-6, rel=1e-6), case.name
    seg = cases[0]
    padded = Case("padded", seg.make, torch.cat([seg.outputs[:1], seg.outputs]),
                  torch.cat([seg.target[:1], seg.target]), 4)
    assert abs(logged["val/loss/dataloader_idx_0"] - padded.reference()) > 1e-4  # counting the repeat would show
