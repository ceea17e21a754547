"""The mixin's state across a run and between runs: open epochs, ``metrics_history``, checkpoints, recovery.

A ``LightningModule`` keeps this in one plain attribute (not a submodule, so it never moves, saves or counts as
part of the model). ``RunState`` owns what outlives one epoch: the record of each ``fit`` epoch and how it travels
in checkpoints (also the values of a training epoch whose batches ran before a checkpoint written at validation
end), and the start and end of a run, which after a run that raised means dropping its unfinished epochs and giving
back the modes Lightning's ``.eval()`` left (``recovery.py``).

Example:
    >>> state = RunState()
    >>> state.pending.update({"val/loss": 0.5})
    >>> state.record_train_epoch(0, {"train/loss": 0.75})
    >>> state.history
    [{'epoch': 0.0, 'train/loss': 0.75, 'val/loss': 0.5}]
    >>> restored = RunState()
    >>> restored.restore({CHECKPOINT_KEY: state.checkpoint(model=None)})  # no training epoch open
    >>> restored.history == state.history
    True

"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from lightning_validate.metrics.records import SampleRecord
from lightning_validate.mixin import messages
from lightning_validate.mixin.epoch import Epoch
from lightning_validate.mixin.recovery import OpenEvaluation, give_back, modes, restored_message

__all__ = ["CHECKPOINT_KEY", "RunState"]

#: The checkpoint key under which the mixin keeps ``metrics_history``.
CHECKPOINT_KEY = "lightning_validate"


@dataclass
class RunState:
    """The mixin's run-time state, kept in one plain attribute of the LightningModule."""

    templates: dict[str, Metric] | None = None  # from configure_metrics(), cloned per stage and dataloader
    aside: dict[str, nn.ModuleDict] = field(default_factory=dict)  # clones not registered yet (see build.py)
    num_classes: int | None = None
    default_in_use: bool = False
    epochs: dict[str, Epoch] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=dict)  # this fit epoch's validation values, until it ends
    # Crash recovery (see recovery.py): a run is open from `setup` to `teardown`, which Lightning skips when a run
    # raises; the last evaluation's modes; the stages already warned about in this run.
    running: bool = False
    evaluation: OpenEvaluation | None = None
    warned: set[str] = field(default_factory=set)
    # The training values of the epoch a checkpoint was written in before that epoch closed (at validation end).
    resumed: dict[str, float] | None = None
    records: dict[tuple[str, int], SampleRecord] = field(default_factory=dict)  # the last epoch's, per dataloader

    def intervals_done(self, epoch: Epoch) -> None:
        """After an epoch's intervals: say once per run why some values have none; keep the per-sample records."""
        for text in epoch.interval_warnings():
            if text not in self.warned:
                self.warned.add(text)
                rank_zero_warn(text, category=UserWarning)
        for i, loader in enumerate(epoch.loaders):
            record = loader.intervals.record() if loader.intervals is not None else None
            if record is not None:
                self.records[(epoch.stage, i)] = record

    def record_of(self, stage: str, index: int) -> SampleRecord:
        """The record ``intervals_done`` kept for ``stage`` and dataloader ``index``."""
        found = self.records.get((stage, index))
        if found is None:
            raise RuntimeError(messages.no_record(stage, index, sorted(self.records)))
        return found

    def start(self, model: nn.Module) -> None:
        """Start a run clean, also after an earlier run on this model raised (Lightning then skips ``teardown``).

        The earlier run's unfinished epochs and pending values are dropped: they belong to no finished epoch and
        their bar is gone. If it raised during an evaluation, the model is still in the modes ``.eval()`` set
        (Lightning puts modes back only when an evaluation ends normally): they are given back, with one warning.
        """
        if self.running:
            self.epochs.clear()
            self.pending.clear()
            opened = self.evaluation
            if opened is not None:
                changed = give_back(model, opened)
                if changed:
                    message = restored_message(opened, changed, list(modes(model)), hide="lv_metrics")
                    rank_zero_warn(message, category=UserWarning)
        self.evaluation = None
        self.warned.clear()
        self.running = True

    def end(self) -> None:
        """Close a run that ended normally; an epoch still open was never logged (an end hook without super())."""
        for name in list(self.epochs):
            if name not in self.warned:
                rank_zero_warn(messages.never_logged(name, "last"), category=UserWarning)
        self.epochs.clear()
        self.pending.clear()
        self.evaluation = None
        self.running = False

    def evaluate(self, model: nn.Module, fn: str, hook: str, make_eval: Callable[[], None]) -> None:
        """Record the modes before and after ``make_eval`` (Lightning's ``.eval()``), for ``start``."""
        opened = OpenEvaluation(fn, hook, before=modes(model))
        self.evaluation = opened
        make_eval()
        opened.after = modes(model)

    def open(self, epoch: Epoch) -> None:
        """Keep ``epoch`` open until its end hook; one still open from before was never logged (said once a run)."""
        if epoch.stage in self.epochs and epoch.stage not in self.warned:
            self.warned.add(epoch.stage)
            rank_zero_warn(messages.never_logged(epoch.stage, "previous"), category=UserWarning)
        self.epochs[epoch.stage] = epoch

    def record_train_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        """Append a ``fit`` epoch's record: its training values and the validation values kept for it."""
        resumed, self.resumed = self.resumed, None
        if not values and resumed is not None and resumed["epoch"] == epoch:
            # Resumed from a checkpoint written at this epoch's validation end: its batches ran before the resume.
            values = {k: v for k, v in resumed.items() if k != "epoch"}
        record: dict[str, float] = {"epoch": float(epoch)}
        record.update(values)
        record.update(self.pending)
        self.pending.clear()
        if len(record) > 1:
            self.history.append(record)

    def finished_train_epoch(self, model: Any) -> dict[str, float] | None:
        """The values of a training epoch whose batches have all run but that has not closed yet, else ``None``.

        A checkpoint written at the end-of-epoch validation (``ModelCheckpoint`` saves there unless it saves at
        the training epoch's end) comes before ``on_train_epoch_end``; a run resumed from it does not run that
        epoch's batches again, so their values travel in the checkpoint. Under DDP this reduces across processes,
        as Lightning runs ``on_save_checkpoint`` on every process. Nothing is logged and no state is reset.
        """
        epoch = self.epochs.get("train")
        if epoch is None:  # no training epoch open (also: no trainer attached)
            return None
        trainer = model.trainer
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # a checkpoint inside the epoch
            return None
        values: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        values.update(epoch.finished_train_values(trainer, model.device))
        return values

    def checkpoint(self, model: Any) -> dict[str, Any]:
        """What a checkpoint of ``model`` keeps under ``CHECKPOINT_KEY``."""
        return {
            "metrics_history": [dict(record) for record in self.history],
            "pending": dict(self.pending),
            "open_epoch": self.finished_train_epoch(model),
        }

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore from a checkpoint; one written without the key (before 0.2) leaves the history as it is."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(saved, Mapping):
            return
        self.history = [dict(record) for record in saved.get("metrics_history", [])]
        self.pending = dict(saved.get("pending", {}))
        open_epoch = saved.get("open_epoch")
        self.resumed = dict(open_epoch) if open_epoch else None
