"""The mixin's epoch sums across ranks: exact, and nothing left in gloo's hands when ``Epoch.reduce`` returns.

Two gloo processes started with ``torch.multiprocessing`` run ``Epoch.reduce`` with Lightning's ``DDPStrategy.reduce``
(the collective a ``Trainer`` under ``ddp``/``ddp_spawn`` runs at every epoch end) many times. A backend thread
that still holds a tensor of the reduction after it returns would have to take the GIL to let go of it, and at
interpreter shutdown that aborts the process (``metrics/collectives.py``). Right after ``all_reduce`` returns, the
thread still holds its tensors in about one call in ten on this machine, so the reductions below catch a reduce that
returns too early.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_exit import ended_process_group, free_port
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_validate.metrics.accumulators import LossAccumulator
from lightning_validate.metrics.loss_terms import batch_loss
from lightning_validate.metrics.padding import PaddingFilter
from lightning_validate.mixin.epoch import Epoch, Loader
from lightning_validate.progress import Throttle

REDUCTIONS = 60


def epoch_on(rank: int) -> Epoch:
    """One loader that saw ``rank + 1`` samples, each with an L1 loss of ``rank + 1``."""
    loader = Loader("val", LossAccumulator("mean"), None, PaddingFilter(None), [], "", Throttle(0.25))
    n = rank + 1
    loader.update(torch.zeros(n), torch.full((n,), float(n)), inputs_of=lambda *_: [],
                  loss_of=lambda outputs, target, k, is_sum: batch_loss(nn.L1Loss(), outputs, target), bar=None)
    return Epoch("val", [loader])


def reduce_on_rank(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    with ended_process_group():
        handed: list[torch.Tensor] = []
        all_reduce = dist.all_reduce

        def recording(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
            handed.append(tensor)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = recording  # type: ignore[assignment]  # this worker process only
        trainer = SimpleNamespace(world_size=2, strategy=DDPStrategy())
        held: list[int] = []
        for i in range(REDUCTIONS):
            handed.clear()
            epoch = epoch_on(rank)
            totals = epoch.reduce(trainer, torch.device("cpu"))
            assert len(handed) == 2, handed  # the sums, then the target extremes
            if any(t._use_count() > 1 for t in handed):  # type: ignore[attr-defined]  # held outside Python
                held.append(i)
            # 1 sample of loss 1 on rank 0, 2 of loss 2 on rank 1: (1 + 4) / 3, the mean over the whole set
            assert epoch.values(totals, torch.device("cpu")) == {"val/loss": pytest.approx(5 / 3)}
        assert held == [], f"rank {rank}: the backend still held the reduction's tensors after reductions {held}"
        Path(folder, f"done-{rank}").write_text(str(REDUCTIONS))


@pytest.mark.ddp
def test_epoch_sums_are_exact_and_nothing_is_left_in_flight(tmp_path: Path) -> None:
    mp.start_processes(reduce_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done-0", "done-1"]
