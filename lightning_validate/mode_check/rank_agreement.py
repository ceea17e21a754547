"""Agreeing on findings across ranks, for ``ModeCheck`` under DDP, FSDP and ``ModelParallelStrategy``.

Each rank checks its own model. Under DDP the ranks hold the same parameters, so they mostly see the same
findings; under sharding (FSDP, FSDP2's ``fully_shard``) each rank fingerprints only its own shard, and a write that
touches one rank's shard is seen by that rank alone. At boundaries that every rank passes in the same order, the
ranks exchange the findings they made since the last exchange, so that every rank reports the same verdict: all
warn (rank zero prints the other ranks' findings too) or all raise, and none is left waiting in a collective.

The exchange leaves nothing in flight: the last one comes at ``on_train_end``, right before a ``ddp_spawn`` worker
returns, and a gloo thread still holding its tensors at interpreter shutdown aborts the process (pytorch #190489;
``metrics/collectives.py``). So it uses plain tensors it owns (findings as JSON bytes, no pickled objects, whose
tensors ``all_gather_object`` keeps out of reach) and returns only once the backend has let go of every one of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_validate.findings import Finding, ModeCheckError
from lightning_validate.metrics.collectives import released

__all__ = ["agreed_error", "all_gather_bytes", "buffers_broadcast", "share_findings"]

def share_findings(mine: Sequence[Finding]) -> list[tuple[int, Finding]]:
    """Every rank's findings since the last call, as ``(rank, finding)``, each distinct finding once, rank by rank.

    A collective over the default process group (the one Lightning's strategies use): every rank must call it at
    the same boundary. Without an initialized process group only this process's findings come back.

    Example:
        >>> from lightning_validate.findings import make_finding
        >>> f = make_finding("LV301", module="grad mode", phase="train", boundary="on_train_batch_start",
        ...                  expected="grad enabled", seen="grad disabled")
        >>> share_findings([f, f]) == [(0, f)]
        True

    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        gathered = [list(mine)]
    else:
        gathered = [_decode(payload) for payload in all_gather_bytes(_encode(mine))]
    out: list[tuple[int, Finding]] = []
    seen: set[tuple[str, str, str]] = set()
    for rank, findings in enumerate(gathered):
        for f in findings:
            if f.key not in seen:
                seen.add(f.key)
                out.append((rank, f))
    return out


def _encode(findings: Sequence[Finding]) -> bytes:
    """The findings as JSON bytes (their fields only); no findings, no bytes.

    Example:
        >>> _encode([])
        b''

    """
    if not findings:
        return b""
    return json.dumps([dataclasses.asdict(f) for f in findings]).encode()


def _decode(payload: bytes) -> list[Finding]:
    """The findings back from ``_encode``'s bytes.

    Example:
        >>> from lightning_validate.findings import make_finding
        >>> f = make_finding("LV301", module="grad mode", phase="train", boundary="on_train_batch_start",
        ...                  expected="grad enabled", seen="grad disabled")
        >>> _decode(_encode([f])) == [f]
        True

    """
    return [Finding(**fields) for fields in json.loads(payload)] if payload else []


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, by rank: its length first, then (if any rank has one) the padded bytes.

    Two small ``all_gather`` calls on tensors made here, each awaited and let go of by the backend before this
    returns (``released``). With no findings anywhere, one.
    """
    dist = torch.distributed
    device = _collective_device()
    world = dist.get_world_size()
    length = torch.tensor([len(payload)], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    released([length, *lengths])
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    if longest == 0:
        return [b""] * world
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        mine[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
    theirs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(theirs, mine)
    released([mine, *theirs])
    return [bytes(t[:n].tolist()) for t, n in zip(theirs, sizes, strict=True)]


def _collective_device() -> torch.device:
    """Where the default process group exchanges: the CPU under gloo (also beside NCCL), else this rank's GPU."""
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
