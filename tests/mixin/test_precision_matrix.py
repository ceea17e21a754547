"""Attaching the package changes nothing but what is reported: every exact criterion x every CPU precision.

For each criterion that docs/losses.md lists as exact and each precision Lightning offers on a CPU, four fits of the
same model on the same data, from the same seed:

- a hand-written ``training_step`` that returns ``self.criterion(self(x), y)`` (the reference for the weights);
- ``ValidationMixin`` alone, with ``ModeCheck()``, and with ``ModeCheck(probe=True)``.

The model has a dropout, so a run that drew from the random number generator more or less often than another would
end with other weights. All four must end with the same weights (1e-6), the three mixin runs must log exactly the same
values, and ``val/loss`` (logged at the end of fit and by ``trainer.validate``) must be the criterion applied once to
the whole validation set in float64, on the outputs the trained model gives in that precision, within 1e-5.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from loss_cases import CASES, Case
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import ModeCheck, ValidationMixin

#: One criterion per path through the loss accounting: class indices with weights and ignore_index (pixels), label
#: smoothing, class probabilities, NLL, BCE with logits and pos_weight, a sum, a count from shapes, batchmean, the
#: criterion autocast leaves partly in bfloat16, and one holding parameters of its own.
NAMES = [
    "ce_segmentation_weight_ignore", "ce_weight_smoothing_imbalanced", "ce_probabilities_weight_smoothing",
    "nll_weight_ignore_a_class", "bce_with_logits_weight_pos_weight", "mse_sum", "l1", "kl_div_batchmean",
    "multilabel_soft_margin_weight", "multi_margin_weight_p2", "linear_cross_entropy_weight_ignore",
]
MATRIX = [c for c in CASES if c.name in NAMES]
PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true"]
if torch.cuda.is_available():
    PRECISIONS.append("16-mixed")


class Net(pl.LightningModule):
    """Outputs = inputs * scale + dropout(shift): the case's outputs reach the criterion, and training moves them."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.criterion = case.make()
        self.scale = nn.Parameter(torch.ones(()))
        self.shift = nn.Parameter(torch.zeros(case.outputs.shape[1:]))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.dropout(self.shift)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ByHand(Net):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss: Tensor = self.criterion(self(x), y)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


class Mixin(ValidationMixin, Net):
    def configure_metrics(self) -> dict[str, Any]:
        return {}


def loaders(case: Case) -> tuple[DataLoader, DataLoader]:
    data = TensorDataset(case.outputs, case.target)
    return DataLoader(data, batch_size=case.batch_size), DataLoader(data, batch_size=case.batch_size)


def fit(cls: type[Net], case: Case, precision: str, callbacks: list[pl.Callback]) -> tuple[Net, dict[str, float]]:
    torch.manual_seed(0)
    model = cls(case)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=2, precision=precision, logger=False,  # type: ignore[arg-type]
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         callbacks=callbacks, num_sanity_val_steps=2)
    train, val = loaders(case)
    trainer.fit(model, train, val)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if isinstance(model, Mixin):
        validated = trainer.validate(model, val, verbose=False)[0]
        logged.update({f"validate:{k}": v for k, v in validated.items()})
    return model, logged


def reference(model: Net, case: Case, precision: str) -> float:
    """The criterion on the whole validation set in float64, on the trained model's outputs in that precision."""
    _, val = loaders(case)
    trainer = pl.Trainer(accelerator="auto", devices=1, precision=precision, logger=False,  # type: ignore[arg-type]
                         enable_progress_bar=False, enable_model_summary=False)
    plugin = trainer.strategy.precision_plugin
    outputs, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch in val:
            x, y = plugin.convert_input([t.to(model.device) for t in batch])  # bf16-true converts float targets too
            with plugin.forward_context():
                outputs.append(model(x).detach())
            targets.append(y)
    model.train()
    criterion = copy.deepcopy(model.criterion).double()
    target = torch.cat(targets)
    with torch.no_grad():
        return float(criterion(torch.cat(outputs).double(), target.double() if target.is_floating_point() else target))


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().double().cpu() for k, v in model.state_dict().items()}


