"""Intervals side by side: ``ValidationMixin`` without them, with the analytic ones, and with the Poisson bootstrap.

One run, the variants interleaved in shuffled rounds, medians (the method of ``lightning_loop.py``). The model is
that benchmark's MLP (64 -> 512 -> 512 -> 10, BatchNorm, Dropout) on in-memory batches of 64, ``trainer.validate``:

1. the mixin's default (exact loss + micro accuracy), then the same with ``confidence = 0.95``: the loss's
   t interval (a ``reduction="none"`` call per batch) and the accuracy's Wilson interval (nothing per batch).
   Goal: at most 1.03 times the run without intervals;
2. the mixin with a macro F1 as well, then the same with ``confidence = Intervals(replicates=1000)``: the F1's
   Poisson bootstrap, 1000 replicates. Goal: at most 1.3 times the run without intervals;
3. on a few batches (it is two orders of magnitude slower): torchmetrics' ``BootStrapper`` at the same 1000
   replicates on the same macro F1, updated in the same step (``update``, not ``forward``, which keeps only the last
   batch) and computed at the end, against the mixin's bootstrap.

Clock on the CPU: this thread's CPU time from the epoch start to the end of validation (one torch thread; other
processes taking the core do not count). On CUDA (``--device cuda``): wall time with a synchronize at both ends, and
the host-device synchronizations per batch, counted with ``torch.cuda.set_sync_debug_mode("warn")``.

    python benchmarks/intervals.py                       # CPU, one thread, 15 rounds
    python benchmarks/intervals.py --repeats 3 --batches 50 --bootstrapper-batches 3   # a quick look
    python benchmarks/intervals.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.wrappers import BootStrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_loop import CLASSES, FEATURES, Base, make_net

from lightning_validate import Intervals, ValidationMixin

REPLICATES = 1000
_SYNC = "called a synchronizing CUDA operation"


class Plain(ValidationMixin, Base):
    """The mixin's default: exact loss and micro accuracy."""

    def configure_metrics(self) -> dict[str, Any]:
        return {"acc": MulticlassAccuracy(CLASSES, average="micro")}


class WithF1(Plain):
    """The mixin with a macro F1 too: the metric the bootstrap replicates."""

    def configure_metrics(self) -> dict[str, Any]:
        return {**super().configure_metrics(), "f1": MulticlassF1Score(CLASSES, average="macro")}


class WithBootStrapper(WithF1):
    """The same step, plus torchmetrics' BootStrapper of the macro F1: ``update`` per step, ``compute`` at the end."""

    def __init__(self, net: torch.nn.Module, replicates: int) -> None:
        super().__init__(net)
        self.boot = BootStrapper(MulticlassF1Score(CLASSES, average="macro"), num_bootstraps=replicates,
                                 quantile=torch.tensor([0.025, 0.975]), std=False)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        x, y = batch
        outputs = self(x)
        self.boot.update(outputs, y)
        return self.update_metrics("val", outputs, y, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        result = self.boot.compute()
        low, high = result["quantile"].tolist()
        self.log("val/f1_boot_low", low)
        self.log("val/f1_boot_high", high)
        self.boot.reset()


def configured(cls: type[Plain], confidence: float | Intervals | None, *args: Any) -> Plain:
    model = cls(*args)
    model.confidence = confidence
    return model


class Clock(pl.Callback):
    """Seconds of the validation loop; on CUDA, wall time between synchronizes, and syncs counted per batch."""

    def __init__(self, cuda: bool, count_syncs: bool) -> None:
        self.cuda, self.count_syncs = cuda, count_syncs
        self.start = self.elapsed = 0.0
        self.syncs = 0
        self.batches = 0
        self._catch: contextlib.ExitStack | None = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.now()

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        if self.count_syncs:
            stack = contextlib.ExitStack()
            stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message: Any, *rest: Any, **kw: Any) -> None:
                if _SYNC in str(message):
                    self.syncs += 1
                else:
                    shown(message, *rest, **kw)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            self._catch = stack

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.batches += 1
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.close()
            self._catch = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = self.now() - self.start


