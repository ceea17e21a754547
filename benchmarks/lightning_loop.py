"""Lightning validation side by side: a forward-only step, the documented idiom, ``ValidationMixin`` (+ ``ModeCheck``).

Same MLP (BatchNorm, Dropout), same weights, same 200 in-memory batches of 64 (plus a short last batch of 5),
``trainer.validate`` on each variant in turn, interleaved repetitions in a shuffled order, median of 15. Two clocks:

- loop: CPU time of the main thread from ``on_validation_epoch_start`` to ``on_validation_end`` (a callback): the
  batches and the epoch-end work (compute, reduce, log), without Lightning's per-call setup. Thread CPU time, with
  one torch thread (the default here), does not count the time other processes take the core: on a shared
  2-core machine wall-clock ratios of the same run varied by +-0.1;
- call: wall-clock time of the whole ``trainer.validate()`` call.

Bars are off except in the rows that say so (those write to os.devnull: terminal I/O would time the terminal).

A second table (``--segmentation``, on by default) times segmentation with ``CrossEntropyLoss(ignore_index=255)``:
a small conv net on (16, 3, 32, 32) images, 8 classes, a share of void pixels that varies per batch (one batch all
void). The mixin (exact loss, no metric) is compared with a hand-written Lightning step that accumulates the same
sum and weight on the device (``reduction="sum"`` and ``(y != 255).sum()``), and with a forward-only step.

    python benchmarks/lightning_loop.py
    python benchmarks/lightning_loop.py --repeats 5 --no-bar   # shorter, on a busy machine
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
from torch.nn import functional as F
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


SEG_CLASSES, SEG_SIZE, VOID = 8, 32, 255


def make_seg_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, SEG_CLASSES, 1),
    )


class SegFloor(Base):
    """Forward only, segmentation."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


class SegHand(Base):
    """A hand-written step: the same sum and weight as the mixin's, accumulated on the device, logged once."""

    def on_validation_epoch_start(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_weight = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.loss_sum += F.cross_entropy(self(x), y, ignore_index=VOID, reduction="sum")
        self.loss_weight += (y != VOID).sum()

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.loss_sum / self.loss_weight)


