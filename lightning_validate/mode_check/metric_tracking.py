"""torchmetrics bookkeeping behind ``ModeCheck`` (LV401, LV402).

Each torchmetrics object registered in the model has its update count read when a stage's batches start and when
they end: an object updated in two stages is LV401. A count carried over from the previous epoch (never reset) is
LV402 only when the stale state is read: ``compute()`` at the epoch's end over updates of more than one epoch.
Logging the per-step value of ``metric(preds, target)`` never reads the accumulated state, so it is not reported
(``Metric.forward`` leaves ``_computed`` empty; ``compute()`` fills it until the next update or reset).
torchmetrics is looked up in ``sys.modules`` only, so nothing here imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_validate.engine import ModeIndex
from lightning_validate.findings import Finding, make_finding
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["MetricTrack", "MetricTracker", "is_metric", "update_count", "was_read"]


def is_metric(module: nn.Module) -> bool:
    """Whether ``module`` is a torchmetrics ``Metric`` (``False`` when torchmetrics was never imported)."""
    metric = sys.modules.get("torchmetrics")
    return metric is not None and isinstance(module, metric.Metric)


def was_read(metric: nn.Module) -> bool:
    """Whether ``compute()`` read the accumulated state since the last update or reset (its cached value is set).

    ``Metric.forward`` computes the batch value on a temporary state and clears the cache afterwards, so the
    per-step pattern ``self.log("acc", self.acc(preds, y))`` does not count as a read.
    """
    return getattr(metric, "_computed", None) is not None


def update_count(metric: nn.Module) -> int:
    """The number of ``update`` calls since the metric's last reset (``Metric.update_count``)."""
    count = getattr(metric, "update_count", 0)
    return count if isinstance(count, int) else 0


@dataclass
class MetricTrack:
    """Update counts of one torchmetrics object at segment and epoch boundaries."""

    opened_at: int = 0
    open_stage: RunningStage | None = None
    stages: set[RunningStage] = field(default_factory=set)
    last_stage: RunningStage | None = None  # the stage that updated it last
    closed_at: int = 0  # update count when the last epoch that updated it ended
    moved_since_close: bool = False
    carried: int = 0  # updates carried over from the previous epoch when this epoch opened (0: none)
    carried_in: RunningStage | None = None  # the stage of that epoch


class MetricTracker:
    """The torchmetrics objects of one run, with their update counts at each stage's start and end.

    Args:
        report: receives the findings as they are found (it may raise).
        phase: maps a stage to the finding's phase (``validate`` -> ``sanity_check`` in the sanity check).
    """

    def __init__(self, report: Callable[[Sequence[Finding]], None], phase: Callable[[RunningStage], str]) -> None:
        self.report = report
        self.phase = phase
        self.tracks: dict[str, MetricTrack] = {}
        self.objects: dict[str, nn.Module] = {}
        self.index: ModeIndex | None = None

    def discover(self, index: ModeIndex) -> None:
        """Find the outermost torchmetrics objects among the indexed submodules (again only for a new index)."""
        if index is self.index:
            return
        self.index = index
        found: dict[str, nn.Module] = {}
        inside: list[str] = []
        for name, module in zip(index.names, index.modules, strict=True):
            if is_metric(module) and not any(name.startswith(p + ".") for p in inside):
                found[name] = module
                inside.append(name)
        self.objects = found
        for name in found:
            self.tracks.setdefault(name, MetricTrack())

    def open(self, stage: RunningStage, epoch_start: bool = True) -> None:
        """Record update counts when a stage's batches start, and at an epoch's start a count carried over."""
        for name, metric in self.objects.items():
            track, count = self.tracks[name], update_count(metric)
            if epoch_start:
                carried = count > 0 and count == track.closed_at and not track.moved_since_close
                track.carried = count if carried and track.last_stage == stage else 0
                track.carried_in = stage
            track.opened_at, track.open_stage = count, stage

    def close(self, stage: RunningStage, epoch_end: bool) -> None:
        """Note which stage updated each metric since it opened; one object updated in two stages is LV401."""
        for name, metric in self.objects.items():
            track, count = self.tracks[name], update_count(metric)
            if track.open_stage == stage and count != track.opened_at and count > 0:
                track.stages.add(stage)
                track.last_stage, track.moved_since_close = stage, True
                if len(track.stages) > 1:
                    stages = " and ".join(sorted(hook_word(s) for s in track.stages))
                    self.report([make_finding(
                        "LV401", module=name, phase=self.phase(stage), boundary=f"end of {hook_word(stage)}",
                        expected="one metric object per stage", seen=f"the same object updated in {stages}", name=name,
                    )])
            # Closed at the epoch's end, after the epoch-end hooks that compute: the stale state was read or not.
            if epoch_end and track.carried and track.carried_in == stage and was_read(metric):
                self.report([make_finding(
                    "LV402", module=name, phase=self.phase(stage), boundary=f"end of {hook_word(stage)}",
                    expected="the update count back at 0 (reset) at the start of each epoch",
                    seen=f"`compute()` read {count} updates, {track.carried} of them carried over from the previous "
                         "epoch", name=name,
                )])
            if epoch_end and track.carried_in == stage:
                track.carried = 0
            track.open_stage = None
            if epoch_end and track.last_stage == stage:
                track.closed_at, track.moved_since_close = count, False
