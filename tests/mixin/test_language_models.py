"""Language models through the mixin: ``val/loss`` and ``val/ppl`` are the token mean of the set at any batch size.

The loss written the ways users write it (``lm_cases.LitLM``: the criterion on shifted or flattened logits,
``F.cross_entropy``, the model's own loss through ``LossMean``) on sequences padded per batch with ``-100``, so each
batch scores a different number of tokens. One ``validate`` with the same data at batch sizes 1, 8 and 64 (three
dataloaders) must log one value, the float64 mean over every token of the set; averaging batch means would not
(at 9ed4be6 the criterion forms logged 1e-3 apart).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
from lm_cases import IGNORE, VOCAB, LitLM, batch_means, loader, sequences, token_mean, whole_set
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import LossMean, ModeCheck

SIZES = (1, 8, 64)
N = 67  # odd, and no batch size divides it: every loader ends on a short batch


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                    enable_checkpointing=False, enable_model_summary=False,
                                    enable_progress_bar=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def logged_per_size(trainer: pl.Trainer, name: str) -> list[float]:
    return [trainer.callback_metrics[f"val/{name}/dataloader_idx_{i}"].item() for i in range(len(SIZES))]


@pytest.mark.parametrize("loss", ["shift", "flatten", "functional", "model"])
def test_val_loss_and_ppl_are_the_token_mean_at_batch_sizes_1_8_64(loss: str) -> None:
    seqs = sequences(N)
    model = LitLM(loss)
    tr = trainer()
    tr.validate(model, [loader(seqs, size) for size in SIZES], verbose=False)
    reference = token_mean(whole_set(model.model, seqs), shift=model.shift)
    losses, ppls = logged_per_size(tr, "loss"), logged_per_size(tr, "ppl")
    assert max(losses) - min(losses) < 1e-6
    assert losses == pytest.approx([reference] * 3, abs=1e-6)
    assert ppls == pytest.approx([math.exp(reference)] * 3, rel=1e-6)
    # What averaging batch means would log, on the same batches: off by far more than the tolerance.
    at_8 = model.seen[N : N + math.ceil(N / 8)]
    naive_loss, naive_ppl = batch_means(at_8, shift=model.shift)
    assert abs(naive_loss - reference) > 1e-4 and abs(naive_ppl / math.exp(reference) - 1) > 1e-3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("check", [False, True], ids=["plain", "modecheck"])
def test_exact_in_every_precision_with_and_without_modecheck(precision: str, check: bool) -> None:
    """The token mean of the outputs the model gave in that precision; the step's loss is compute_loss's own."""
    seqs = sequences(21)
    model = LitLM("shift", lr=0.1)
    callbacks = [ModeCheck(on_violation="raise", probe=True, verbose=False)] if check else []
    tr = trainer(precision=precision, limit_train_batches=2, callbacks=callbacks)
    tr.fit(model, loader(seqs, 8), loader(seqs, 8))
    assert len(model.step_losses) == 2
    assert all(returned is step for returned, step in model.step_losses)  # the very tensor, with its gradient
    reference = token_mean(model.seen)
    assert tr.callback_metrics["val/loss"].item() == pytest.approx(reference, abs=1e-5)
    assert tr.callback_metrics["val/ppl"].item() == pytest.approx(math.exp(reference), rel=1e-5)
    assert model.metrics_history[0]["val/ppl"] == pytest.approx(math.exp(reference), rel=1e-5)
    assert "train/ppl" in model.metrics_history[0]
    if check:
        assert callbacks[0].findings == []


def test_the_models_own_loss_stays_the_step_loss() -> None:
    model = LitLM("model", lr=0.1)
    tr = trainer(limit_train_batches=2)
    seqs = sequences(21)
    tr.fit(model, loader(seqs, 8), loader(seqs, 8))
    assert [returned is step for returned, step in model.step_losses] == [True, True]
    assert tr.callback_metrics["val/loss"].item() == pytest.approx(token_mean(model.seen), abs=1e-6)


class TokenAccuracy(LitLM):
    """Token accuracy the documented way: the shifted, flattened logits and labels, ``ignore_index=-100``."""

    def configure_metrics(self) -> dict[str, Any]:
        return {"acc": MulticlassAccuracy(VOCAB, average="micro", ignore_index=IGNORE)}

    def metric_inputs(self, outputs: dict[str, Tensor], target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs["logits"][:, :-1].flatten(0, 1), target[:, 1:].flatten()


def test_token_accuracy_through_metric_inputs_is_the_plain_loops() -> None:
    seqs = sequences(N)
    model = TokenAccuracy()
    tr = trainer()
    tr.validate(model, [loader(seqs, size) for size in SIZES], verbose=False)
    correct = scored = 0
    for logits, labels in whole_set(model.model, seqs):  # the plain loop: every token scored, once
        pred, gold = logits[0, :-1].argmax(-1), labels[0, 1:]
        correct, scored = correct + int((pred == gold).sum()), scored + len(gold)
    assert logged_per_size(tr, "acc") == pytest.approx([correct / scored] * 3, abs=1e-7)


class TwoLosses(LitLM):
    """Two criterion calls summed: a new tensor, not a call's own result, so weighted by the batch size."""

    def compute_loss(self, outputs: dict[str, Any], target: Tensor) -> Tensor:
        logits = outputs["logits"]
        self.seen.append((logits.detach(), target))
        whole = self.criterion(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten())
        first = self.criterion(logits[:, :1].flatten(0, 1), target[:, 1:2].flatten())  # the first token only
        return whole + first


def test_a_sum_of_two_loss_calls_keeps_batch_size_weighting() -> None:
    seqs = sequences(N)
    model = TwoLosses()
    tr = trainer()
    tr.validate(model, loader(seqs, 8), verbose=False)
    first_token = [(logits[:, :2], labels[:, :2]) for logits, labels in model.seen]
    expected = batch_means(model.seen)[0] + batch_means(first_token)[0]  # each batch mean weighted by its size
    assert tr.callback_metrics["val/loss"].item() == pytest.approx(expected, abs=1e-6)


class SummedCriterion(LitLM):
    def __init__(self) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(reduction="sum")


class NamedPpl(LitLM):
    def configure_metrics(self) -> dict[str, Any]:
        return {"ppl": MulticlassAccuracy(VOCAB)}


class FlagNotBool(LitLM):
    log_perplexity = "yes"  # type: ignore[assignment]


@pytest.mark.parametrize(("cls", "error", "match"), [
    (SummedCriterion, ValueError, r"Expected a mean loss with `log_perplexity = True` \(perplexity is `exp` of the "
                                  r"mean token loss\) but `self.criterion` has `reduction='sum'`"),
    (NamedPpl, ValueError, r"Expected no metric named 'ppl' with `log_perplexity = True` \(the mixin logs "
                           r"`val/ppl` itself\) but `configure_metrics\(\)` returned one"),
    (FlagNotBool, TypeError, r"Expected attribute `log_perplexity` to be True or False but got 'yes'"),
])
def test_log_perplexity_errors(cls: type, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        trainer().validate(cls(), loader(sequences(5), 2), verbose=False)


def test_loss_mean_errors_name_the_field() -> None:
    class BadMean(LitLM):
        def compute_loss(self, outputs: dict[str, Any], target: Tensor) -> LossMean:
            return LossMean(outputs["logits"].mean(-1), 3)

    with pytest.raises(TypeError, match=r"Expected `LossMean.mean` from `compute_loss` to be a 0-dim float tensor "
                                        r"but got a tensor of shape \(2, 16\)"):
        trainer().validate(BadMean(), loader(sequences(2, low=16), 2), verbose=False)
