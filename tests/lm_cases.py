"""Language-model data, a tiny model and float64 references for the token-exact loss tests.

The data is what makes a batch mean depend on the batch size: sequences of 4 to 16 tokens, padded per batch to the
longest one, with ``-100`` labels on the padding, so the number of scored tokens varies from batch to batch. The
model is a bigram LM (an embedding and a linear head: the logits at position ``t`` depend on token ``t`` alone, so
neither the padding nor the batch composition changes them); like a Hugging Face model it computes its own loss in
``forward`` when given ``labels`` (the causal shift: position ``t`` predicts token ``t + 1``), and it generates
greedily from a fixed-length prompt. The references are plain float64 loops over the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_validate import LossMean, ValidationMixin

VOCAB = 40
PAD = 0
IGNORE = -100
PROMPT = 3  # tokens every generation starts from
NEW = 3  # tokens generated


class BigramLM(nn.Module):
    """``logits[b, t] = head(embed(ids[b, t]))``; with ``labels``, also its own mean loss over the shifted labels."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        logits = self.head(self.embed(input_ids))
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:  # as Hugging Face's causal LMs: shift, ignore -100, mean over the tokens scored
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return out

    @torch.no_grad()
    def generate(self, prompt: Tensor, new: int = NEW) -> Tensor:
        """Greedy decoding of ``new`` tokens after ``prompt`` (B, P): the generated tokens only, (B, new)."""
        ids = prompt
        for _ in range(new):
            ids = torch.cat([ids, self(ids)["logits"][:, -1].argmax(-1, keepdim=True)], 1)
        return ids[:, prompt.shape[1]:]


def sequences(n: int, seed: int = 0, low: int = 4, high: int = 16) -> list[Tensor]:
    """``n`` token sequences of ``low`` to ``high`` tokens (ids 1..VOCAB-1; 0 is the padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (length,), generator=g) for length in lengths]


def with_answers(seqs: Sequence[Tensor], model: BigramLM) -> list[dict[str, Tensor]]:
    """Each sequence with an answer to its prompt: the model's own greedy continuation for even samples (all
    right), random tokens for odd ones (mostly wrong), so that counting a sample twice changes the error rate."""
    g = torch.Generator().manual_seed(1)
    items = []
    for i, seq in enumerate(seqs):
        answer = model.generate(seq[None, :PROMPT])[0] if i % 2 == 0 else torch.randint(1, VOCAB, (NEW,), generator=g)
        items.append({"ids": seq, "answer": answer})
    return items


def collate(items: Sequence[Tensor | dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad to the longest sequence of the batch: ``input_ids`` with 0, ``labels`` with -100 (items: sequences, or
    ``with_answers``' dicts)."""
    seqs = [item["ids"] if isinstance(item, dict) else item for item in items]
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)
    labels = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=IGNORE)
    batch = {"input_ids": ids, "labels": labels, "prompt": torch.stack([s[:PROMPT] for s in seqs])}
    if isinstance(items[0], dict):
        batch["answer"] = torch.stack([item["answer"] for item in items if isinstance(item, dict)])
    return batch


def loader(items: Sequence[Any], batch_size: int) -> DataLoader:
    return DataLoader(list(items), batch_size=batch_size, collate_fn=collate)


def decode(ids: Tensor) -> list[str]:
    """Token ids as characters (``0`` is ``'0'``), one string per row, for the text metrics."""
    return ["".join(chr(48 + t) for t in row) for row in ids.tolist()]


# --------------------------------------------------------------------------------------------------------------
# References: plain float64 loops


