"""Overhead of ModeCheck (default settings) on `fit` with validation, side by side with the same fit without it.

Two models: (a) a small CNN, (b) a model of more than 1,000 submodules (where walking `named_modules()` alone costs
milliseconds). Both variants run interleaved, with the same data and seeds; the table shows medians and the ratio.

Run: `python benchmarks/modecheck_overhead.py [--repeats 7]`
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import ModeCheck


class TimedModeCheck(ModeCheck):
    """ModeCheck that adds up the time spent in its own work: a noise-free share next to the end-to-end ratio."""

    spent = 0.0


def _timed(name: str) -> None:
    original = getattr(ModeCheck, name)

    def timed(self: TimedModeCheck, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            TimedModeCheck.spent += time.perf_counter() - start

    setattr(TimedModeCheck, name, timed)


# Every entry point of ModeCheck's work (hooks and the wrappers' callbacks); none calls another.
for _name in ("_start_run", "_end_run", "_begin_eval", "_ensure_eval", "_mark", "_check_eval_batch", "_finish_eval",
              "_check_restore", "_check_train_batch", "_close_train_epoch", "_sync"):
    _timed(_name)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10),
    )


def many_modules(blocks: int = 260) -> nn.Module:
    """Residual MLP blocks of four modules each: 260 blocks -> 1,300+ submodules."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm, self.act, self.drop = nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.act(self.norm(self.fc(x))))

    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), *(Block() for _ in range(blocks)), nn.Linear(32, 10))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def run_fit(make: Any, with_check: bool, train: TensorDataset, val: TensorDataset, epochs: int) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    model = Classifier(make())
    callbacks = [TimedModeCheck(verbose=False)] if with_check else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=2,
    )
    loaders = DataLoader(train, batch_size=32), DataLoader(val, batch_size=64)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, *loaders)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if with_check:
        assert callbacks[0].findings == [], callbacks[0].findings
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # One thread: the machine is shared, and CPU time of one thread is what the ratio should compare.
    torch.set_num_threads(1)
    cases = [
        ("(a) small CNN", small_cnn, data(1024, 0), data(256, 1), 2),
        ("(b) 1,300+ submodules", many_modules, data(512, 0), data(256, 1), 2),
    ]
    rows = []
    for name, make, train, val, epochs in cases:
        modules = sum(1 for _ in Classifier(make()).modules())
        run_fit(make, False, train, val, 1)  # warm-up: first-call costs out of the measurement
        run_fit(make, True, train, val, 1)
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        shares: list[float] = []
        for i in range(args.repeats):
            for variant in ((False, True) if i % 2 == 0 else (True, False)):
                TimedModeCheck.spent = 0.0
                times[variant].append(run_fit(make, variant, train, val, epochs))
                if variant:
                    shares.append(TimedModeCheck.spent / times[variant][-1][1])
        med = {v: [statistics.median(t[k] for t in times[v]) for k in (0, 1)] for v in times}
        # Each round's with/without pair ran back to back: the median of the per-round ratios cancels slow drifts
        # of a shared machine that the ratio of two medians does not.
        paired = statistics.median(w[0] / b[0] for b, w in zip(times[False], times[True], strict=True))
        steps = epochs * (len(train) // 32 + len(val) // 64)
        rows.append((name, modules, steps, med[False], med[True], paired, statistics.median(shares)))
    print(f"Median of {args.repeats} interleaved runs of `fit` (validation every epoch, 2-batch sanity check); "
          "process CPU time (robust on a shared machine) and wall time.\n")
    print("| model | submodules | batches per fit | CPU s without | CPU s with ModeCheck | CPU ratio "
          "| paired CPU ratio | wall ratio | time inside ModeCheck |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, modules, steps, (base_cpu, base_wall), (cpu, wall), paired, share in rows:
        print(f"| {name} | {modules} | {steps} | {base_cpu:.3f} | {cpu:.3f} | {cpu / base_cpu:.3f}x | {paired:.3f}x | "
              f"{wall / base_wall:.3f}x | {share:.1%} of the fit |")


if __name__ == "__main__":
    main()
