"""``ModeCheck(probe=True)`` only looks: its runs of the first batch leave buffers, metric states and losses alone.

The probe re-runs the first evaluation batch through the model and its direct children. A forward in eval mode can
still change state (fake-quant observers, caches, counters, a torchmetrics object updated in ``forward``): the probe
puts all of it back, and it never hooks or runs a loss module, whose calls the mixin's loss accounting reads.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from lightning_validate import ModeCheck, ModeCheckError, ValidationMixin


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)),
                      batch_size=8)


class Counting(nn.Module):
    """A layer whose forward updates state in eval mode too, as an observer or a cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen_max", torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.seen_max.copy_(torch.maximum(self.seen_max, x.abs().amax(0)))
        return self.fc(x)


class Model(ValidationMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = Counting()
        self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 4.0]))
        self.outputs_mean = MeanMetric()  # a metric the forward updates itself
        self.hooked_criterion_seen = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        self.outputs_mean.update(out.mean())
        return out

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        self.hooked_criterion_seen |= bool(self.criterion._forward_pre_hooks or self.criterion._forward_hooks)
        return super().validation_step(batch, batch_idx, dataloader_idx)

    def configure_metrics(self) -> dict[str, Any]:
        return {}


def validate(probe: bool | None) -> tuple[Model, dict[str, float], Tensor]:
    model = Model()
    callbacks = [] if probe is None else [ModeCheck(probe=probe, verbose=False, ignore=["LV202"])]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    torch.manual_seed(1)
    logged = trainer.validate(model, loader(), verbose=False)[0]
    return model, logged, torch.rand(4)  # what the user's code draws next


@pytest.mark.parametrize("probe", [False, True])
def test_the_probe_leaves_buffers_metric_states_losses_and_random_numbers_as_without_it(probe: bool) -> None:
    plain, plain_logged, plain_next = validate(None)
    checked, logged, after = validate(probe)
    assert logged == plain_logged
    assert torch.equal(after, plain_next)
    assert int(checked.layer.calls) == int(plain.layer.calls) == 3  # one call per batch: the probe's runs undone
    assert torch.equal(checked.layer.seen_max, plain.layer.seen_max)
    assert checked.outputs_mean.update_count == plain.outputs_mean.update_count == 3
    torch.testing.assert_close(checked.outputs_mean.compute(), plain.outputs_mean.compute(), rtol=0, atol=0)
    assert not checked.hooked_criterion_seen  # the loss module was never hooked


def test_the_probe_still_finds_randomness_in_a_model_whose_forward_changes_state() -> None:
    class Noisy(Model):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(torch.nn.functional.dropout(x, 0.5, training=True))

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[ModeCheck(probe=True, on_violation="raise", ignore=["LV202"])])
    with pytest.raises(ModeCheckError, match=r"LV103 non-deterministic forward in eval mode: `<model>`"):
        trainer.validate(Noisy(), loader(), verbose=False)
