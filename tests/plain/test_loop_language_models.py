"""``validate()`` on a language model: ``loss`` and ``ppl`` are the token mean of the set at any batch size.

Sequences padded per batch with ``-100`` (``lm_cases``); the criterion is a callable that shifts and flattens before
calling torch's loss, or the model's own loss through ``LossMean``. The reference is the float64 mean over every
token of the set (at 9ed4be6 the callable was weighted by the batch size: 1e-3 off at batch size 8).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lm_cases import IGNORE, VOCAB, BigramLM, loader, sequences, token_mean, whole_set
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import LossMean, validate

SIZES = (1, 8, 64)
N = 67


def step(batch: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Any], Tensor]:
    return model(batch["input_ids"], labels=batch["labels"]), batch["labels"]


def shifted(outputs: dict[str, Any], labels: Tensor) -> Tensor:
    logits = outputs["logits"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def model_loss(outputs: dict[str, Any], labels: Tensor) -> LossMean:
    return LossMean(outputs["loss"], (labels[:, 1:] != IGNORE).sum())


@pytest.mark.parametrize("criterion", [shifted, model_loss], ids=["shifted_call", "model_loss"])
def test_loss_and_ppl_are_the_token_mean_at_batch_sizes_1_8_64(criterion: Any) -> None:
    seqs, model = sequences(N), BigramLM()
    reference = token_mean(whole_set(model, seqs))
    for size in SIZES:
        result = validate(model, loader(seqs, size), criterion=criterion, step=step, perplexity=True, progress=False)
        assert list(result) == ["loss", "ppl"]
        assert result["loss"] == pytest.approx(reference, abs=1e-6), size
        assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-6), size


def test_token_accuracy_through_metric_inputs_and_the_results_order() -> None:
    seqs, model = sequences(N), BigramLM()
    correct = scored = 0
    for logits, labels in whole_set(model, seqs):
        correct += int((logits[0, :-1].argmax(-1) == labels[0, 1:]).sum())
        scored += labels.shape[1] - 1
    result = validate(model, loader(seqs, 8), criterion=shifted, step=step, perplexity=True, progress=False,
                      metrics={"acc": MulticlassAccuracy(VOCAB, average="micro", ignore_index=IGNORE)},
                      metric_inputs=lambda out, y: (out["logits"][:, :-1].flatten(0, 1), y[:, 1:].flatten()))
    assert list(result) == ["loss", "ppl", "acc"]
    assert result["acc"] == pytest.approx(correct / scored, abs=1e-7)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(perplexity=True, criterion=None, metrics={"acc": MulticlassAccuracy(VOCAB)}), ValueError,
     r"Expected a mean `criterion` with `perplexity=True` \(perplexity is `exp` of the mean token loss\) but got "
     r"no `criterion`"),
    (dict(perplexity=True, criterion=nn.CrossEntropyLoss(reduction="sum")), ValueError,
     r"but got a `criterion` with `reduction='sum'`\. Pass e\.g\. `validate\(model, loader, "
     r"criterion=nn\.CrossEntropyLoss\(\), perplexity=True\)`"),
    (dict(perplexity=True, criterion=nn.CrossEntropyLoss(), metrics={"ppl": MulticlassAccuracy(VOCAB)}), ValueError,
     r"Expected metric names other than 'ppl' with `perplexity=True`"),
    (dict(perplexity=1, criterion=nn.CrossEntropyLoss()), TypeError,
     r"Expected argument `perplexity` to be True or False but got 1\."),
])
def test_perplexity_argument_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        validate(BigramLM(), loader(sequences(4), 2), progress=False, **kwargs)


def test_a_batch_with_every_token_ignored_adds_nothing() -> None:
    seqs, model = sequences(9), BigramLM()
    seqs[4:6] = [s[:1] for s in seqs[4:6]]  # one token each: nothing to predict after the shift
    result = validate(model, loader(seqs, 2), criterion=shifted, step=step, perplexity=True, progress=False)
    assert result["loss"] == pytest.approx(token_mean(whole_set(model, seqs)), abs=1e-6)
    assert torch.isfinite(torch.tensor(result["ppl"]))
