"""Plain PyTorch validation loops, side by side: the bare loop, the usual hand-written loop and ``validate()``.

Same MLP (BatchNorm, Dropout), same 200 in-memory batches of 64, interleaved repetitions, median of 5.
``validate()`` runs with its bar on, written to os.devnull so that terminal I/O does not dominate the timing,
and with ``progress=False``.

    python benchmarks/plain_loop.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import lightning
import torch
import torchmetrics
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from lightning_validate import validate

FEATURES, HIDDEN, CLASSES = 64, 512, 10


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, CLASSES),
    )


def bare(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], criterion: nn.Module,
         metric: MulticlassAccuracy | None = None, count_correct: bool = True) -> dict[str, float]:
    """The floor: inference mode, loss and correct-count sums on the device, one read at the end.

    With ``metric``, the same loop updates that torchmetrics object instead of counting correct predictions, and
    with ``count_correct=False`` it sums the loss only: the bare loop doing exactly the work ``validate()`` does.
    """
    model.eval()
    if metric is not None:
        metric.reset()
    with torch.inference_mode():
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long)
        n = 0
        for x, y in batches:
            out = model(x)
            loss_sum += criterion(out, y) * len(y)
            if metric is not None:
                metric.update(out, y)
            elif count_correct:
                correct += (out.argmax(1) == y).sum()
            n += len(y)
    model.train()
    accuracy = correct.item() / n if metric is None else metric.compute().item()
    return {"loss": loss_sum.item() / n, "accuracy": accuracy}


def usual_loop(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], criterion: nn.Module) -> float:
    """The usual hand-written loop (a blog post's ``valid()``).

    ``.item()`` twice per batch, a tqdm postfix every batch, ``model.train()`` at the end.
    """
    model.eval()
    running_loss = 0.0
    running_accuracy = 0.0
    pbar = tqdm(total=len(batches) * len(batches[0][1]), ncols=0, desc="Valid", unit=" uttr")
    for i, (x, y) in enumerate(batches):
        with torch.no_grad():
            out = model(x)
            loss = criterion(out, y)
            accuracy = torch.mean((out.argmax(dim=-1) == y).float())
            running_loss += loss.item()
            running_accuracy += accuracy.item()
        pbar.update(len(y))
        pbar.set_postfix(loss=f"{running_loss / (i + 1):.2f}", accuracy=f"{running_accuracy / (i + 1):.2f}")
    pbar.close()
    model.train()
    return running_accuracy / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = make_model()
    criterion = nn.CrossEntropyLoss()
    batches = [(torch.randn(args.batch_size, FEATURES), torch.randint(0, CLASSES, (args.batch_size,)))
               for _ in range(args.batches)]
    acc = MulticlassAccuracy(num_classes=CLASSES, average="micro")  # torchmetrics defaults

    floor = "bare loop: inference_mode, loss and correct-count sums on the device (the floor)"
    loss_only = "bare loop, loss sum only"
    same_work = "bare loop, loss sum and the same `MulticlassAccuracy` updated per batch"
    variants: dict[str, tuple[Callable[[], object], str]] = {
        floor: (lambda: bare(model, batches, criterion), floor),
        loss_only: (lambda: bare(model, batches, criterion, count_correct=False), loss_only),
        same_work: (lambda: bare(model, batches, criterion, acc), same_work),
        "the usual hand-written loop: `.item()` x2 per batch, tqdm postfix per batch": (
            lambda: usual_loop(model, batches, criterion), floor),
        "`validate(criterion=...)`, bar on": (lambda: validate(model, batches, criterion=criterion), loss_only),
        "`validate(criterion=...)`, `progress=False`": (
            lambda: validate(model, batches, criterion=criterion, progress=False), loss_only),
        "`validate(criterion=..., metrics={'accuracy': acc})`, bar on": (
            lambda: validate(model, batches, criterion=criterion, metrics={"accuracy": acc}), same_work),
        "`validate(criterion=..., metrics={'accuracy': acc})`, `progress=False`": (
            lambda: validate(model, batches, criterion=criterion, metrics={"accuracy": acc}, progress=False),
            same_work),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    # The bars write to os.devnull: terminal I/O would time the terminal, not the loop.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        for fn, _ in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, (fn, _) in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, lightning {lightning.__version__}, "
          f"torchmetrics {torchmetrics.__version__}, Python {platform.python_version()}; "
          f"{torch.get_num_threads()} torch threads; batch {args.batch_size}, {args.batches} batches, "
          f"median of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}\n")
    print("| variant | ms/batch | ratio to the floor | ratio to the bare loop doing the same work |")
    print("|---|---|---|---|")
    row = {name: i + 1 for i, name in enumerate(variants)}
    for name, (_, baseline) in variants.items():
        ms = median[name] / args.batches * 1e3
        same = "" if baseline == name else f"{median[name] / median[baseline]:.2f} (row {row[baseline]})"
        print(f"| {name} | {ms:.3f} | {median[name] / median[floor]:.2f} | {same} |")

if __name__ == "__main__":
    main()
