"""One evaluation loop run as ``ModeCheck`` sees it: baseline, marks, batch checks, end, restore and give-back.

An ``EvalRun`` starts right before Lightning's ``.eval()`` (the wrapped ``on_{stage}_model_eval``) with a baseline
snapshot, and ends after the LightningModule's ``on_{stage}_end``. It never touches Lightning: the callback passes
in the module and what the trainer says (the phase, whether DDP broadcasts buffers), and reports what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_validate.engine import (
    Globs,
    ModeIndex,
    Snapshot,
    check_eval_state,
    compare,
    give_back,
    initialised_buffers,
    take_snapshot,
)
from lightning_validate.findings import Finding
from lightning_validate.mode_check.attribution import Mark, attribute
from lightning_validate.mode_check.probe import ProbeCalls, probe_findings, record_first_calls, remove_hooks
from lightning_validate.mode_check.report import GivenBack, log
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["EvalRun"]


@dataclass
class EvalRun:
    """Bookkeeping of one evaluation loop run (a validation, the sanity check, a test or a predict run).

    Args:
        stage: ``VALIDATING``, ``TESTING`` or ``PREDICTING``: whose hooks run.
        phase: the running stage's value (the sanity check runs the validation hooks as ``"sanity_check"``).
        baseline: every submodule's mode, ``requires_grad`` and the content, right before ``.eval()``.
        index: the cached module list for the per-batch checks.
        allow_train_mode: submodules kept in train mode on purpose.
    """

    stage: RunningStage
    phase: str
    baseline: Snapshot
    index: ModeIndex
    allow_train_mode: Globs
    marks: list[Mark] = field(default_factory=list)
    batches: int = 0
    dirty: bool = False  # something may have changed since the last mark
    finished: bool = False
    probe_calls: ProbeCalls | None = None
    probe_handles: list[RemovableHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.marks:
            self.marks.append(Mark(self.baseline))

    def mark(self, module: nn.Module, before: str = "", after: str = "", trusted: bool = False) -> None:
        """Snapshot around an evaluation hook, so that a change is attributed to the hook that made it."""
        if self.finished or (before and not self.dirty):
            return  # nothing ran since the last mark: it is this hook's "before"
        self.marks.append(Mark(take_snapshot(module, content=True, grads=True), after, trusted, self.batches))
        self.dirty = False

    def check_batch(self, module: nn.Module, boundary: str, start: bool, allow_grad: bool,
                    probe: bool) -> list[Finding]:
        """Eval mode and grad off at a batch boundary; the probe's verdict at the first batch's end."""
        if start:
            self.dirty = True
            if self.batches == 0 and probe and not self.index.any_in_train_mode():
                # A submodule in train mode (LV101) would update its state if run again: no probe then.
                self.probe_calls = record_first_calls(module, self.probe_handles)
            self.batches += 1
        findings = check_eval_state(self.index, phase=self.phase, boundary=boundary, allow_grad=allow_grad)
        if not start and self.probe_calls is not None:
            findings += self._probe(module)
        return findings

    def finish(self, module: nn.Module, boundary: str, *, requires_grad: bool, buffers: bool,
               verbose: bool) -> list[Finding]:
        """Content (and ``requires_grad`` flags when asked) at the end of the evaluation against the baseline.

        Modes are still those of evaluation here; they are checked after the restore.
        """
        self.finished = True
        self.remove_probe()
        if self.dirty or len(self.marks) == 1:
            self.marks.append(Mark(take_snapshot(module, content=True, grads=True), batches=self.batches))
        end = self.marks[-1].snapshot
        if verbose:
            for name, was, now in initialised_buffers(self.baseline, end):
                log.info("ModeCheck: buffer `%s` was filled in on the first forward (shape %s -> %s): "
                          "initialisation, not reported", name, was, now)
        findings = compare(self.baseline, end, phase=self.phase, boundary=boundary, modes=False,
                           requires_grad=requires_grad, buffers=buffers, allow_train_mode=self.allow_train_mode)
        return attribute(self.marks, findings, self.phase, self.stage) if findings else findings

    def check_restore(self, module: nn.Module, owner: str) -> list[Finding]:
        """After the LightningModule's ``on_{stage}_model_train`` override: modes and flags as before ``.eval()``."""
        hook = f"on_{hook_word(self.stage)}_model_train"
        after = take_snapshot(module, content=False, grads=False)
        findings = compare(self.baseline, after, phase=self.phase, boundary=hook, structure=False,
                           allow_train_mode=self.allow_train_mode)
        detail = f"made by `{owner}.{hook}`"
        return [replace(f, detail="; ".join(x for x in (f.detail, detail) if x)) for f in findings]

    def give_back(self, module: nn.Module, grad_enabled: bool) -> GivenBack:
        """After an exception inside the evaluation: each submodule's mode, the flags and grad mode as before it."""
        self.remove_probe()
        self.finished = True
        modes, flags = give_back(module, self.baseline)
        grad = None
        if torch.is_grad_enabled() != grad_enabled:
            torch.set_grad_enabled(grad_enabled)
            grad = grad_enabled
        return GivenBack(modes, flags, grad)

    def remove_probe(self) -> None:
        """Remove the probe's hooks (idempotent)."""
        remove_hooks(self.probe_handles)
        self.probe_handles = []

    def _probe(self, module: nn.Module) -> list[Finding]:
        """Run each recorded call twice; differing outputs mean randomness in eval mode."""
        self.remove_probe()
        calls, self.probe_calls = self.probe_calls or {}, None
        if not calls:
            return []
        allowed = [m for n, m in zip(self.index.names, self.index.modules, strict=True)
                   if self.allow_train_mode.covers(n)]
        return probe_findings(module, calls, allowed, self.phase, self.stage)
