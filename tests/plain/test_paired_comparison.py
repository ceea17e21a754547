"""paired_comparison on two models, on records saved by separate runs, and from the command line."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import Intervals, SampleRecord, ValidationMixin, paired_comparison, record_samples
from lightning_validate.paired import main


def task() -> tuple[nn.Module, nn.Module, DataLoader, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    y = (x @ w + torch.randn(600, 3, generator=g)).argmax(1)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    with torch.no_grad():
        a.weight.copy_(w.T + 0.6 * torch.randn(3, 5, generator=g))
        b.weight.copy_(w.T + 0.4 * torch.randn(3, 5, generator=g))
        a.bias.zero_()
        b.bias.zero_()
    return a, b, DataLoader(TensorDataset(x, y), batch_size=64), x, y


def metrics() -> dict[str, object]:
    return {"acc": MulticlassAccuracy(3, average="micro"), "f1": MulticlassF1Score(3)}


def test_two_models_on_one_loader_against_statsmodels_and_scipy() -> None:
    a, b, loader, x, y = task()
    report = paired_comparison(a, b, loader, criterion=nn.CrossEntropyLoss(), metrics=metrics(), progress=False,
                               confidence=Intervals(replicates=200))
    assert [r.name for r in report.rows] == ["loss", "acc", "f1"]
    with torch.no_grad():
        la, lb = a(x).double(), b(x).double()
    right_a, right_b = la.argmax(1) == y, lb.argmax(1) == y
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    assert report["acc"].p == pytest.approx(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue, rel=1e-9)
    loss_a = F.cross_entropy(la, y, reduction="none").numpy()
    loss_b = F.cross_entropy(lb, y, reduction="none").numpy()
    assert report["loss"].p == pytest.approx(stats.ttest_rel(loss_b, loss_a).pvalue, rel=1e-6)
    assert report["acc"].p_holm >= report["acc"].p
    assert report["f1"].method == "paired bootstrap, 200 replicates"


def test_records_saved_by_separate_runs_compare_like_one_run(tmp_path: Path) -> None:
    a, b, loader, _, _ = task()
    spec = Intervals(replicates=200)
    together = paired_comparison(a, b, loader, criterion=nn.CrossEntropyLoss(), metrics=metrics(), progress=False,
                                 confidence=spec)
    for model, name in ((a, "a"), (b, "b")):
        record_samples(model, loader, criterion=nn.CrossEntropyLoss(), metrics=metrics(), progress=False,
                       confidence=spec).save(tmp_path / f"{name}.pt")
    apart = paired_comparison(tmp_path / "a.pt", tmp_path / "b.pt", confidence=spec)
    assert apart.to_dict() == together.to_dict()
    cli = main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json", str(tmp_path / "report.json")])
    assert cli.rows == together.rows
    assert (tmp_path / "report.json").read_text().startswith('{\n  "samples": 600')


def test_what_cannot_be_paired_is_refused() -> None:
    a, b, loader, _, _ = task()
    shuffled = DataLoader(loader.dataset, batch_size=64, shuffle=True)
    with pytest.raises(ValueError, match="Expected a dataloader that yields the samples in the same order each time"):
        paired_comparison(a, b, shuffled, criterion=nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(ValueError, match="Expected a `dataloader` to evaluate the two models on but got None"):
        paired_comparison(a, b, criterion=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"Expected argument `b` to be a model .* but got int"):
        paired_comparison(SampleRecord(ids=torch.arange(1), fingerprint=torch.zeros(1)), 3)  # type: ignore[arg-type]


class Lit(ValidationMixin, pl.LightningModule):
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 3)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Data(pl.LightningDataModule):
    def val_dataloader(self) -> DataLoader:
        return task()[2]


def test_the_command_line_compares_two_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _, _, _ = task()
    for net, name in ((a, "a"), (b, "b")):
        model = Lit()
        model.net.load_state_dict(net.state_dict())
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(model)
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    report = main([str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--model", f"{__name__}:Lit",
                   "--data", f"{__name__}:Data", "--replicates", "100", "--save-records", str(tmp_path / "records")])
    out = capsys.readouterr().out
    assert out.startswith("B - A on 600 samples; 95% intervals") and "McNemar exact" in out
    assert [r.name for r in report.rows] == ["loss", "acc"]
    assert SampleRecord.load(tmp_path / "records" / "a.pt").samples == 600
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")])  # checkpoints need --model and --data
