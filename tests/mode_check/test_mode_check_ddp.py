"""ModeCheck under DDP on CPU (2 processes, gloo): every rank checks, "raise" stops all ranks together."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from distributed_exit import DDPSpawn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import ModeCheck, ModeCheckError


class Net(pl.LightningModule):
    def __init__(self, buggy_ranks: tuple[int, ...]) -> None:
        super().__init__()
        self.buggy_ranks = buggy_ranks
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()).requires_grad_(False).eval()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def on_validation_model_train(self) -> None:
        if self.global_rank in self.buggy_ranks:
            self.train()  # the bug: un-freezes the frozen BatchNorm backbone
        else:
            super().on_validation_model_train()
            self.backbone.eval()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def run(tmp_path: Path, check: ModeCheck, buggy_ranks: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPSpawn(), max_epochs=2, limit_train_batches=2, limit_val_batches=2,
        num_sanity_val_steps=0, callbacks=[check], logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )
    trainer.fit(Net(buggy_ranks), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode:UserWarning")
def test_warn_reports_on_every_rank_and_warns_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run(tmp_path, ModeCheck(report_path=str(tmp_path / "report-{rank}.json")), buggy_ranks=(0, 1))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report-{rank}.json").read_text())
        assert report["world_size"] == 2 and report["rank"] == rank and report["status"] == "finished"
        assert [(f["code"], f["module"]) for f in report["findings"]] == [("LV205", "backbone")]
    err = capfd.readouterr().err
    assert err.count("LV205 submodule mode not restored after evaluation") == 1  # printed by rank zero only


class RecordingModeCheck(ModeCheck):
    """Writes each rank's ModeCheckError to a file: the launcher reports only the first failing process."""

    def __init__(self, folder: str) -> None:
        super().__init__(on_violation="raise")
        self.folder = folder

    def _sync(self, boundary: str) -> None:
        try:
            super()._sync(boundary)
        except ModeCheckError as err:
            rank = self._trainer.global_rank if self._trainer is not None else -1
            Path(self.folder, f"raised-{rank}.txt").write_text(str(err))
            time.sleep(1.0)  # let the other rank write its file before the launcher terminates it
            raise


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode:UserWarning")
def test_raise_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    # Only rank 1 has the bug: rank 0 must raise too, at the same boundary, not wait forever in the next collective.
    with pytest.raises(Exception, match=r"ModeCheckError: (LV205 .*`backbone`|ModeCheck: another rank reported)"):
        run(tmp_path, RecordingModeCheck(str(tmp_path)), buggy_ranks=(1,))
    assert (tmp_path / "raised-1.txt").read_text().startswith("LV205 submodule mode not restored after evaluation")
    assert (tmp_path / "raised-0.txt").read_text().startswith(
        "ModeCheck: another rank reported a finding at on_validation_model_train")


class Failing(Net):
    """Raises on every rank at ``point`` during validation; otherwise correct."""

    def __init__(self, point: str) -> None:
        super().__init__(buggy_ranks=())
        self.point = point

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.point == "validation_step" and batch_idx == 1:
            raise RuntimeError("injected at validation_step")
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.point == "on_validation_epoch_end":
            raise RuntimeError("injected at on_validation_epoch_end")


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode:UserWarning")
@pytest.mark.parametrize("point", ["validation_step", "on_validation_epoch_end"])
def test_exception_in_evaluation_under_ddp_spawn_then_clean_rerun(tmp_path: Path, point: str) -> None:
    """Under ``ddp_spawn`` each worker evaluates its own copy and dies with it; Lightning calls ``on_exception`` in
    the main process, whose model (the user's object) must be as it was, and rerun cleanly."""
    model = Failing(point)
    expected = ({n: m.training for n, m in model.named_modules()},
                {n: p.requires_grad for n, p in model.named_parameters()})
    assert not expected[0]["backbone"] and expected[0]["head"]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    check = ModeCheck(on_violation="raise", verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPSpawn(), max_epochs=1, limit_train_batches=2, limit_val_batches=2,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[check],
    )
    with pytest.raises(Exception, match=f"injected at {point}"):
        trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert ({n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()}) == expected and torch.is_grad_enabled()
    model.point = ""
    rerun = ModeCheck(on_violation="raise", verbose=False)
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
               enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
               default_root_dir=tmp_path, callbacks=[rerun]).fit(
        model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert rerun.findings == []
