"""The user's configuration, A/B against earlier releases in one run: their own metric, one thread, the bar on.

``benchmarks/plain_loop.py`` and ``lightning_loop.py`` time the package with its default fast accuracy and torch's
threads; a per-batch regression hid behind both. This script times what a user runs: a 256-512-512-10 MLP, 150
batches of 64, a ``MulticlassAccuracy(10, average="micro")`` configured by the user (torchmetrics' defaults, input
checks on), one torch thread, progress bars on (written to os.devnull: terminal I/O would time the terminal).

Rows, each timed by the main thread's CPU clock (one torch thread, so all the work is in it; other processes on a
shared machine then change the ratios little):

- plain PyTorch: the bare loop doing the same work (loss sum on the device, the same metric updated per batch) and
  ``validate(model, batches, criterion=..., metrics={"acc": acc})``;
- Lightning (``trainer.validate``, clock from ``on_validation_epoch_start`` to ``on_validation_end``): the
  forward-only ``validation_step`` (the floor), the same work by hand (the criterion, its loss summed on the device,
  the same metric updated), and ``ValidationMixin`` with that metric from ``configure_metrics``.

Each version of the package given with ``--ab NAME=PATH`` (a checkout's root) runs in its own subprocess, the
versions alternating round by round; a round's ratios are taken within one process, and the table gives the median
over rounds of each ratio.

    python benchmarks/user_config.py                                  # this checkout only
    git worktree add /tmp/v01 533adbc                                  # an earlier release beside it
    python benchmarks/user_config.py --ab 0.1=/tmp/v01 now=. --rounds 9
    python benchmarks/user_config.py --ab 0.1=/tmp/v01 now=. --rounds 5 --jobs 10   # 16 idle cores
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IN, HIDDEN, CLASSES = 256, 512, 10

ROWS = {
    "plain_same_work": "plain: bare loop, loss sum + the user's `MulticlassAccuracy` per batch (same work)",
    "plain_validate": "plain: `validate(criterion=..., metrics={'acc': acc})`, bar on",
    "pl_floor": "Lightning: forward-only `validation_step` (the floor), bar on",
    "pl_same_work": "Lightning: same work by hand (criterion, loss sum on the device, the metric), bar on",
    "pl_mixin": "Lightning: `ValidationMixin` with `configure_metrics` -> that metric, bar on",
}
#: Ratios reported: (row, the row it is divided by).
RATIOS = [
    ("plain_validate", "plain_same_work"),
    ("pl_mixin", "pl_floor"),
    ("pl_mixin", "pl_same_work"),
    ("pl_same_work", "pl_floor"),
]


def worker(batches_n: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Time every row ``repeats`` times in this process (the package imported from ``sys.path``); medians in s."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_validate import ValidationMixin, validate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                        nn.Linear(HIDDEN, CLASSES))
    batches = [(torch.randn(batch_size, IN), torch.randint(0, CLASSES, (batch_size,))) for _ in range(batches_n)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the same batches, as one dataloader
    criterion = nn.CrossEntropyLoss()
    acc = MulticlassAccuracy(CLASSES, average="micro")

    def plain_same_work() -> None:
        net.eval()
        acc.reset()
        with torch.inference_mode():
            total = torch.zeros((), dtype=torch.float64)
            n = 0
            for x, y in batches:
                out = net(x)
                total += criterion(out, y) * len(y)
                acc.update(out, y)
                n += len(y)
        net.train()
        (total / n).item(), acc.compute().item()

    def plain_validate() -> None:
        validate(net, batches, criterion=criterion, metrics={"acc": acc})

    class Base(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.criterion = nn.CrossEntropyLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class Floor(Base):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])

    class SameWork(Base):
        def __init__(self) -> None:
            super().__init__()
            self.acc = MulticlassAccuracy(CLASSES, average="micro")

        def on_validation_epoch_start(self) -> None:
            self.total = torch.zeros((), dtype=torch.float64)
            self.count = 0

        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self(x)
            loss = self.criterion(out, y)
            self.total += loss.detach() * len(y)
            self.count += len(y)
            self.acc.update(out, y)
            return loss

        def on_validation_epoch_end(self) -> None:
            total, value = torch.stack([self.total, self.acc.compute().double()]).tolist()
            self.log("val/loss", total / self.count)
            self.log("val/acc", value)
            self.acc.reset()

    class Mixin(ValidationMixin, Base):
        def configure_metrics(self) -> dict[str, Any]:
            return {"acc": MulticlassAccuracy(CLASSES, average="micro")}

    class Clock(pl.Callback):
        elapsed = 0.0

        def on_validation_epoch_start(self, *args: Any) -> None:
            self.start = time.thread_time()

        def on_validation_end(self, *args: Any) -> None:
            self.elapsed = time.thread_time() - self.start

    def lightning(module: pl.LightningModule) -> Callable[[], float]:
        def go() -> float:
            clock = Clock()
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_model_summary=False, enable_progress_bar=True, callbacks=[clock])
            trainer.validate(module, loader, verbose=False)
            return clock.elapsed
        return go

    def timed(fn: Callable[[], None]) -> Callable[[], float]:
        def go() -> float:
            start = time.thread_time()
            fn()
            return time.thread_time() - start
        return go

    rows: dict[str, Callable[[], float]] = {
        "plain_same_work": timed(plain_same_work),
        "plain_validate": timed(plain_validate),
        "pl_floor": lightning(Floor()),
        "pl_same_work": lightning(SameWork()),
        "pl_mixin": lightning(Mixin()),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        import warnings

        warnings.filterwarnings("ignore")
        for fn in rows.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in rows.items():
                gc.collect()
                times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ab", nargs="+", default=[f"this={ROOT}"], metavar="NAME=PATH",
                        help="package versions: a name and the root of a checkout holding lightning_validate/")
    parser.add_argument("--rounds", type=int, default=9, help="paired rounds: each runs every version once")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each row per round (median taken)")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1,
                        help="workers at once, each pinned to a core (only on a machine with that many idle cores)")
    parser.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, args.worker)
        print(json.dumps(worker(args.batches, args.batch_size, args.repeats)))
        return

    versions = dict(item.split("=", 1) for item in args.ab)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    load = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = [(name, path) for _ in range(args.rounds) for name, path in versions.items()]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for start in range(0, len(runs), args.jobs):
        # With --jobs > 1 (a machine with idle cores), that many workers run at once, each on a core of its own;
        # each ratio is still taken within one process, whose rows alternate.
        procs = []
        for i, (name, path) in enumerate(runs[start : start + args.jobs]):
            cmd = [sys.executable, __file__, "--worker", str(Path(path).resolve()), "--repeats", str(args.repeats),
                   "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
            if args.jobs > 1 and cores:
                cmd = ["taskset", "-c", str(cores[(i + 1) % len(cores)]), *cmd]
            procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
        for name, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a worker for {name} exited {proc.returncode}")
            results[name].append(json.loads(out.strip().splitlines()[-1]))

    import lightning
    import torch
    import torchmetrics

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, lightning {lightning.__version__}, "
          f"torchmetrics {torchmetrics.__version__}, Python {platform.python_version()}; 1 torch thread; "
          f"{args.batches} batches of {args.batch_size}; {args.rounds} paired rounds x {args.repeats} repeats, "
          f"{args.jobs} worker(s) at once; "
          f"load average before: {load:.2f}\n")
    print("| row | " + " | ".join(f"{v} ms/batch" for v in versions) + " |")
    print("|---|" + "---|" * len(versions))
    for key, label in ROWS.items():
        cells = [f"{statistics.median(r[key] for r in results[v]) / args.batches * 1e3:.3f}" for v in versions]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n| ratio (median over rounds) | " + " | ".join(versions) + " |")
    print("|---|" + "---|" * len(versions))
    for top, bottom in RATIOS:
        cells = [f"{statistics.median(r[top] / r[bottom] for r in results[v]):.3f}" for v in versions]
        print(f"| {top} / {bottom} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
