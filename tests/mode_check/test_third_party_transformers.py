"""ModeCheck on Hugging Face models (issue 20): Llama, GPT-2, BERT and T5 from tiny configs, random weights.

Nothing is downloaded: each model is built from a config (hidden size 32, 2 layers, a vocabulary of 100). Each runs
through ``fit`` (with the sanity check) and ``validate`` under ``ModeCheck(probe=True)``, with dropout on in training.
Real bugs in such models are still caught: attention that keeps its dropout in eval mode is LV103.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_transformers import VOCAB, bert, gpt2, llama, t5
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import ModeCheck, ModeCheckError

MODELS: dict[str, Callable[[], nn.Module]] = {"llama": llama, "gpt2": gpt2, "bert": bert, "t5": t5}


class LitHF(pl.LightningModule):
    """A Hugging Face model trained on its own loss: language modelling, classification or sequence to sequence."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.name = name
        self.model = MODELS[name]()
        self.generated: list[tuple[int, ...]] = []

    def loss(self, batch: Any) -> torch.Tensor:
        ids, label = batch
        if self.name == "bert":
            return self.model(input_ids=ids, labels=label).loss
        if self.name == "t5":
            return self.model(input_ids=ids, labels=ids.flip(1)).loss
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Generates(LitHF):
    """Validation that only generates: the model's first call of each evaluation carries a key-value cache."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.model.generate(batch[0][:, :4], max_new_tokens=3, do_sample=False)
        self.generated.append(tuple(out.shape))


def loader(length: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(3, VOCAB, (8, length), generator=g), torch.randint(0, 3, (8,), generator=g)
    return DataLoader(TensorDataset(ids, labels), batch_size=4)


def run(model: LitHF, check: ModeCheck, precision: str = "32-true") -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        callbacks=[check], precision=precision)  # type: ignore[arg-type]
    trainer.fit(model, loader(10, 0), loader(12, 1))
    trainer.validate(model, loader(12, 1), verbose=False)


def probes(report: Path) -> int:
    return int(json.loads(report.read_text())["boundaries_checked"].get("probe", 0))


@pytest.mark.parametrize(("name", "precision"), [
    *((name, "32-true") for name in MODELS),
    *((name, precision) for name in ("llama", "gpt2") for precision in ("bf16-mixed", "bf16-true")),
])
def test_fit_and_validate_are_clean(name: str, precision: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    check = ModeCheck(on_violation="raise", probe=True, report_path=report, verbose=False)
    run(LitHF(name), check, precision)
    assert check.findings == []
    assert probes(report) == 1  # the latest run (validate) probed its first batch


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_validation_that_calls_generate_is_clean(name: str, tmp_path: Path) -> None:
    """At 9ed4be6: LV103 with the probe, which ran the recorded call twice on one growing key-value cache."""
    report = tmp_path / "report.json"
    model = Generates(name)
    check = ModeCheck(on_violation="raise", probe=True, report_path=report, verbose=False)
    run(model, check)
    assert check.findings == []
    assert probes(report) == 1
    length = 1 + 3 if name == "t5" else 4 + 3  # the decoder's start token, or the 4 prompt tokens, and 3 new ones
    assert model.generated and set(model.generated) == {(4, length)}
    assert model.model.generation_config.use_cache  # each step reads the keys and values cached by the previous ones


def _dropout_in_eval_mode(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The bug: the module's dropout rate, whatever the mode (the model passes ``dropout=0.0`` in eval mode)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=module.attention_dropout, scale=scaling,
                                         is_causal=attention_mask is None, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def test_attention_dropout_that_ignores_the_mode_is_lv103_with_the_probe() -> None:
    transformers.AttentionInterface.register("lightning_validate_test_dropout_in_eval", _dropout_in_eval_mode)
    model = LitHF("llama")
    model.model.set_attn_implementation("lightning_validate_test_dropout_in_eval")
    with pytest.raises(ModeCheckError, match=r"LV103 non-deterministic forward in eval mode: `model` at "
                                             r"sanity_check/on_validation_batch_end \(probe\): .*outputs differ .*Fix: "
                                             r".*`F.scaled_dot_product_attention\(\.\.\., dropout_p=p if "
                                             r"self.training else 0.0\)` in attention"):
        run(model, ModeCheck(on_violation="raise", probe=True, verbose=False))
    # The same model with the library's attention is clean: the finding is the bug, not the model.
    model.model.set_attn_implementation("sdpa")
    check = ModeCheck(on_violation="raise", probe=True, verbose=False)
    run(model, check)
    assert check.findings == []
