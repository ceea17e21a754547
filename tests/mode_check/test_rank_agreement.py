"""Findings shared across ranks: every rank gets every rank's findings, and the exchange leaves nothing in flight.

Two gloo processes started with ``torch.multiprocessing`` (no Lightning: the exchange is plain ``torch.distributed``).
"Nothing in flight": when ``share_findings`` returns, no backend thread still holds a tensor of the exchange. A gloo
thread that lets go of one later needs the GIL, and if that happens during interpreter shutdown the process aborts
(``terminate called without an active exception``; see ``rank_agreement.py`` and ``tests/distributed_exit.py``).
Right after ``all_gather`` returns, the thread still holds its tensors in about one call in ten on this machine, so
the hundred exchanges below catch an exchange that returns too early.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_exit import ended_process_group, free_port

from lightning_validate.findings import Finding, make_finding
from lightning_validate.mode_check.rank_agreement import share_findings

EXCHANGES = 100


def finding(module: str) -> Finding:
    return make_finding("LV101", module=module, phase="validate", boundary="on_validation_batch_start",
                        expected="eval mode", seen=f"{module} (Dropout) in train mode")


def made_on(rank: int, i: int) -> list[Finding]:
    """Exchange ``i``'s findings on ``rank``: none anywhere, one rank's only, or both with one in common."""
    if i % 3 == 0:
        return []
    if i % 3 == 1:
        return [finding(f"only{i}")] if rank == 1 else []
    return [finding("common"), finding(f"rank{rank}.{i}")]


def expected(i: int) -> list[tuple[int, Finding]]:
    if i % 3 == 0:
        return []
    if i % 3 == 1:
        return [(1, finding(f"only{i}"))]
    return [(0, finding("common")), (0, finding(f"rank0.{i}")), (1, finding(f"rank1.{i}"))]


def exchange_on_rank(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    with ended_process_group():
        handed: list[torch.Tensor] = []
        all_gather = dist.all_gather

        def recording(outputs: list[torch.Tensor], tensor: torch.Tensor, **kwargs: object) -> object:
            handed.extend([tensor, *outputs])
            return all_gather(outputs, tensor, **kwargs)

        dist.all_gather = recording  # type: ignore[assignment]  # this worker process only
        held: list[int] = []
        for i in range(EXCHANGES):
            handed.clear()
            assert share_findings(made_on(rank, i)) == expected(i), i
            assert handed, "the exchange made no collective"
            if any(t._use_count() > 1 for t in handed):  # type: ignore[attr-defined]  # held outside Python
                held.append(i)
        assert held == [], f"rank {rank}: the backend still held the exchange's tensors after exchanges {held}"
        Path(folder, f"done-{rank}").write_text(str(EXCHANGES))


@pytest.mark.ddp
def test_every_rank_gets_every_ranks_findings_and_nothing_is_left_in_flight(tmp_path: Path) -> None:
    mp.start_processes(exchange_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done-0", "done-1"]


def test_without_a_process_group_only_this_process_findings_come_back() -> None:
    assert share_findings([finding("a"), finding("b"), finding("a")]) == [(0, finding("a")), (0, finding("b"))]
