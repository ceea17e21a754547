"""The training side of one ``ModeCheck`` run: grad and modes at training batches, and the torchmetrics segments.

Kept apart from the callback so that the Lightning hooks stay one to three lines, as the evaluation side lives in
``EvalRun``. ``TrainingChecks`` knows the order of a training epoch (its first batch, a validation that interrupts
it, its end) and when the torchmetrics objects are read; the callback passes in the module, and the findings go to
the run's reporter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_validate.engine import Globs, ModeIndex, check_train_state
from lightning_validate.findings import Finding
from lightning_validate.mode_check.metric_tracking import MetricTracker
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["TrainingChecks"]


class TrainingChecks:
    """Training-batch checks (LV301, LV302) and the update-count bookkeeping of torchmetrics objects of one run.

    Args:
        report: receives the findings as they are found (it may raise).
        count: counts a boundary checked.
        phase: maps a stage to the finding's phase (``validate`` -> ``sanity_check`` in the sanity check).
        allow_eval_mode: submodules with trainable parameters kept in eval mode during training on purpose.

    Example:
        >>> from torch import nn
        >>> found, counted = [], []
        >>> checks = TrainingChecks(found.extend, counted.append, lambda s: s.value, Globs(()))
        >>> checks.start_epoch()
        >>> checks.check_batch(nn.Linear(2, 2).eval())
        >>> [f.code for f in found], counted[0]
        (['LV302'], 'on_train_batch_start')

    """

    def __init__(self, report: Callable[[Sequence[Finding]], None], count: Callable[[str], None],
                 phase: Callable[[RunningStage], str], allow_eval_mode: Globs) -> None:
        self.report = report
        self.count = count
        self.allow_eval_mode = allow_eval_mode
        self.metrics = MetricTracker(report, phase)
        self.epoch_first = False  # the next training batch is the first of its epoch
        self.reopen = False  # an evaluation interrupted the epoch: the metrics' train segment reopens at the next batch

    def start_epoch(self) -> None:
        """A training epoch starts: its first batch checks every submodule's mode (after the epoch-start hooks)."""
        self.epoch_first = True

    def check_batch(self, module: nn.Module) -> None:
        """At ``on_train_batch_start``: grad on; at the first batch of an epoch, no trainable submodule in eval mode."""
        self.count("on_train_batch_start")
        if self.epoch_first:
            self.epoch_first = self.reopen = False
            index = ModeIndex(module)
            self.report(check_train_state(index, boundary="on_train_batch_start (first of the epoch)",
                                          allow_eval_mode=self.allow_eval_mode))
            self.open_metrics(RunningStage.TRAINING, index, epoch_start=True)
            return
        if self.reopen:
            self.reopen = False
            self.open_metrics(RunningStage.TRAINING, None, epoch_start=False)
        if not torch.is_grad_enabled():  # the full walk only when something is wrong: batches stay cheap
            self.report(check_train_state(module, boundary="on_train_batch_start",
                                          allow_eval_mode=self.allow_eval_mode)[:1])

    def interrupt(self) -> None:
        """An evaluation starts inside ``fit``: the metrics' training segment ends here and reopens after it."""
        self.close_metrics(RunningStage.TRAINING, epoch_end=False)
        self.reopen = True

    def end_epoch(self) -> None:
        """A training epoch ends: the metrics' training segment closes for good."""
        self.close_metrics(RunningStage.TRAINING, epoch_end=True)

    def open_metrics(self, stage: RunningStage, index: ModeIndex | None, epoch_start: bool = True) -> None:
        """Record update counts when a stage's batches start; at an epoch's start, a count carried over is LV402."""
        if index is not None:  # metrics may be created late (in `setup` or `configure_model`): look again
            self.metrics.discover(index)
        self.count(f"metrics ({hook_word(stage)} start)")
        self.metrics.open(stage, epoch_start)

    def close_metrics(self, stage: RunningStage, epoch_end: bool) -> None:
        """Note which stage updated each metric since it opened; one object updated in two stages is LV401."""
        self.metrics.close(stage, epoch_end)
