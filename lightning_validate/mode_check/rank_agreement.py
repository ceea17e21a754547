"""Agreeing on findings across ranks, for ``ModeCheck`` under DDP, FSDP and ``ModelParallelStrategy``.

Each rank checks its own model. Under DDP the ranks hold the same parameters, so they mostly see the same
findings; under sharding (FSDP, FSDP2's ``fully_shard``) each rank fingerprints only its own shard, and a write that
touches one rank's shard is seen by that rank alone. At boundaries that every rank passes in the same order, the
ranks exchange the findings they made since the last exchange, so that every rank reports the same verdict: all
warn (rank zero prints the other ranks' findings too) or all raise, and none is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_validate.findings import Finding, ModeCheckError

__all__ = ["agreed_error", "buffers_broadcast", "share_findings"]


def share_findings(mine: Sequence[Finding]) -> list[tuple[int, Finding]]:
    """Every rank's findings since the last call, as ``(rank, finding)``, each distinct finding once, rank by rank.

    A collective over the default process group (the one Lightning's strategies use): every rank must call it at
    the same boundary. Without an initialized process group only this process's findings come back.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        gathered: list[object] = [list(mine)]
    else:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(mine))  # one small pickled list per rank, at phase boundaries only
    out: list[tuple[int, Finding]] = []
    seen: set[tuple[str, str, str]] = set()
    for rank, findings in enumerate(gathered):
        for f in findings if isinstance(findings, list) else []:
            if isinstance(f, Finding) and f.key not in seen:
                seen.add(f.key)
                out.append((rank, f))
    return out


def agreed_error(
    mine: Sequence[Finding], shared: Sequence[tuple[int, Finding]], boundary: str
) -> ModeCheckError | None:
    """The error this rank raises when any rank has a finding (``on_violation="raise"``), else ``None``.

    A rank with findings of its own raises them; the others raise the first rank's first finding, named as such.
    """
    if mine:
        return ModeCheckError(mine[0].message, list(mine))
    if not shared:
        return None
    rank, first = shared[0]
    return ModeCheckError(
        f"ModeCheck: another rank reported a finding at {boundary}; this rank stops with it. Rank {rank}: "
        f"{first.message}", [f for _, f in shared])


def buffers_broadcast(trainer: pl.Trainer | None) -> bool:
    """Whether DDP overwrites this rank's buffers with rank zero's at every forward (``broadcast_buffers``).

    BatchNorm statistics then legitimately change during evaluation on every rank but zero, which keeps its own:
    buffer changes are checked on rank zero only.
    """
    if trainer is None or trainer.world_size <= 1 or trainer.global_rank == 0:
        return False
    return bool(getattr(trainer.model, "broadcast_buffers", False))
