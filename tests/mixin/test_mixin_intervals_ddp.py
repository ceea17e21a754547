"""Under DDP the intervals and the bootstrap replicates are the single-process ones: one spawn on 2 CPU processes.

The validation set has an odd size, so DistributedSampler repeats a sample on rank 1: the repeat must not count.
Each worker saves its per-sample record and its values; here they are merged and compared with a run on one process.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from distributed_exit import DDPSpawn
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import Intervals, SampleRecord, ValidationMixin

WORLD = 2


class Saving(ValidationMixin, pl.LightningModule):
    num_classes = 10
    confidence = Intervals(replicates=300, record=True)

    def __init__(self, out: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_metrics(self):  # type: ignore[no-untyped-def]
        return {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}

    def on_validation_end(self) -> None:
        super().on_validation_end()  # each process saves the samples it evaluated
        self.sample_record("val").save(Path(self.out) / f"record_{self.trainer.global_rank}.pt")


@pytest.mark.ddp
def test_intervals_and_replicates_under_ddp_equal_one_process(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:301] / 16.0, dtype=torch.float32), torch.tensor(y[:301])  # odd: rank 1 repeats one
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    single = Saving(str(tmp_path))
    values = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(single, data, verbose=False)[0]
    record = single.sample_record("val")
    spawn = tmp_path / "ddp"
    spawn.mkdir()
    model = Saving(str(spawn))
    ddp = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=DDPSpawn(), logger=False, enable_progress_bar=False,
                     enable_model_summary=False)
    ddp.validate(model, data, verbose=False)
    logged = {k: v.item() for k, v in ddp.callback_metrics.items()}
    merged = SampleRecord.merge([SampleRecord.load(spawn / f"record_{r}.pt") for r in range(WORLD)])
    assert torch.equal(merged.ids, torch.arange(301))  # the repeated sample is not in the record
    torch.testing.assert_close(merged.replicates["f1"], record.replicates["f1"], rtol=1e-9, atol=0.0)
    torch.testing.assert_close(merged.rows["acc"], record.rows["acc"])
    torch.testing.assert_close(merged.rows["loss"], record.rows["loss"], rtol=1e-6, atol=1e-7)
    for name in ("acc", "f1", "loss"):  # the logged bounds went through Lightning as float32
        for bound in ("low", "high"):
            key = f"val/{name}_{bound}"
            assert logged[key] == pytest.approx(values[key], rel=1e-6), key