def token_nll(logits: Tensor, labels: Tensor, shift: bool = True) -> tuple[float, int]:
    """The sum of the token losses of a batch in float64, and the number of tokens scored."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    kept = labels != IGNORE
    logp = logits.double().log_softmax(-1)
    picked = logp.gather(-1, labels.masked_fill(~kept, 0)[..., None])[..., 0]
    return float(-(picked * kept).sum()), int(kept.sum())


def token_mean(batches: Sequence[tuple[Tensor, Tensor]], shift: bool = True) -> float:
    """The float64 mean over every token scored in ``(logits, labels)`` batches: the loss of the whole set."""
    total, count = 0.0, 0
    for logits, labels in batches:
        s, c = token_nll(logits, labels, shift)
        total, count = total + s, count + c
    return total / count


def batch_means(batches: Sequence[tuple[Tensor, Tensor]], shift: bool = True) -> tuple[float, float]:
    """What averaging batch means logs: the token mean of each batch weighted by its number of samples (the usual
    ``self.log(..., batch_size=len(batch))``, Hugging Face's ``eval_loss``), and the mean of batch perplexities."""
    means = [token_nll(logits, labels, shift) for logits, labels in batches]
    sizes = [len(labels) for _, labels in batches]
    weighted = sum(s / c * n for (s, c), n in zip(means, sizes, strict=True)) / sum(sizes)
    ppl = sum(float(torch.tensor(s / c).exp()) for s, c in means) / len(means)
    return weighted, ppl


def whole_set(model: BigramLM, seqs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Each sequence alone (no padding), through the model: ``(logits, labels)`` batches of one."""
    with torch.no_grad():
        return [(model(s[None])["logits"], s[None]) for s in seqs]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, the plain dynamic programme."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_error_rate(pairs: Sequence[tuple[str, str]]) -> float:
    """Edits over reference characters, summed over the whole set: ``(prediction, reference)`` pairs."""
    return sum(edit_distance(p, r) for p, r in pairs) / sum(len(r) for _, r in pairs)


# --------------------------------------------------------------------------------------------------------------
# The LightningModule, as language-model users write it


class LitLM(ValidationMixin, pl.LightningModule):
    """The bigram LM with the loss written one of the ways users write it (``loss``), and ``val/ppl``.

    - ``"shift"``: ``self.criterion(outputs[:, :-1].flatten(0, 1), target[:, 1:].flatten())``;
    - ``"flatten"``: ``self.criterion(outputs.flatten(0, 1), target.flatten())`` (targets already aligned);
    - ``"functional"``: ``F.cross_entropy(...)`` on the shifted, reshaped logits, no criterion;
    - ``"model"``: the model's own loss, ``LossMean(outputs["loss"], tokens scored)``.

    ``seen`` keeps each evaluation batch's logits and labels as the loss saw them, for the references.
    """

    log_perplexity = True

    def __init__(self, loss: str = "shift", lr: float = 0.0) -> None:
        super().__init__()
        self.model = BigramLM()
        self.criterion = nn.CrossEntropyLoss()
        self.loss = loss
        self.lr = lr
        self.seen: list[tuple[Tensor, Tensor]] = []
        self.step_losses: list[tuple[Tensor, Tensor]] = []  # (what compute_loss returned, what the step returned)

    def unpack_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}, batch["labels"]

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Any]:
        return self.model(**inputs)

    @property
    def shift(self) -> bool:
        return self.loss != "flatten"

    def compute_loss(self, outputs: dict[str, Any], target: Tensor) -> Any:
        logits = outputs["logits"]
        if not self.training:
            self.seen.append((logits.detach().float(), target))
        if self.loss == "shift":
            value = self.criterion(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten())
        elif self.loss == "flatten":
            value = self.criterion(logits.flatten(0, 1), target.flatten())
        elif self.loss == "functional":
            value = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), target[:, 1:].reshape(-1),
                                    ignore_index=IGNORE)
        else:
            value = LossMean(outputs["loss"], (target[:, 1:] != IGNORE).sum())
        self._returned = value.mean if isinstance(value, LossMean) else value
        return value

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append((self._returned, loss))
        return loss

    def configure_metrics(self) -> dict[str, Any]:
        return {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