def supported(case: Case, precision: str) -> None:
    criterion = case.make()
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}.get(precision)
    x, y = case.outputs[:2], case.target[:2]
    if dtype is not None:
        criterion, x = criterion.to(dtype), x.to(dtype)
        y = y.to(dtype) if y.is_floating_point() else y
    try:
        criterion(x, y)
    except (NotImplementedError, RuntimeError) as err:
        pytest.skip(f"the criterion itself fails in {precision} on the CPU: {err}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", MATRIX, ids=[c.name for c in MATRIX])
def test_the_mixin_and_mode_check_change_nothing_but_what_is_reported(case: Case, precision: str) -> None:
    supported(case, precision)
    by_hand, _ = fit(ByHand, case, precision, [])
    runs = {
        "mixin": fit(Mixin, case, precision, []),
        "mixin + ModeCheck()": fit(Mixin, case, precision, [ModeCheck(verbose=False, on_violation="raise")]),
        "mixin + ModeCheck(probe=True)": fit(Mixin, case, precision,
                                             [ModeCheck(probe=True, verbose=False, on_violation="raise")]),
    }
    expected = weights(by_hand)
    for name, (model, _) in runs.items():
        got = weights(model)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=f"{name}: weight {key}")
    logged = {name: values for name, (_, values) in runs.items()}
    assert logged["mixin + ModeCheck()"] == logged["mixin"]
    assert logged["mixin + ModeCheck(probe=True)"] == logged["mixin"]
    ref = reference(runs["mixin"][0], case, precision)
    assert logged["mixin"]["val/loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert logged["mixin"]["validate:val/loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 5.0])),
                                       nn.NLLLoss(weight=torch.tensor([0.2, 1.0, 5.0]))], ids=["ce", "nll"])
def test_class_weights_under_bf16_mixed_train_with_the_criterions_float32_loss(criterion: nn.Module) -> None:
    """0.2 computed the loss in bfloat16 under autocast and crashed here ("expected scalar type BFloat16")."""

    class Weighted(ValidationMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)
            self.criterion = criterion
            self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []

        def forward(self, x: Tensor) -> Tensor:
            out = self.net(x)
            return out.log_softmax(1) if isinstance(self.criterion, nn.NLLLoss) else out

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            self.dtypes.append((loss.dtype, self.criterion(self(batch[0]), batch[1]).dtype))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)),
                      batch_size=8)
    model = Weighted()
    pl.Trainer(accelerator="cpu", max_epochs=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
               enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0).fit(model, data, data)
    assert model.dtypes == [(torch.float32, torch.float32)] * 3


def test_a_transformers_classifier_with_class_weights_logs_the_same_loss_with_the_probe() -> None:
    transformers = pytest.importorskip("transformers")

    class Classifier(ValidationMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=16, num_labels=3)
            self.bert = transformers.BertForSequenceClassification(config)
            self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 3.0]))

        def forward(self, input_ids: Tensor) -> Tensor:
            logits: Tensor = self.bert(input_ids=input_ids).logits
            return logits

        def configure_metrics(self) -> dict[str, Any]:
            return {}

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 50, (27, 8), generator=g), torch.randint(0, 3, (27,), generator=g)
    data = DataLoader(TensorDataset(ids, labels), batch_size=8)
    logged = []
    for callbacks in ([], [ModeCheck(probe=True, verbose=False, on_violation="raise")]):
        model = Classifier()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks)
        logged.append(trainer.validate(model, data, verbose=False)[0]["val/loss"])
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data]).double()
    reference = float(nn.CrossEntropyLoss(weight=model.criterion.weight.double())(logits, labels))
    assert logged[1] == logged[0] == pytest.approx(reference, rel=1e-6)
