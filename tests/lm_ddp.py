"""A language model validated on 2 CPU processes: loss, perplexity and a text metric from greedy generation.

``run(strategy)`` validates ``GeneratingLM`` on the same data at batch sizes 1, 8 and 64, each twice: with the
criterion on the shifted logits, DistributedSampler's repeated sample cut after the forward (``update_metrics``), and
with the model's own loss (``LossMean``), the repeat cut before the forward (``real_batch``). Every step also
generates a few tokens greedily and scores them with torchmetrics' ``CharErrorRate``. 23 sequences of 4 to 16 tokens:
odd, so the second process repeats the first sample, and the processes score different numbers of tokens.

Run as a script for ``strategy="ddp"``, whose launcher starts the script again for the second process:
``python tests/lm_ddp.py ddp results.json`` writes rank 0's logged values.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from distributed_exit import DDPSpawn, ended_process_group
from lm_cases import IGNORE, BigramLM, decode, loader, sequences, with_answers
from torch import Tensor, nn
from torchmetrics.text import CharErrorRate

from lightning_validate import LossMean, ValidationMixin

N = 23
SIZES = (1, 8, 64)
PATHS = ("criterion", "model")  # per dataloader: 0-2 the criterion, 3-5 the model's own loss


class GeneratingLM(ValidationMixin, pl.LightningModule):
    """A causal LM whose ``validation_step`` also generates, and whose text metric reads what it generated."""

    log_perplexity = True

    def __init__(self) -> None:
        super().__init__()
        self.model = BigramLM()
        self.criterion = nn.CrossEntropyLoss()
        self.path = PATHS[0]

    def unpack_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "prompt": batch["prompt"]}
        return inputs, {"labels": batch["labels"], "answer": batch["answer"]}

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Any]:
        return self.model(inputs["input_ids"], labels=inputs["labels"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        self.path = PATHS[dataloader_idx // len(SIZES)]
        if self.path == "model":  # the model's own loss: leave the repeated sample out of the forward
            inputs, target = self.real_batch("val", batch, dataloader_idx)
        else:  # the mixin cuts the outputs (logits and generated tokens) after the forward
            inputs, target = self.unpack_batch(batch)
        outputs = self(inputs)
        outputs["generated"] = self.model.generate(inputs["prompt"])  # greedy, a few tokens
        return self.update_metrics("val", outputs, target, dataloader_idx)

    def compute_loss(self, outputs: dict[str, Any], target: dict[str, Tensor]) -> Tensor | LossMean:
        labels = target["labels"]
        if self.path == "model":
            return LossMean(outputs["loss"], (labels[:, 1:] != IGNORE).sum())
        return self.criterion(outputs["logits"][:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def configure_metrics(self) -> dict[str, Any]:
        return {"cer": CharErrorRate()}

    def metric_inputs(self, outputs: dict[str, Any], target: dict[str, Tensor]) -> tuple[list[str], list[str]]:
        return decode(outputs["generated"]), decode(target["answer"])  # text metrics take strings


def data() -> list[dict[str, Tensor]]:
    return with_answers(sequences(N), BigramLM())


def run(strategy: str) -> dict[str, float]:
    model = GeneratingLM()
    chosen = DDPSpawn() if strategy == "ddp_spawn" else strategy  # workers that end their process group
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=chosen, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    items = data()
    trainer.validate(model, [loader(items, size) for _ in PATHS for size in SIZES], verbose=False)
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    with ended_process_group():  # each rank, also on an error: no gloo thread left for interpreter shutdown
        logged = run(sys.argv[1])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        Path(sys.argv[2]).write_text(json.dumps(logged))
