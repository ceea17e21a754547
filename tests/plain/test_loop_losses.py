"""``validate()``'s loss is the criterion applied once to the whole dataloader, for every torch.nn loss."""

from __future__ import annotations

import pytest
import torch
from loss_cases import CASE_IDS, CASES, VOID, Case, segmentation
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import LossTerms, validate


class Passthrough(nn.Module):
    """Outputs = inputs (times a parameter equal to 1: the model has a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def loader(case: Case) -> DataLoader:
    return DataLoader(TensorDataset(case.outputs, case.target), batch_size=case.batch_size)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_is_the_criterion_on_the_whole_set(case: Case) -> None:
    criterion = case.make()
    result = validate(Passthrough(), loader(case), criterion=criterion, progress=False)
    assert result["loss"] == pytest.approx(case.reference(), abs=1e-6, rel=1e-6)
    assert criterion.reduction == case.make().reduction  # not modified


@pytest.mark.parametrize("with_step", [False, True], ids=["inference_mode", "step"])
def test_segmentation_with_a_step_and_with_own_terms(with_step: bool) -> None:
    x, y = segmentation()
    case = Case("seg", lambda: nn.CrossEntropyLoss(ignore_index=VOID, label_smoothing=0.1), x, y, 4)
    step = (lambda batch, model: (model(batch[0]), batch[1])) if with_step else None
    result = validate(Passthrough(), loader(case), criterion=case.make(), step=step, progress=False)
    assert result["loss"] == pytest.approx(case.reference(), abs=1e-6)

    def own(outputs: Tensor, target: Tensor) -> LossTerms:
        kept = target != VOID
        per_pixel = F.cross_entropy(outputs, target.masked_fill(~kept, 0), reduction="none", label_smoothing=0.1)
        return LossTerms((per_pixel * kept).sum(), kept.sum())

    result = validate(Passthrough(), loader(case), criterion=own, step=step, progress=False)
    assert result["loss"] == pytest.approx(case.reference(), abs=1e-6)


def test_per_element_values_count_once() -> None:
    x, y = segmentation()
    case = Case("seg", lambda: nn.CrossEntropyLoss(reduction="none", ignore_index=VOID), x, y, 4)
    result = validate(Passthrough(), loader(case), criterion=case.make(), progress=False)
    everything = F.cross_entropy(x.double(), y, ignore_index=VOID, reduction="none").mean().item()
    assert result["loss"] == pytest.approx(everything, abs=1e-6)  # ignored pixels are zeros among the values
