"""How often ``ddp_spawn`` workers abort at exit, with and without the package, A/B against earlier releases.

A worker that reaches interpreter shutdown while gloo's worker thread still holds a collective's tensors aborts with
``terminate called without an active exception`` (pytorch #190489; docs/strategies.md, "Exiting cleanly"). Lightning's
own ``ddp_spawn`` tests abort that way now and then; the question is whether attaching ``ModeCheck`` or the
``ValidationMixin`` makes it likelier. Each trial is one user's ``trainer.fit`` under Lightning's plain
``strategy="ddp_spawn"`` (2 CPU processes, gloo; nothing here destroys the process group): 1 epoch, 4 training
batches, 2 validation batches and the sanity check. A trial aborted when a worker ended with SIGABRT.

Setups, each trial running every setup once in turn (so a load change on the machine touches them all alike):

- ``bare``: a hand-written module, ``validation_step`` logging its loss with ``sync_dist=True``; no package;
- ``modecheck``: the same module with ``ModeCheck()`` attached;
- ``mixin``: the same model with ``ValidationMixin`` (loss and accuracy);
- ``mixin+modecheck``: both.

Each version given with ``--ab NAME=PATH`` (a checkout's root) runs in its own subprocess, the versions alternating
in chunks of ``--chunk`` trials; ``bare`` runs in the first version's process only (it uses nothing of ours).

    python benchmarks/ddp_exit.py --trials 40                              # this checkout
    python benchmarks/ddp_exit.py --ab 0.2=/tmp/v02 now=. --trials 60      # 0.2 beside it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.multiprocessing import ProcessExitedException
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_validate as lv

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("bare", "modecheck", "mixin", "mixin+modecheck")


class Bare(pl.LightningModule):
    """A user's module: the loss logged by hand, averaged over ranks by Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.criterion(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", self.criterion(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Mixin(lv.ValidationMixin, Bare):
    """The same model validated by the mixin (its ``validation_step`` replaces the one above)."""

    def configure_metrics(self) -> dict[str, Any]:
        return {"acc": MulticlassAccuracy(3, average="micro")}


def trial(setup: str) -> str:
    """One ``trainer.fit`` under ``ddp_spawn``: ``"ok"``, ``"abort"`` (a worker's SIGABRT) or the error's type."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = Mixin() if setup.startswith("mixin") else Bare()
    callbacks = [lv.ModeCheck()] if setup.endswith("modecheck") else []
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=4,
                         limit_val_batches=2, num_sanity_val_steps=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    except ProcessExitedException as e:
        return "abort" if e.signal_name == "SIGABRT" or e.exit_code == -signal.SIGABRT else type(e).__name__
    except Exception as e:  # any other failure is counted apart, by its type
        return type(e).__name__
    return "ok"


def worker(setups: list[str], trials: int) -> dict[str, dict[str, int]]:
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and intervals, once per trial
    counts: dict[str, dict[str, int]] = {s: {} for s in setups}
    for _ in range(trials):
        for s in setups:
            outcome = trial(s)
            counts[s][outcome] = counts[s].get(outcome, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ab", nargs="+", default=[f"this={ROOT}"], metavar="NAME=PATH",
                        help="versions to compare, each a checkout's root")
    parser.add_argument("--trials", type=int, default=40, help="trials per setup and version")
    parser.add_argument("--chunk", type=int, default=10, help="trials per subprocess before the next version runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        setups, trials = json.loads(args.worker)
        print(json.dumps(worker(setups, trials)))
        return
    versions = [tuple(v.split("=", 1)) for v in args.ab]
    totals: dict[tuple[str, str], dict[str, int]] = {}
    start = time.perf_counter()
    done = 0
    while done < args.trials:
        n = min(args.chunk, args.trials - done)
        for i, (name, path) in enumerate(versions):
            setups = list(SETUPS) if i == 0 else list(SETUPS[1:])
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}  # the spawned workers inherit sys.path
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([setups, n])]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            for setup, outcomes in json.loads(out.strip().splitlines()[-1]).items():
                key = ("-" if setup == "bare" else name, setup)
                row = totals.setdefault(key, {})
                for outcome, k in outcomes.items():
                    row[outcome] = row.get(outcome, 0) + k
        done += n
        print(f"{done}/{args.trials} trials, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {args.trials} trials per row, {time.perf_counter() - start:.0f} s\n")
    print("| version | setup | trials | aborts | rate | other failures |")
    print("|---|---|---|---|---|---|")
    for (name, setup), outcomes in totals.items():
        n = sum(outcomes.values())
        aborts = outcomes.get("abort", 0)
        other = ", ".join(f"{k} {v}" for k, v in outcomes.items() if k not in ("ok", "abort")) or "-"
        print(f"| {name} | {setup} | {n} | {aborts} | {aborts / n:.1%} | {other} |")


if __name__ == "__main__":
    main()
