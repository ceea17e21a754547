"""Hugging Face language models through the mixin: Llama, GPT-2, BERT (masked LM) and T5, from tiny configs.

Each is trained for two steps on its own loss (the step's loss is the model's loss tensor itself) and validated at
batch sizes 1, 8 and 64 two ways: the criterion on the logits (shifted for the causal models), and the model's
``outputs.loss`` through ``LossMean``. Every value is the float64 mean over the tokens scored in the whole set,
from a plain loop over the same batches; ``val/ppl`` is its ``exp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lm_cases import IGNORE, token_nll
from tiny_transformers import VOCAB, bert_mlm, gpt2, llama, t5
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_validate import LossMean, ValidationMixin

SIZES = (1, 8, 64)
PATHS = ("criterion", "model")  # one dataloader per path and batch size
MASK = 3  # BERT's [MASK] here
BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": llama, "gpt2": gpt2, "bert": bert_mlm, "t5": t5}
CAUSAL = {"llama", "gpt2"}


def examples(name: str, n: int = 11, seed: int = 0) -> list[dict[str, Tensor]]:
    """Variable-length examples: causal LM text, masked text (15% of tokens, at least one), or source and target."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(4, VOCAB, (length,), generator=g)
        if name in CAUSAL:
            items.append({"input_ids": ids, "labels": ids})
        elif name == "bert":
            masked = torch.rand(length, generator=g) < 0.15
            masked[int(torch.randint(0, length, (1,), generator=g))] = True
            items.append({"input_ids": ids.masked_fill(masked, MASK), "labels": ids.masked_fill(~masked, IGNORE)})
        else:
            target = torch.randint(4, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
            items.append({"input_ids": ids, "labels": target})
    return items


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    pad = nn.utils.rnn.pad_sequence
    ids = [item["input_ids"] for item in items]
    return {
        "input_ids": pad(ids, batch_first=True, padding_value=0),
        "attention_mask": pad([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        "labels": pad([item["labels"] for item in items], batch_first=True, padding_value=IGNORE),
    }


def loader(items: list[dict[str, Tensor]], batch_size: int) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, collate_fn=collate)


class LitHF(ValidationMixin, pl.LightningModule):
    """A Hugging Face model as users write it: ``forward(batch) = self.model(**batch)``, labels with -100."""

    log_perplexity = True

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = BUILDERS[name]()
        self.criterion = nn.CrossEntropyLoss()
        self.shift = name in CAUSAL
        self.path = "model"  # training: the model's own loss; validation: by dataloader
        self.identical: list[bool] = []

    def unpack_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return batch, batch["labels"]

    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(**batch)

    def compute_loss(self, outputs: Any, target: Tensor) -> Tensor | LossMean:
        scored = target[:, 1:] if self.shift else target
        if self.path == "model":  # the one line: the model's mean and the number of tokens it averaged
            return LossMean(outputs.loss, (scored != IGNORE).sum())
        logits = outputs.logits[:, :-1] if self.shift else outputs.logits
        return self.criterion(logits.flatten(0, 1), scored.flatten())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.path = "model"
        outputs = self(batch)
        loss = self.update_metrics("train", outputs, batch["labels"])
        self.identical.append(loss is outputs.loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        self.path = PATHS[dataloader_idx // len(SIZES)]
        return super().validation_step(batch, batch_idx, dataloader_idx)

    def configure_metrics(self) -> dict[str, Any]:
        return {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def reference(model: LitHF, items: list[dict[str, Tensor]], batch_size: int) -> float:
    """The plain loop: the same batches, every token's loss in float64, one division at the end."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader(items, batch_size):
            s, c = token_nll(model(batch).logits, batch["labels"], shift=model.shift)
            total, count = total + s, count + c
    return total / count


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trained_and_validated_with_the_token_mean(name: str) -> None:
    items = examples(name)
    model = LitHF(name)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    trainer.fit(model, loader(items, 4), [loader(items, 64)])
    assert model.identical == [True, True]  # the step's loss is the model's loss tensor
    trainer.validate(model, [loader(items, size) for _ in PATHS for size in SIZES], verbose=False)
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    refs = [reference(model, items, size) for size in SIZES]
    assert max(refs) - min(refs) < 1e-5  # the set's token mean; padding changes the logits by rounding only
    for i in range(len(PATHS) * len(SIZES)):
        ref = refs[i % len(SIZES)]
        assert logged[f"val/loss/dataloader_idx_{i}"] == pytest.approx(ref, abs=1e-6), (name, i)
        assert logged[f"val/ppl/dataloader_idx_{i}"] == pytest.approx(math.exp(ref), rel=1e-6), (name, i)
