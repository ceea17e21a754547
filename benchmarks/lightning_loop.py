"""Lightning validation side by side: a forward-only step, the documented idiom, ``ValidationMixin`` (+ ``ModeCheck``).

Same MLP (BatchNorm, Dropout), same weights, same 200 in-memory batches of 64 (plus a short last batch of 5),
``trainer.validate`` on each variant in turn, interleaved repetitions in a shuffled order, median of 15. Two clocks:

- loop: CPU time of the main thread from ``on_validation_epoch_start`` to ``on_validation_end`` (a callback): the
  batches and the epoch-end work (compute, reduce, log), without Lightning's per-call setup. Thread CPU time, with
  one torch thread (the default here), does not count the time other processes take the core: on a shared
  2-core machine wall-clock ratios of the same run varied by +-0.1;
- call: wall-clock time of the whole ``trainer.validate()`` call.

Bars are off except in the rows that say so (those write to os.devnull: terminal I/O would time the terminal).

    python benchmarks/lightning_loop.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ValidationMixin

FEATURES, HIDDEN, CLASSES = 64, 512, 10

try:
    from lightning_validate import ModeCheck
except ImportError:  # being written elsewhere; the table says "pending"
    ModeCheck = None


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(HIDDEN, CLASSES),
    )


class Base(pl.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.net = net
        self.criterion = nn.CrossEntropyLoss()
        self.num_classes = num_classes  # read by the idiom's accuracy and by ValidationMixin's default metric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Floor(Base):
    """Forward only: what Lightning costs with no loss and no metric."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


class Idiom(Base):
    """Lightning's documented idiom: torchmetrics objects (defaults) updated and logged every step."""

    def __init__(self, net: nn.Module, num_classes: int = CLASSES) -> None:
        super().__init__(net, num_classes)
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.criterion(out, y)
        self.val_loss(loss, weight=len(y))
        self.val_acc(out, y)
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc)
        return loss


class SameWork(Base):
    """The mixin's work written by hand: exact loss and micro accuracy summed on the device, read once per epoch."""

    def on_validation_epoch_start(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.count = 0

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.criterion(out, y)
        self.loss_sum += loss.detach() * len(y)
        self.correct += (out.argmax(1) == y).sum()
        self.count += len(y)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss_sum, correct = torch.stack([self.loss_sum, self.correct.double()]).tolist()  # the epoch's one read
        self.log("val/loss", loss_sum / self.count)
        self.log("val/acc", correct / self.count)


class Mixin(ValidationMixin, Base):
    """The mixin's default steps; ``num_classes`` (set by ``Base``) gives it the default micro accuracy."""


class LoopTimer(pl.Callback):
    """CPU seconds of this thread from the epoch start to the end of validation."""

    def __init__(self) -> None:
        self.start = 0.0
        self.elapsed = 0.0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.thread_time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.thread_time() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-bar", action="store_true", help="leave out the two rows with a TQDM bar")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; the loop clock needs 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = make_net()
    n = args.batches * args.batch_size + 5
    data = TensorDataset(torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size)
    batches = len(loader)

    def run(module: pl.LightningModule, bar: bool = False, callbacks: list[pl.Callback] | None = None
            ) -> Callable[[LoopTimer], object]:
        def go(timer: LoopTimer) -> object:
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=bar, callbacks=[timer, *(callbacks or [])],
            )
            return trainer.validate(module, loader, verbose=False)
        return go

    floor = "Lightning, forward-only `validation_step` (the floor)"
    variants: dict[str, Callable[[LoopTimer], object]] = {
        floor: run(Floor(net)),
        "same work by hand: loss and correct-count sums on the device, read once per epoch": run(SameWork(net)),
        "documented idiom: `self.log(name, metric)` every step, `MeanMetric` + `MulticlassAccuracy`": run(Idiom(net)),
        "`ValidationMixin` (exact loss + default micro accuracy, `FastMulticlassAccuracy`)": run(Mixin(net)),
    }
    if ModeCheck is not None:
        variants["`ValidationMixin` + `ModeCheck()`"] = run(Mixin(net), callbacks=[ModeCheck(verbose=False)])
    if not args.no_bar:
        variants["forward-only step, TQDM bar on"] = run(Floor(net), bar=True)
        variants["`ValidationMixin`, TQDM bar on (running values, 0.25 s throttle)"] = run(Mixin(net), bar=True)

    loop: dict[str, list[float]] = {name: [] for name in variants}
    call: dict[str, list[float]] = {name: [] for name in variants}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        for fn in variants.values():  # warm-up
            fn(LoopTimer())
        order = list(variants)
        shuffler = random.Random(0)
        for _ in range(args.repeats):
            shuffler.shuffle(order)  # a variant's position in a round changed its time by up to 15%: vary it
            for name in order:
                fn = variants[name]
                gc.collect()  # garbage left by the previous variant would be collected during this one
                timer = LoopTimer()
                start = time.perf_counter()
                fn(timer)
                call[name].append(time.perf_counter() - start)
                loop[name].append(timer.elapsed)

    med_loop = {name: statistics.median(ts) for name, ts in loop.items()}
    med_call = {name: statistics.median(ts) for name, ts in call.items()}
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, lightning {lightning.__version__}, "
          f"torchmetrics {torchmetrics.__version__}, Python {platform.python_version()}; "
          f"{torch.get_num_threads()} torch threads; batch {args.batch_size}, {batches} batches, "
          f"median of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}\n")
    if ModeCheck is None:
        print("(`ValidationMixin` + `ModeCheck`: pending, `lightning_validate.ModeCheck` not importable)\n")
    print("| variant | loop CPU ms/batch | loop ratio to the floor (median of rounds) | call ms (wall) | "
          "call ratio to the floor |")
    print("|---|---|---|---|---|")
    bar_floor = "forward-only step, TQDM bar on"
    for name in variants:
        base = bar_floor if "bar on" in name else floor
        # Each round's ratio against the same round's floor, then the median: drifts of the machine cancel.
        paired = statistics.median(a / b for a, b in zip(loop[name], loop[base], strict=True))
        print(f"| {name} | {med_loop[name] / batches * 1e3:.3f} | {paired:.2f} | "
              f"{med_call[name] * 1e3:.0f} | {med_call[name] / med_call[base]:.2f} |")


if __name__ == "__main__":
    main()
