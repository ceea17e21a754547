"""``val/loss`` and ``test/loss`` are the criterion applied once to the whole set, for every torch.nn loss.

Real ``Trainer`` runs of a model whose outputs are the data itself (times a parameter equal to 1), so each case's
outputs and targets reach the criterion batch by batch, and the float64 reference is the criterion on the whole set.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from loss_cases import CASE_IDS, CASES, VOID, Case, segmentation
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import LossTerms, ValidationMixin


class Passthrough(ValidationMixin, pl.LightningModule):
    """Outputs = inputs * 1 (a parameter, so that training has something to step)."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def configure_metrics(self) -> dict[str, object]:
        return {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader(case: Case) -> DataLoader:
    return DataLoader(TensorDataset(case.outputs, case.target), batch_size=case.batch_size)


def trainer(**kwargs: object) -> pl.Trainer:
    defaults: dict[str, object] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                       enable_checkpointing=False, enable_model_summary=False,
                                       enable_progress_bar=False)
    return pl.Trainer(**{**defaults, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_val_loss_is_the_criterion_on_the_whole_set(case: Case) -> None:
    criterion = case.make()
    model = Passthrough(criterion)
    logged = trainer().validate(model, loader(case), verbose=False)[0]["val/loss"]
    assert logged == pytest.approx(case.reference(), abs=1e-6, rel=1e-6)
    assert model.criterion is criterion and criterion.reduction == case.make().reduction  # not modified


SEGMENTATION = next(c for c in CASES if c.name == "ce_segmentation_weight_ignore")


def test_test_loss_and_fit_use_the_same_definition() -> None:
    case = SEGMENTATION
    grads: list[Tensor] = []

    class Recording(Passthrough):
        def on_after_backward(self) -> None:
            grads.append(self.scale.grad.clone())

    model = Recording(case.make())
    assert trainer().test(model, loader(case), verbose=False)[0]["test/loss"] == pytest.approx(case.reference(),
                                                                                               abs=1e-6)
    tr = trainer(limit_train_batches=None)
    tr.fit(model, loader(case), loader(case))  # lr 0: the outputs stay the data; backward runs through the terms
    assert len(grads) == 4 and all(torch.isfinite(g) and g != 0 for g in grads[:2])  # batch 2 is all void: nan
    logged = {k: v.item() for k, v in tr.callback_metrics.items()}
    assert logged["val/loss"] == pytest.approx(case.reference(), abs=1e-6)
    assert logged["train/loss_epoch"] == pytest.approx(case.reference(), abs=1e-6)
    assert model.metrics_history[0]["val/loss"] == pytest.approx(case.reference(), abs=1e-6)


class OwnTerms(Passthrough):
    """A masked per-pixel loss the library cannot see into, returned as ``LossTerms(sum, weight)``."""

    def compute_loss(self, outputs: Tensor, target: Tensor) -> LossTerms:
        kept = target != VOID
        per_pixel = F.cross_entropy(outputs, target.masked_fill(~kept, 0), reduction="none")
        return LossTerms(sum=(per_pixel * kept).sum(), weight=kept.sum())


class OwnPerPixel(Passthrough):
    """Per-element values: each counts once (the mean over every pixel, void included, of a plain squared error)."""

    def compute_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return (outputs - 1.0).square()


class OwnLossCall(Passthrough):
    """A torch loss call returned as it is: the mixin reads that call's own terms (the pixels kept)."""

    def compute_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(outputs, target, ignore_index=VOID)


class OwnBatchMean(Passthrough):
    """A 0-dim batch mean that is no loss call's own result: weighted by the batch size."""

    def compute_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return 1.0 * F.cross_entropy(outputs, target, ignore_index=VOID)


def test_compute_loss_terms_and_per_element_values_are_exact() -> None:
    x, y = segmentation()
    case = Case("own", lambda: nn.CrossEntropyLoss(ignore_index=VOID), x, y, 4)
    terms = trainer().validate(OwnTerms(nn.Identity()), loader(case), verbose=False)[0]["val/loss"]
    assert terms == pytest.approx(case.reference(), abs=1e-6)
    per_pixel = trainer().validate(OwnPerPixel(nn.Identity()), loader(case), verbose=False)[0]["val/loss"]
    assert per_pixel == pytest.approx((x.double() - 1).square().mean().item(), abs=1e-6)
    own_call = trainer().validate(OwnLossCall(nn.Identity()), loader(case), verbose=False)[0]["val/loss"]
    assert own_call == pytest.approx(case.reference(), abs=1e-6)  # also the all-void batch: it adds nothing
    # The documented limit of a batch mean: each batch counts by its number of samples, not of pixels kept.
    means = [F.cross_entropy(o.double(), t, ignore_index=VOID) for o, t in case.batches()]
    kept = [(o, t) for (o, t), m in zip(case.batches(), means, strict=True) if not torch.isnan(m)]
    assert len(kept) < len(means)  # the all-void batch gives nan
    with pytest.warns(UserWarning, match=r"1 of 4 val batches gave a non-finite loss \(nan or inf\), so `val/loss` "
                                         r"is nan"):
        batch_mean = trainer().validate(OwnBatchMean(nn.Identity()), loader(case), verbose=False)[0]["val/loss"]
    assert batch_mean != batch_mean  # nan: a plain mean cannot skip an empty batch; LossTerms can


def test_a_set_with_every_target_ignored_logs_nan_and_says_why() -> None:
    x, y = segmentation()
    case = Case("void", lambda: nn.CrossEntropyLoss(ignore_index=VOID), x, torch.full_like(y, VOID), 4)
    with pytest.warns(UserWarning, match=r"`val/loss` is nan: the loss's weight summed to 0 over the 4 val batches "
                                         r"\(every target was `ignore_index`, or every class weight 0\)"):
        logged = trainer().validate(Passthrough(case.make()), loader(case), verbose=False)[0]["val/loss"]
    assert logged != logged


def test_a_criterion_not_seen_into_keeps_batch_size_weighting() -> None:
    class Doubled(nn.MSELoss):
        def forward(self, input: Tensor, target: Tensor) -> Tensor:
            return 2 * super().forward(input, target)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    case = Case("doubled", Doubled, x, t, 4)
    logged = trainer().validate(Passthrough(Doubled()), loader(case), verbose=False)[0]["val/loss"]
    assert logged == pytest.approx(case.reference(), abs=1e-6)  # a mean over samples: batch-size weighting is exact
