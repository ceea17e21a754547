"""Train a tiny character-level causal language model on Python's own source and validate it exactly.

The text is the standard library's source code, which every Python installation has (no download): lines of 24 to
64 characters, padded per batch with ``-100`` labels, so each batch scores a different number of characters. The
model is a 2-layer causal Transformer. The run shows:

- ``compute_loss`` written as language-model code is written (``self.criterion`` on the shifted, flattened logits,
  ``nn.CrossEntropyLoss()``) and logged exactly: ``val/loss`` is the mean over every character of the validation set
  at batch size 1, 8 and 64, and ``val/ppl`` its ``exp``;
- next to it, what the usual ``self.log("val/loss", loss, batch_size=len(batch))`` logs, averaging batch means
  weighted by the batch size (and the mean of batch perplexities): it moves with the batch size;
- generation in ``validation_step``: each line's first 16 characters are continued greedily by 8, scored with
  torchmetrics' ``CharErrorRate`` against the real continuation.

Run: ``python examples/language_model.py`` (about a minute on a 2-core CPU), ``--help`` for options.
"""

from __future__ import annotations

import argparse
import logging
import math
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.text import CharErrorRate

from lightning_validate import ValidationMixin

PAD = 0
IGNORE = -100
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII; anything else reads as "?"
VOCAB = 1 + len(CHARS)  # 0 is the padding
MIN_LEN, MAX_LEN = 24, 64
PROMPT, NEW = 16, 8  # generation: continue the first 16 characters of a line by 8
SIZES = (1, 8, 64)


def encode(line: str) -> Tensor:
    return torch.tensor([1 + CHARS.index(c) if c in CHARS else 1 + CHARS.index("?") for c in line])


def decode(ids: Tensor) -> list[str]:
    return ["".join(CHARS[i - 1] if 0 < i <= len(CHARS) else "" for i in row) for row in ids.tolist()]


def source_lines(every: int, offset: int, limit: int) -> list[Tensor]:
    """Lines of 24 to 64 characters from the standard library's modules ``offset, offset + every, ...``."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[offset::every]
    lines: list[Tensor] = []
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip().replace("\t", " ")
            if MIN_LEN <= len(line) <= MAX_LEN:
                lines.append(encode(line))
                if len(lines) == limit:
                    return lines
    return lines


def collate(lines: list[Tensor]) -> dict[str, Tensor]:
    pad = nn.utils.rnn.pad_sequence
    return {"input_ids": pad(lines, batch_first=True, padding_value=PAD),
            "labels": pad(lines, batch_first=True, padding_value=IGNORE)}


class CharTransformer(nn.Module):
    """Embeddings, 2 causal Transformer layers, a linear head: logits ``(batch, length, VOCAB)``."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(MAX_LEN, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.head(self.layers(x, mask=mask, is_causal=True))


class LitCharLM(ValidationMixin, pl.LightningModule):
    """The LM as users write it; the mixin makes ``val/loss`` and ``val/ppl`` token-exact without any change."""

    log_perplexity = True  # also val/ppl: exp of the exact loss
    log_train_metrics = False  # the text metric needs generation, done in validation only

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = CharTransformer()
        self.criterion = nn.CrossEntropyLoss()  # ignore_index=-100: the padding
        self.lr = lr

    def unpack_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["input_ids"], batch["labels"]

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model(ids)}

    def compute_loss(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        # Position t predicts character t + 1: the usual causal shift, flattened for the criterion.
        return self.criterion(outputs["logits"][:, :-1].flatten(0, 1), target[:, 1:].flatten())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        ids, labels = self.real_batch("val", batch, dataloader_idx)  # under DDP: the repeated samples left out
        outputs = self(ids)
        outputs["generated"] = self.generate(ids[:, :PROMPT], NEW)
        loss = self.update_metrics("val", outputs, labels, dataloader_idx)
        if loss is not None:  # the usual idiom, for comparison: batch means averaged by batch size
            self.log("naive/loss", loss, batch_size=len(labels))
            self.log("naive/ppl", loss.exp(), batch_size=len(labels))
        return loss

    @torch.no_grad()
    def generate(self, prompt: Tensor, new: int) -> Tensor:
        """Greedy decoding: ``new`` characters after ``prompt``, one forward each (no cache: the model is tiny)."""
        ids = prompt
        for _ in range(new):
            ids = torch.cat([ids, self.model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        return ids[:, prompt.shape[1]:]

    def configure_metrics(self) -> dict[str, Any]:
        return {"cer": CharErrorRate()}

    def metric_inputs(self, outputs: dict[str, Tensor], target: Tensor) -> tuple[list[str], list[str]]:
        real = target[:, PROMPT:PROMPT + NEW].clamp(min=0)  # the line's own next 8 characters (all real: >= 24)
        return decode(outputs["generated"]), decode(real)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_mean(model: LitCharLM, lines: list[Tensor]) -> float:
    """The plain float64 loop: every line alone, every scored character's loss, one division at the end."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for line in lines:
            logits = model.model(line[None, :-1]).double()
            total += float(nn.functional.cross_entropy(logits[0], line[1:], reduction="sum"))
            count += len(line) - 1
    return total / count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=1000, help="training steps (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="training lines per batch (default: 32)")
    parser.add_argument("--val-lines", type=int, default=256, help="validation lines (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1; the model's "
                        "matrices are so small that more threads cost more in synchronization than they save)")
    parser.add_argument("--fast", action="store_true", help="a few seconds' smoke run, for tests")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    steps, val_lines = (20, 41) if args.fast else (args.max_steps, args.val_lines)
    # Lightning's advice for large data sets; these lines fit in memory, worker processes would only add start-up.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about your model.
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
    # Validation runs after training, at three batch sizes, not during `fit`.
    warnings.filterwarnings("ignore", ".*have no `val_dataloader`.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(args.threads)

    # Disjoint modules: odd-numbered ones to train on, every tenth of the even ones to validate on.
    train = source_lines(every=2, offset=1, limit=steps * args.batch_size)
    val = source_lines(every=10, offset=0, limit=val_lines)
    model = LitCharLM()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=not args.no_progress_bar)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate))
    trainer.validate(model, [DataLoader(val, batch_size=size, collate_fn=collate) for size in SIZES], verbose=False)
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    reference = token_mean(model, val)

    print(f"\n{len(train)} training lines, {steps} steps; {len(val)} validation lines, "
          f"{sum(len(line) - 1 for line in val)} characters scored")
    print(f"{'batch size':>10}  {'val/loss':>9}  {'val/ppl':>8}  {'val/cer':>7}  |  "
          f"{'mean of batch means':>19}  {'mean of batch ppl':>17}")
    for i, size in enumerate(SIZES):
        suffix = f"/dataloader_idx_{i}"
        print(f"{size:>10}  {logged['val/loss' + suffix]:>9.6f}  {logged['val/ppl' + suffix]:>8.4f}  "
              f"{logged['val/cer' + suffix]:>7.4f}  |  {logged['naive/loss' + suffix]:>19.6f}  "
              f"{logged['naive/ppl' + suffix]:>17.4f}")
    print(f"token mean over the set (a plain float64 loop): {reference:.6f}, perplexity {math.exp(reference):.4f}")
    return {**logged, "reference": reference}


if __name__ == "__main__":
    main()