class SegMixin(ValidationMixin, Base):
    """The mixin with `CrossEntropyLoss(ignore_index=255)` and no metric: the exact loss only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.criterion = nn.CrossEntropyLoss(ignore_index=VOID)

    def configure_metrics(self) -> dict[str, Any]:
        return {}


def segmentation_data(batches: int, batch_size: int) -> TensorDataset:
    n = batches * batch_size + 3
    x = torch.randn(n, 3, SEG_SIZE, SEG_SIZE)
    y = torch.randint(0, SEG_CLASSES, (n, SEG_SIZE, SEG_SIZE))
    share = torch.rand(n)[:, None, None]  # void share per image: 0 to 100%
    y[torch.rand(n, SEG_SIZE, SEG_SIZE) < share] = VOID
    y[batch_size : 2 * batch_size] = VOID  # one batch entirely void
    return TensorDataset(x, y)


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
    parser.add_argument("--no-classification", action="store_true", help="leave out the first table")
    parser.add_argument("--no-segmentation", action="store_true", help="leave out the segmentation table")
    parser.add_argument("--seg-batches", type=int, default=50)
    parser.add_argument("--seg-batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = make_net()
    n = args.batches * args.batch_size + 5
    data = TensorDataset(torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size)
    batches = len(loader)

    def run(module: pl.LightningModule, data: DataLoader, bar: bool = False,
            callbacks: list[pl.Callback] | None = None) -> Callable[[LoopTimer], object]:
        def go(timer: LoopTimer) -> object:
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=bar, callbacks=[timer, *(callbacks or [])],
            )
            return trainer.validate(module, data, verbose=False)
        return go

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, lightning {lightning.__version__}, "
          f"torchmetrics {torchmetrics.__version__}, Python {platform.python_version()}; "
          f"{torch.get_num_threads()} torch threads; median of {args.repeats}; "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    if not args.no_classification:
        floor = "Lightning, forward-only `validation_step` (the floor)"
        variants: dict[str, Callable[[LoopTimer], object]] = {
            floor: run(Floor(net), loader),
            "same work by hand: loss and correct-count sums on the device, read once per epoch":
                run(SameWork(net), loader),
            "documented idiom: `self.log(name, metric)` every step, `MeanMetric` + `MulticlassAccuracy`":
                run(Idiom(net), loader),
            "`ValidationMixin` (exact loss + default micro accuracy, `FastMulticlassAccuracy`)":
                run(Mixin(net), loader),
        }
        if ModeCheck is not None:
            variants["`ValidationMixin` + `ModeCheck()`"] = run(Mixin(net), loader,
                                                                callbacks=[ModeCheck(verbose=False)])
        if not args.no_bar:
            variants["forward-only step, TQDM bar on"] = run(Floor(net), loader, bar=True)
            variants["`ValidationMixin`, TQDM bar on (running values, 0.25 s throttle)"] = run(Mixin(net), loader,
                                                                                                bar=True)
        print(f"Classification: batch {args.batch_size}, {batches} batches\n")
        if ModeCheck is None:
            print("(`ValidationMixin` + `ModeCheck`: pending, `lightning_validate.ModeCheck` not importable)\n")
        table(variants, args.repeats, batches,
              lambda name: "forward-only step, TQDM bar on" if "bar on" in name else floor)
    if not args.no_segmentation:
        torch.manual_seed(0)
        seg_net = make_seg_net()
        seg_loader = DataLoader(segmentation_data(args.seg_batches, args.seg_batch_size),
                                batch_size=args.seg_batch_size)
        seg_floor = "segmentation, forward-only step (the floor)"
        hand = "hand-written step: `reduction='sum'` + `(y != 255).sum()` on the device"
        seg: dict[str, Callable[[LoopTimer], object]] = {
            seg_floor: run(SegFloor(seg_net), seg_loader),
            hand: run(SegHand(seg_net), seg_loader),
            "`ValidationMixin`, `CrossEntropyLoss(ignore_index=255)` (exact loss)": run(SegMixin(seg_net), seg_loader),
        }
        print(f"\nSegmentation: batch {args.seg_batch_size} x 3 x {SEG_SIZE} x {SEG_SIZE}, {SEG_CLASSES} classes, "
              f"{len(seg_loader)} batches; ratios to the floor, and to the hand-written step\n")
        table(seg, args.repeats, len(seg_loader), lambda name: seg_floor, second=hand)


def table(variants: dict[str, Callable[[LoopTimer], object]], repeats: int, batches: int,
          base_of: Callable[[str], str], second: str | None = None) -> None:
    """Time the variants interleaved in shuffled rounds; print a markdown table of medians and paired ratios."""
    loop: dict[str, list[float]] = {name: [] for name in variants}
    call: dict[str, list[float]] = {name: [] for name in variants}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        for fn in variants.values():  # warm-up
            fn(LoopTimer())
        order = list(variants)
        shuffler = random.Random(0)
        for _ in range(repeats):
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
    extra = " loop ratio to the hand-written step |" if second else ""
    print("| variant | loop CPU ms/batch | loop ratio to the floor (median of rounds) | call ms (wall) | "
          f"call ratio to the floor |{extra}")
    print("|---|---|---|---|---|" + ("---|" if second else ""))
    for name in variants:
        base = base_of(name)
        # Each round's ratio against the same round's floor, then the median: drifts of the machine cancel.
        paired = statistics.median(a / b for a, b in zip(loop[name], loop[base], strict=True))
        row = (f"| {name} | {med_loop[name] / batches * 1e3:.3f} | {paired:.2f} | "
               f"{med_call[name] * 1e3:.0f} | {med_call[name] / med_call[base]:.2f} |")
        if second:
            row += f" {statistics.median(a / b for a, b in zip(loop[name], loop[second], strict=True)):.2f} |"
        print(row)


if __name__ == "__main__":
    main()
