"""``ModeCheck``: a Lightning callback that checks mode and grad state at every phase boundary.

Lightning switches the model to eval mode and turns grad off for every evaluation, and puts back each submodule's
own mode afterwards; nothing checks that this really happened, or that evaluation gave the model back unchanged.
``ModeCheck`` does, for ``fit`` (with its sanity check), ``validate``, ``test`` and ``predict``. It is a thin adapter
over the plain-torch check engine (``lightning_validate.engine``).

Where each check runs (see the hook-order guide: a callback never sees the state just before ``.eval()``):

- The baseline is taken by wrapping the LightningModule's ``on_{stage}_model_eval`` hook: the state right before
  ``.eval()``, exactly what Lightning itself captures for its restore.
- Per batch (``on_*_batch_start`` / ``on_*_batch_end``): eval mode and grad off, from a cached module list
  (``engine.ModeIndex``, microseconds).
- At the end of each evaluation (after the LightningModule's ``on_{stage}_end``, before Lightning resets logged
  metrics): parameters, buffers and ``.grad`` against the baseline. Net changes only, so a callback that swaps
  weights in and back (``EMAWeightAveraging``) is not reported. The epoch-level evaluation hooks of other
  callbacks and of the LightningModule that are overridden are wrapped too, so a change is attributed to the hook
  that made it, and Lightning's own model-changing callbacks (weight averaging, pruning) are told apart from bugs.
- After the restore: if the LightningModule overrides ``on_{stage}_model_train``, the modes and ``requires_grad``
  flags right after that override against the baseline; otherwise Lightning restores each mode itself and the
  ``requires_grad`` flags are compared at the end of evaluation.
- Training: grad on at every ``on_train_batch_start``; no trainable submodule in eval mode at the first batch of
  each epoch (after ``on_train_epoch_start`` hooks such as ``BackboneFinetuning`` ran).
- torchmetrics objects (registered submodules): update counts are read when each epoch's first batch starts and
  when the epoch ends, to find one object updated in two stages or never reset.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_validate.engine import (
    Globs,
    ModeIndex,
    Snapshot,
    check_eval_state,
    check_train_state,
    compare,
    take_snapshot,
)
from lightning_validate.engine.names import glob_problem
from lightning_validate.findings import CODES, Finding, ModeCheckError, ModeCheckWarning, Policy
from lightning_validate.mode_check.attribution import Mark, attribute
from lightning_validate.mode_check.hook_wrapping import HookWrappers, is_lightning_readonly, trusted_callback_types
from lightning_validate.mode_check.metric_tracking import MetricTracker
from lightning_validate.mode_check.probe import ProbeCalls, probe_findings, record_first_calls, remove_hooks
from lightning_validate.mode_check.rank_agreement import agreed_error, share_findings
from lightning_validate.stages import RunningStage, evaluation_stages, hook_word

__all__ = ["ModeCheck"]

#: The summary goes through logging, never ``print``: an application or a test that patches ``print`` sees nothing
#: of it, and ``logging.getLogger("lightning_validate").setLevel(logging.WARNING)`` silences it. Configured as
#: Lightning configures its own logger: INFO to stderr unless the application configured logging itself.
_log = logging.getLogger("lightning_validate")
_log.setLevel(logging.INFO)
if not _log.handlers and not logging.getLogger().hasHandlers():
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False

_REPORT_VERSION = 1


@dataclass
class _EvalRun:
    """Bookkeeping of one evaluation loop run (a validation, the sanity check, a test or a predict run)."""

    stage: RunningStage  # VALIDATING, TESTING or PREDICTING: whose hooks run
    phase: str  # the running stage's value: the sanity check runs the validation hooks as "sanity_check"
    baseline: Snapshot
    index: ModeIndex
    marks: list[Mark] = field(default_factory=list)
    batches: int = 0
    dirty: bool = False  # something may have changed since the last mark
    finished: bool = False
    probe_calls: ProbeCalls | None = None
    probe_handles: list[RemovableHandle] = field(default_factory=list)


class ModeCheck(Callback):
    """Check mode and grad state at every phase boundary of ``fit``, ``validate``, ``test`` and ``predict``.

    Reports (codes documented in ``docs/codes.md``): a submodule in train mode or grad enabled during evaluation
    (LV101, LV102); a non-deterministic forward in eval mode with ``probe=True`` (LV103); parameters, buffers,
    ``requires_grad`` flags, ``.grad`` or submodules changed by evaluation (LV201-LV204, LV206); a submodule whose
    mode after evaluation is not what it was before (LV205); grad disabled or a trainable submodule in eval mode
    during training (LV301, LV302); a torchmetrics object updated in two stages or never reset (LV401, LV402).

    Each finding carries the submodule's qualified name and the fix. With ``on_violation="warn"`` each distinct
    finding is warned once (``ModeCheckWarning``, rank zero only); with ``"raise"`` the first one raises
    ``ModeCheckError``. Under DDP and FSDP every rank checks its own model (its own shard of each sharded parameter)
    and the ranks agree on the verdict at each evaluation end and each training epoch end: a finding of one rank is
    reported by all, with ``"raise"`` all of them raise together and none is left waiting.

    At the end of each run a summary is printed on rank zero (``verbose=False`` silences it) and, with
    ``report_path``, written as JSON::

        {"version": 1, "stage": "fit", "status": "finished",   # or "interrupted"
         "rank": 0, "world_size": 1,
         "boundaries_checked": {"on_validation_batch_start": 12, ...}, "total_boundaries": 40,
         "findings": [{"code": "LV205", "module": "backbone", "phase": "validation", "boundary": ..., "expected": ...,
                       "seen": ..., "fix": ..., "detail": ..., "title": ..., "message": ..., "count": 3}, ...]}

    The file is replaced at the end of every run; it is written by rank zero, or by every rank when the path contains
    ``{rank}`` (``"modecheck-{rank}.json"``).

    Args:
        on_violation: ``"warn"`` or ``"raise"``.
        allow_train_mode: qualified names or glob patterns of submodules kept in train mode during evaluation on
            purpose (MC dropout). They are not reported in train mode, their buffers may change, and ``probe``
            ignores their randomness.
        allow_eval_mode: qualified names or glob patterns of submodules with trainable parameters kept in eval mode
            during training on purpose (LV302).
        allow_grad: ``True``: grad enabled during evaluation is not reported (LV102).
        ignore: finding codes to silence, e.g. ``["LV402"]``.
        probe: run the first batch of each evaluation twice through the model (and its direct children), in eval
            mode without grad, and report outputs that differ (LV103). The random number generators are restored
            afterwards, so the probe does not change the run's randomness.
        report_path: where to write the JSON report, or ``None``.
        verbose: print the end-of-run summary.

    Attributes:
        findings: the distinct findings of every run of this callback (``fit`` then ``test`` keeps both runs'
            findings), first occurrence first. The summary and the JSON report cover the latest run.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_validate import ModeCheck
        >>> check = ModeCheck(on_violation="raise", allow_train_mode=["head.mc_dropout"])
        >>> trainer = pl.Trainer(callbacks=[check])  # doctest: +SKIP
        >>> ModeCheck(on_violation="warning")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `ModeCheck(on_violation='warning')` is not valid. Expected `on_violation` to be 'warn' or ...

    """

    def __init__(
        self,
        on_violation: Literal["warn", "raise"] = "warn",
        allow_train_mode: Sequence[str] = (),
        allow_eval_mode: Sequence[str] = (),
        allow_grad: bool = False,
        ignore: Sequence[str] = (),
        probe: bool = False,
        report_path: str | os.PathLike[str] | None = None,
        verbose: bool = True,
    ) -> None:
        given = {
            "on_violation": (on_violation, "warn"), "allow_train_mode": (allow_train_mode, ()),
            "allow_eval_mode": (allow_eval_mode, ()), "allow_grad": (allow_grad, False), "ignore": (ignore, ()),
            "probe": (probe, False), "report_path": (report_path, None), "verbose": (verbose, True),
        }
        problems: list[str] = []
        policy = Policy.parse(on_violation)
        if policy is None:
            problems.append(f"Expected `on_violation` to be 'warn' or 'raise' but got {on_violation!r}.")
        for arg in ("allow_train_mode", "allow_eval_mode"):
            problem = glob_problem(arg, given[arg][0])
            if problem is not None:
                problems.append(problem)
        for arg in ("allow_grad", "probe", "verbose"):
            if not isinstance(given[arg][0], bool):
                problems.append(f"Expected `{arg}` to be True or False but got {given[arg][0]!r}.")
        if isinstance(ignore, str) or not isinstance(ignore, Sequence):
            problems.append(f"Expected `ignore` to be a list of finding codes but got {ignore!r}"
                            + (f": write `ignore=[{ignore!r}]`." if isinstance(ignore, str) else "."))
        else:
            unknown = [c for c in ignore if c not in CODES]
            if unknown:
                problems.append(f"Unknown finding code(s) in `ignore`: {', '.join(map(repr, unknown))}. "
                                f"Valid codes: {', '.join(CODES)}.")
        if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
            problems.append(f"Expected `report_path` to be a file path (str or os.PathLike) or None but got "
                            f"{report_path!r}.")
        elif report_path is not None and Path(report_path).is_dir():
            problems.append(f"Expected `report_path` to be a file path but {str(report_path)!r} is a directory: "
                            f"`report_path={os.path.join(str(report_path), 'modecheck.json')!r}`.")
        if problems:
            call = ", ".join(f"{k}={v!r}" for k, (v, default) in given.items() if _differs(v, default))
            raise ValueError(f"`ModeCheck({call})` is not valid. " + " ".join(problems))

        assert policy is not None
        self.on_violation = on_violation
        self.policy = policy
        self.allow_train_mode = Globs(allow_train_mode)
        self.allow_eval_mode = Globs(allow_eval_mode)
        self.allow_grad = allow_grad
        self.ignore = frozenset(ignore)
        self.probe = probe
        self.report_path = report_path
        self.verbose = verbose

        self.findings: list[Finding] = []
        self._run_findings: list[Finding] = []
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._boundaries: Counter[str] = Counter()
        self._pending: list[Finding] = []
        self._fn = ""  # the trainer function of the run: fit, validate, test, predict
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._hooks = HookWrappers(self._guard, self._is_disabled, self._sync)
        self._disabled = False
        self._eval: _EvalRun | None = None
        self._restore_hooked: set[RunningStage] = set()
        self._train_epoch_first = False
        self._train_reopen = False
        self._metrics = MetricTracker(self._report, self._phase)
        self._index: ModeIndex | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks: one to three lines each, the work is in the helpers below.

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._start_run(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end_run(status="finished")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_run(status="interrupted")

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_pending_eval("on_sanity_check_end")
        self._sync("on_sanity_check_end")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_epoch_first = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_train_batch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_train_epoch()
        self._sync("on_train_epoch_end")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync("on_train_end")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_eval(RunningStage.VALIDATING, "on_validation_start")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_eval(RunningStage.TESTING, "on_test_start")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_eval(RunningStage.PREDICTING, "on_predict_start")

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_validation_batch_start", start=True)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_validation_batch_end", start=False)

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_test_batch_start", start=True)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_test_batch_end", start=False)

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_predict_batch_start", start=True)

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_eval_batch("on_predict_batch_end", start=False)

    # ----------------------------------------------------------------------------------------------------------
    # Run lifecycle

    def _start_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.uninstall()
        self._run_findings, self._counts, self._boundaries, self._pending = [], Counter(), Counter(), []
        self._fn, self._trainer, self._module = str(getattr(stage, "value", stage)), trainer, pl_module
        self._disabled, self._eval, self._restore_hooked = False, None, set()
        self._train_epoch_first = self._train_reopen = False
        self._metrics, self._index = MetricTracker(self._report, self._phase), None
        with self._guard("setup"):
            self._install(trainer, pl_module, self._fn)

    def _end_run(self, status: str) -> None:
        if self._trainer is None:  # hooks called twice (teardown after on_exception) or never set up
            return
        error: ModeCheckError | None = None
        if status == "finished" and not self._disabled:  # after an exception, the user's error is the one to see
            try:
                with self._guard("teardown"):
                    self._finish_pending_eval("teardown")
            except ModeCheckError as err:
                error = err
        self._hooks.uninstall()
        trainer, self._trainer, self._module, self._eval = self._trainer, None, None, None
        if self.report_path is not None:
            self._write_report(trainer, status if error is None else "interrupted")
        if self.verbose and status == "finished" and trainer.is_global_zero:
            _log_summary(self.summary())
        if error is not None:
            raise error

    def summary(self) -> str:
        """Describe the run so far: boundaries checked and findings by code, as a small table.

        Example:
            >>> print(ModeCheck().summary())
            ModeCheck: 0 boundaries checked, no findings.

        """
        total = sum(self._boundaries.values())
        where = f" ({self._fn})" if self._fn else ""
        if not self._run_findings:
            return f"ModeCheck{where}: {total} boundaries checked, no findings."
        by_code: dict[str, list[Finding]] = {}
        for f in self._run_findings:
            by_code.setdefault(f.code, []).append(f)
        rows = [("code", "title", "seen", "modules")]
        for code in sorted(by_code):
            fs = by_code[code]
            seen = sum(self._counts[f.key] for f in fs)
            modules = ", ".join(dict.fromkeys(f.module for f in fs))
            rows.append((code, CODES.get(code, ""), str(seen), modules if len(modules) <= 60 else modules[:57] + "..."))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"ModeCheck{where}: {total} boundaries checked, {len(self._run_findings)} distinct "
                 f"finding{'s' if len(self._run_findings) != 1 else ''}:"]
        for i, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if j != 2 else c.rjust(w) for j, (c, w) in
                                          enumerate(zip(row, widths, strict=True))).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _write_report(self, trainer: pl.Trainer, status: str) -> None:
        assert self.report_path is not None
        path = str(self.report_path)
        if "{rank}" in path:
            path = path.replace("{rank}", str(trainer.global_rank))
        elif not trainer.is_global_zero:
            return
        report = {
            "version": _REPORT_VERSION,
            "stage": self._fn,
            "status": status,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "boundaries_checked": dict(sorted(self._boundaries.items())),
            "total_boundaries": sum(self._boundaries.values()),
            "findings": [{**f.to_dict(), "count": self._counts[f.key]} for f in self._run_findings],
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------------------
    # Reporting

    def _report(self, findings: Sequence[Finding], shared: bool = False) -> None:
        for f in findings:
            if f.code in self.ignore:
                continue
            self._counts[f.key] += 1
            if self._counts[f.key] > 1:
                continue
            self._run_findings.append(f)
            known = any(g.key == f.key for g in self.findings)
            if not known:
                self.findings.append(f)
            if self.policy is Policy.WARN:
                if self._world_size() > 1 and not shared:
                    self._pending.append(f)  # told to the other ranks at the next `_sync`
                if known:  # warned in an earlier run of this callback: once per distinct finding
                    continue
                rank_zero_warn(f.message, category=ModeCheckWarning)
            elif self._world_size() > 1:
                self._pending.append(f)  # raised together with the other ranks at the next `_sync`
            else:
                raise ModeCheckError(f.message, [f])

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _sync(self, boundary: str) -> None:
        """Under DDP and FSDP: every rank learns every rank's findings; with ``"raise"`` all raise together.

        Called at boundaries that every rank passes in the same order, also after the callback disabled itself,
        so that no rank waits for a collective the others never join. Under sharding a write may touch one rank's
        shard only: the other ranks report it too (with ``"warn"``, rank zero prints it).
        """
        if self._trainer is None or self._world_size() <= 1:
            return
        mine, self._pending = self._pending, []
        shared = share_findings(mine)
        if self.policy is Policy.RAISE:
            error = agreed_error(mine, shared, boundary)
            if error is not None:
                raise error
        else:
            self._report([f for _, f in shared if f.key not in self._counts], shared=True)

    @contextmanager
    def _guard(self, where: str) -> Iterator[None]:
        """Run the callback's own bookkeeping; an internal error disables the checks instead of crashing training.

        The checks only read the model (the probe restores what it touches in ``finally`` blocks), so stopping them
        midway leaves the user's model and state as they were.
        """
        try:
            yield
        except ModeCheckError:
            raise
        except Exception as err:
            if self._disabled:
                return
            self._disabled = True
            if self._eval is not None:
                self._remove_probe(self._eval)
            self._eval = None
            rank_zero_warn(
                f"ModeCheck internal error in `{where}` ({type(err).__name__}: {err}); ModeCheck is disabled for the "
                "rest of this run. Your model and training are unaffected; please report this error.",
                category=ModeCheckWarning,
            )

    def _count(self, boundary: str) -> None:
        self._boundaries[boundary] += 1

    def _is_disabled(self) -> bool:
        return self._disabled

    # ----------------------------------------------------------------------------------------------------------
    # Wrapping the LightningModule's and other callbacks' hooks

    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fn: str) -> None:
        trusted, wrap = trusted_callback_types(), self._hooks.wrap
        for stage in evaluation_stages(fn):
            s = hook_word(stage)
            wrap(pl_module, f"on_{s}_model_eval", functools.partial(self._begin_eval, stage), None)
            if stage is not RunningStage.PREDICTING and is_overridden(f"on_{s}_model_train", pl_module):
                self._restore_hooked.add(stage)
                wrap(pl_module, f"on_{s}_model_train", None, functools.partial(self._check_restore, stage),
                     sync=True)
            callbacks: list[Callback] = getattr(trainer, "callbacks", [])
            owners: list[tuple[object, str, bool]] = [
                (cb, type(cb).__name__, isinstance(cb, trusted)) for cb in callbacks
                if cb is not self and (isinstance(cb, trusted) or not is_lightning_readonly(cb))
            ]
            owners.append((pl_module, type(pl_module).__name__, False))
            for hook in (f"on_{s}_start", f"on_{s}_epoch_start", f"on_{s}_epoch_end", f"on_{s}_end"):
                for owner, name, is_trusted in owners:
                    parent = pl.LightningModule if owner is pl_module else Callback
                    if is_overridden(hook, owner, parent=parent):
                        label = f"{name}.{hook}"
                        wrap(owner, hook, functools.partial(self._mark, before=label),
                             functools.partial(self._mark, after=label, trusted=is_trusted))
            # After the LightningModule's `on_{s}_end` every evaluation hook has run and logged metrics are not
            # reset yet: the end of the evaluation for content and metric counts.
            wrap(pl_module, f"on_{s}_end", None, functools.partial(self._finish_eval, f"on_{s}_end"), sync=True)

    # ----------------------------------------------------------------------------------------------------------
    # Evaluation

    def _phase(self, stage: RunningStage) -> str:
        """The phase of findings: the running stage's value (the sanity check runs the validation hooks)."""
        if stage is RunningStage.VALIDATING and self._trainer is not None and self._trainer.sanity_checking:
            return RunningStage.SANITY_CHECKING.value
        return stage.value

    def _begin_eval(self, stage: RunningStage, boundary: str = "") -> None:
        """Baseline: every submodule's mode, ``requires_grad``, and the content, right before ``.eval()``."""
        assert self._module is not None
        # A validation inside fit interrupts the training epoch: the metrics' train segment ends here.
        self._metrics_close(RunningStage.TRAINING, epoch_end=False)
        self._train_reopen = True
        baseline = take_snapshot(self._module, content=True, grads=True)
        index = self._index
        if index is None or index.model is not self._module or index.names != list(baseline.modes):
            index = self._index = ModeIndex(self._module, self.allow_train_mode)  # the structure changed: walk again
        self._eval = _EvalRun(stage, self._phase(stage), baseline, index, [Mark(baseline)])
        self._count(boundary or f"on_{hook_word(stage)}_model_eval")

    def _ensure_eval(self, stage: RunningStage, boundary: str) -> None:
        """Fallback baseline when the ``on_{stage}_model_eval`` wrapper did not run (the hook was replaced)."""
        with self._guard(boundary):
            if self._eval is None or self._eval.finished or self._eval.stage != stage:
                self._begin_eval(stage, boundary)

    def _mark(self, before: str = "", after: str = "", trusted: bool = False) -> None:
        run = self._eval
        if run is None or run.finished or self._module is None:
            return
        if before and not run.dirty:
            return  # nothing ran since the last mark: it is this hook's "before"
        run.marks.append(Mark(take_snapshot(self._module, content=True, grads=True), after, trusted, run.batches))
        run.dirty = False

    def _check_eval_batch(self, boundary: str, start: bool) -> None:
        if self._disabled:
            return
        with self._guard(boundary):
            run = self._eval
            if run is None or run.finished:
                return
            if start:
                run.dirty = True
                if run.batches == 0:
                    self._metrics_open(run.stage, run.index)
                    if self.probe:
                        self._probe_capture(run)
                run.batches += 1
            self._count(boundary)
            findings = check_eval_state(run.index, phase=run.phase, boundary=boundary, allow_grad=self.allow_grad)
            if not start and run.probe_calls is not None:
                findings += self._probe_run(run)
            self._report(findings)

    def _finish_eval(self, boundary: str) -> None:
        """End of an evaluation: compare content (and ``requires_grad`` without a restore override) to the baseline."""
        run = self._eval
        if run is None or run.finished or self._module is None:
            return
        run.finished = True
        self._remove_probe(run)
        if run.dirty or len(run.marks) == 1:
            run.marks.append(Mark(take_snapshot(self._module, content=True, grads=True), batches=run.batches))
        self._count(boundary)
        # Modes are still those of evaluation here (checked after the restore); requires_grad flags too when the
        # LightningModule overrides the restore hook (they are compared right after it instead).
        findings = compare(run.baseline, run.marks[-1].snapshot, phase=run.phase, boundary=boundary, modes=False,
                           requires_grad=run.stage not in self._restore_hooked, buffers=not self._buffers_broadcast(),
                           allow_train_mode=self.allow_train_mode)
        if findings:
            findings = attribute(run.marks, findings, run.phase, run.stage)
        self._metrics_close(run.stage, epoch_end=True)
        self._report(findings)

    def _buffers_broadcast(self) -> bool:
        """Whether DDP overwrites this rank's buffers with rank zero's at every forward (``broadcast_buffers``).

        BatchNorm statistics then legitimately change during evaluation on every rank but zero, which keeps its
        own: buffer changes are checked on rank zero only.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or trainer.global_rank == 0:
            return False
        return bool(getattr(trainer.model, "broadcast_buffers", False))

    def _finish_pending_eval(self, boundary: str) -> None:
        if self._eval is not None and not self._eval.finished:
            self._finish_eval(boundary)

    def _check_restore(self, stage: RunningStage) -> None:
        """After the LightningModule's ``on_{stage}_model_train`` override: modes and flags as before ``.eval()``."""
        run = self._eval
        if run is None or self._module is None:
            return
        hook = f"on_{hook_word(stage)}_model_train"
        self._count(hook)
        after = take_snapshot(self._module, content=False, grads=False)
        findings = compare(run.baseline, after, phase=run.phase, boundary=hook, structure=False,
                           allow_train_mode=self.allow_train_mode)
        detail = f"made by `{type(self._module).__name__}.{hook}`"
        self._report([replace(f, detail="; ".join(x for x in (f.detail, detail) if x)) for f in findings])

    # ----------------------------------------------------------------------------------------------------------
    # Probe (LV103)

    def _probe_capture(self, run: _EvalRun) -> None:
        """Record the first call of the LightningModule and of each direct child during the first batch."""
        assert self._module is not None
        if run.index.any_in_train_mode():
            return  # a submodule in train mode (reported as LV101) would update its state if run again
        run.probe_calls = record_first_calls(self._module, run.probe_handles)

    def _remove_probe(self, run: _EvalRun) -> None:
        remove_hooks(run.probe_handles)
        run.probe_handles = []

    def _probe_run(self, run: _EvalRun) -> list[Finding]:
        """Run each recorded call twice; differing outputs mean randomness in eval mode."""
        self._remove_probe(run)
        calls, run.probe_calls = run.probe_calls or {}, None
        if not calls or self._module is None:
            return []
        self._count("probe")
        allowed = [m for n, m in zip(run.index.names, run.index.modules, strict=True)
                   if self.allow_train_mode.covers(n)]
        return probe_findings(calls, allowed, run.phase, run.stage)

    # ----------------------------------------------------------------------------------------------------------
    # Training

    def _check_train_batch(self) -> None:
        if self._disabled or self._module is None:
            return
        with self._guard("on_train_batch_start"):
            self._count("on_train_batch_start")
            if self._train_epoch_first:
                self._train_epoch_first = self._train_reopen = False
                index = ModeIndex(self._module)
                self._report(check_train_state(index, boundary="on_train_batch_start (first of the epoch)",
                                               allow_eval_mode=self.allow_eval_mode))
                self._metrics_open(RunningStage.TRAINING, index, epoch_start=True)
                return
            if self._train_reopen:
                self._train_reopen = False
                self._metrics_open(RunningStage.TRAINING, None, epoch_start=False)
            if not torch.is_grad_enabled():
                self._report(check_train_state(self._module, boundary="on_train_batch_start",
                                               allow_eval_mode=self.allow_eval_mode)[:1])

    def _close_train_epoch(self) -> None:
        if self._disabled:
            return
        with self._guard("on_train_epoch_end"):
            self._finish_pending_eval("on_train_epoch_end")
            self._metrics_close(RunningStage.TRAINING, epoch_end=True)

    # ----------------------------------------------------------------------------------------------------------
    # torchmetrics objects (LV401, LV402)

    def _metrics_open(self, stage: RunningStage, index: ModeIndex | None, epoch_start: bool = True) -> None:
        """Record update counts when a stage's batches start; at an epoch's start, a count carried over is LV402."""
        if index is not None:  # metrics may be created late (in `setup` or `configure_model`): look again
            self._metrics.discover(index)
        self._count(f"metrics ({hook_word(stage)} start)")
        self._metrics.open(stage, epoch_start)

    def _metrics_close(self, stage: RunningStage, epoch_end: bool) -> None:
        """Note which stage updated each metric since it opened; one object updated in two stages is LV401."""
        self._metrics.close(stage, epoch_end)


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _differs(value: object, default: object) -> bool:
    try:
        return bool(value != default)
    except Exception:  # an argument whose `!=` is not a plain bool (an array): show it
        return True


@rank_zero_only
def _log_summary(text: str) -> None:
    _log.info(text)
