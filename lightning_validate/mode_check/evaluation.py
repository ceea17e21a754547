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
    not_state,
    take_snapshot,
)
from lightning_validate.findings import Finding
from lightning_validate.mode_check.attribution import Mark, attribute
from lightning_validate.mode_check.probe import ProbeCalls, probe_findings, record_first_calls, remove_hooks
from lightning_validate.mode_check.report import GivenBack, log
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["EvalRun"]


@dataclass(frozen=True)
class _Pending:
    """What the content comparison left for after the restore needs to know."""

    buffers: bool
    verbose: bool


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
    pending: _Pending | None = None  # the content comparison, left by `finish` for after the restore

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

    def finish(self, module: nn.Module, boundary: str, *, requires_grad: bool, buffers: bool, verbose: bool,
               after_restore: bool = False) -> list[Finding]:
        """Content (and ``requires_grad`` flags when asked) at the end of the evaluation against the baseline.

        Modes are still those of evaluation here; they are checked after the restore. With ``after_restore`` (the
        LightningModule overrides ``on_{stage}_model_train``) the content is compared after that override, in
        ``check_restore``: what counts is the model once it is given back, so a switch made for the evaluation
        (observers off in ``on_{stage}_model_eval``) and undone by the override is not a change.
        """
        self.finished = True
        self.remove_probe()
        if self.dirty or len(self.marks) == 1:
            # Also before a comparison left for the restore: a change seen there is then told from the override's.
            self.marks.append(Mark(take_snapshot(module, content=True, grads=True), batches=self.batches))
        if after_restore:
            self.pending = _Pending(buffers, verbose)
            return []
        return self._compare_content(self.marks[-1].snapshot, boundary, requires_grad=requires_grad, buffers=buffers,
                                     verbose=verbose)

    def finish_pending(self, boundary: str) -> list[Finding]:
        """The content comparison ``finish`` left for after the restore, when the restore hook never ran."""
        pending, self.pending = self.pending, None
        if pending is None:
            return []
        return self._compare_content(self.marks[-1].snapshot, boundary, requires_grad=False,
                                     buffers=pending.buffers, verbose=pending.verbose)

    def check_restore(self, module: nn.Module, owner: str) -> list[Finding]:
        """After the LightningModule's ``on_{stage}_model_train`` override: modes and flags as before ``.eval()``.

        And the content, when ``finish`` left it for now.
        """
        hook = f"on_{hook_word(self.stage)}_model_train"
        pending, self.pending = self.pending, None
        after = take_snapshot(module, content=pending is not None, grads=pending is not None)
        findings: list[Finding] = []
        if pending is not None:
            self.marks.append(Mark(after, f"{owner}.{hook}", False, self.batches))
            findings = self._compare_content(after, hook, requires_grad=False, buffers=pending.buffers,
                                             verbose=pending.verbose)
            after = replace(after, _fingerprint=None)  # content is compared: modes and flags only below
        restored = compare(self.baseline, after, phase=self.phase, boundary=hook, structure=False,
                           allow_train_mode=self.allow_train_mode)
        detail = f"made by `{owner}.{hook}`"
        return findings + [replace(f, detail="; ".join(x for x in (f.detail, detail) if x)) for f in restored]

    def _compare_content(self, end: Snapshot, boundary: str, *, requires_grad: bool, buffers: bool,
                         verbose: bool) -> list[Finding]:
        """Parameters, buffers, ``.grad``, structure (and flags) at ``end`` against the baseline, attributed."""
        if verbose and buffers:
            for item in not_state(self.baseline, end):
                log.info("ModeCheck: buffer `%s` %s, not reported", item.name, item.describe())
        findings = compare(self.baseline, end, phase=self.phase, boundary=boundary, modes=False,
                           requires_grad=requires_grad, buffers=buffers, allow_train_mode=self.allow_train_mode)
        return attribute(self.marks, findings, self.phase, self.stage) if findings else findings

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