def table(title: str, variants: dict[str, Callable[[Clock], object]], base_of: dict[str, str], repeats: int,
          batches: int, cuda: bool) -> None:
    times: dict[str, list[float]] = {name: [] for name in variants}
    syncs: dict[str, float] = {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        for name, fn in variants.items():  # warm-up, and on CUDA the sync count (not timed)
            clock = Clock(cuda, count_syncs=cuda)
            fn(clock)
            if cuda:
                syncs[name] = clock.syncs / max(clock.batches, 1)
        order = list(variants)
        shuffler = random.Random(0)
        for _ in range(repeats):
            shuffler.shuffle(order)
            for name in order:
                gc.collect()
                clock = Clock(cuda, count_syncs=False)
                variants[name](clock)
                times[name].append(clock.elapsed)
    print(f"\n{title}\n")
    head = "| variant | ms/batch | ratio to its base (median of rounds) |" + (" syncs/batch |" if cuda else "")
    print(head)
    print("|---|---|---|" + ("---|" if cuda else ""))
    for name in variants:
        base = base_of.get(name, name)
        ratio = statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))
        row = f"| {name} | {statistics.median(times[name]) / batches * 1e3:.3f} | {ratio:.3f} |"
        if cuda:
            row += f" {syncs[name]:.2f} |"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrapper-batches", type=int, default=10, help="batches of the BootStrapper table")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--replicates", type=int, default=REPLICATES)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # the per-run notices
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)  # Lightning 2.6 on torch 2.13
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = make_net()

    def data(batches: int) -> DataLoader:
        n = batches * args.batch_size + 5  # a short last batch
        return DataLoader(TensorDataset(torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,))),
                          batch_size=args.batch_size)

    def run(make: Callable[[], pl.LightningModule], loader: DataLoader) -> Callable[[Clock], object]:
        def go(clock: Clock) -> object:
            trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                 callbacks=[clock])
            return trainer.validate(make(), loader, verbose=False)
        return go

    spec = Intervals(replicates=args.replicates)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.cuda.get_device_name() if cuda else 'CPU'}, torch "
          f"{torch.__version__}, lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}, Python "
          f"{platform.python_version()}; {torch.get_num_threads()} torch threads; median of {args.repeats}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    loader = data(args.batches)
    plain, analytic = "mixin: loss + accuracy", "mixin: loss + accuracy, `confidence=0.95` (t, Wilson)"
    f1, boot = "mixin: + macro F1", f"mixin: + macro F1, `confidence=Intervals(replicates={args.replicates})`"
    table(
        f"Batch {args.batch_size}, {len(loader)} batches; each row against the same run without intervals "
        "(goals: analytic <= 1.03, bootstrap <= 1.3)",
        {
            plain: run(lambda: configured(Plain, None, net), loader),
            analytic: run(lambda: configured(Plain, 0.95, net), loader),
            f1: run(lambda: configured(WithF1, None, net), loader),
            boot: run(lambda: configured(WithF1, spec, net), loader),
        },
        {analytic: plain, boot: f1}, args.repeats, len(loader), cuda,
    )
    short = data(args.bootstrapper_batches)
    boots = f"same step + torchmetrics `BootStrapper(num_bootstraps={args.replicates})` of the macro F1"
    table(
        f"Batch {args.batch_size}, {len(short)} batches: the mixin's bootstrap against torchmetrics' BootStrapper "
        "at the same replicates",
        {
            f1: run(lambda: configured(WithF1, None, net), short),
            boot: run(lambda: configured(WithF1, spec, net), short),
            boots: run(lambda: configured(WithBootStrapper, None, net, args.replicates), short),
        },
        {boot: f1, boots: f1}, max(1, args.repeats // 5), len(short), cuda,
    )
    if cuda:
        same_on_both(net, data(20), args.replicates)


def same_on_both(net: torch.nn.Module, loader: DataLoader, replicates: int) -> None:
    """The bootstrap replicates and the bounds on the GPU against the CPU's: the same samples, the same weights."""
    spec = Intervals(replicates=replicates, record=True)
    found = {}
    for accelerator in ("cpu", "gpu"):
        model = configured(WithF1, spec, net)
        values = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False).validate(model, loader,
                                                                                           verbose=False)[0]
        found[accelerator] = (values, model.sample_record("val"))
    (cpu, cpu_record), (gpu, gpu_record) = found["cpu"], found["gpu"]
    same = torch.equal(cpu_record.replicates["f1"], gpu_record.replicates["f1"])
    gaps = {k: abs(cpu[k] - gpu[k]) for k in cpu if k.endswith(("_low", "_high"))}
    print(f"\nGPU against CPU, {len(loader)} batches: macro F1's {replicates} replicates identical: {same}; largest "
          f"gap of a bound: {max(gaps.values()):.2e} ({max(gaps, key=gaps.__getitem__)})")


if __name__ == "__main__":
    main()
