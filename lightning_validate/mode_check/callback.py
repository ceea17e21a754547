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
- After the restore: if the LightningModule overrides ``on_{stage}_model_train``, the modes, ``requires_grad``
  flags and content right after that override against the baseline (the content then, not at the end of
  evaluation: what counts is the model as it is given back, so observers switched off for evaluation and on again
  there are no change); otherwise Lightning restores each mode itself and the ``requires_grad`` flags are compared
  at the end of evaluation.
- Training: grad on at every ``on_train_batch_start``; no trainable submodule in eval mode at the first batch of
  each epoch (after ``on_train_epoch_start`` hooks such as ``BackboneFinetuning`` ran).
- torchmetrics objects (registered submodules): update counts are read when each epoch's first batch starts and
  when the epoch ends, to find one object updated in two stages, or a state carried over from the previous epoch
  that ``compute()`` read at the epoch's end (never reset).
- An exception inside an evaluation (``on_exception``, ``KeyboardInterrupt`` included): the model is given back
  from the baseline (each submodule's mode, ``requires_grad``, grad mode), and the run ends as interrupted.

The work is in the per-run objects (``EvalRun``, ``TrainingChecks``, ``Reporter``) and ``HookWrappers``; this class
holds the run's state and routes each hook to one of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_validate.engine import Globs, ModeIndex, take_snapshot
from lightning_validate.findings import Finding, ModeCheckError, ModeCheckWarning
from lightning_validate.mode_check.arguments import parse_arguments
from lightning_validate.mode_check.evaluation import EvalRun
from lightning_validate.mode_check.hook_wrapping import HookWrappers
from lightning_validate.mode_check.rank_agreement import buffers_broadcast
from lightning_validate.mode_check.report import RunReport
from lightning_validate.mode_check.reporting import Reporter
from lightning_validate.mode_check.training import TrainingChecks
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["ModeCheck"]

#: The trainer stages inside an evaluation loop: an exception there leaves the model in eval mode.
_EVALUATING = frozenset({RunningStage.VALIDATING, RunningStage.SANITY_CHECKING, RunningStage.TESTING,
                         RunningStage.PREDICTING})


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

    When an exception interrupts an evaluation (``KeyboardInterrupt`` included), ``ModeCheck`` gives the model back
    as it was before that evaluation: each submodule's own mode, the ``requires_grad`` flags and the grad mode.
    Lightning itself restores modes only when an evaluation ends normally. The exception propagates unchanged.

    At the end of each run, also an interrupted one, a summary is logged on rank zero through the
    ``lightning_validate`` logger (never ``print``; ``verbose=False`` silences it) and, with ``report_path``,
    written as JSON::

        {"version": 2, "stage": "fit", "status": "finished",   # or "interrupted"
         "interrupted_by": null,  # or the exception's type, e.g. "KeyboardInterrupt"
         "given_back": null,  # or {"modes": [...], "requires_grad": [...], "grad_enabled": null}
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
        verbose: log the end-of-run summary (and info lines such as a buffer filled in on the first forward or a
            cache rebuilt with another shape, which are not reported).

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
        self.policy = parse_arguments(
            on_violation=on_violation, allow_train_mode=allow_train_mode, allow_eval_mode=allow_eval_mode,
            allow_grad=allow_grad, ignore=ignore, probe=probe, report_path=report_path, verbose=verbose,
        )
        self.on_violation = on_violation
        self.allow_train_mode = Globs(allow_train_mode)
        self.allow_eval_mode = Globs(allow_eval_mode)
        self.allow_grad = allow_grad
        self.ignore = frozenset(ignore)
        self.probe = probe
        self.report_path = report_path
        self.verbose = verbose

        self.findings: list[Finding] = []
        self._hooks = HookWrappers(self._guard, self._is_disabled, self._sync)
        self._new_run(None, None, "")

    def _new_run(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule | None, fn: str) -> None:
        """Fresh per-run state: the report, the reporting policy, the training side; no evaluation yet."""
        self._run = RunReport(fn)  # the latest run: its findings, counts and boundaries
        self._reporter = Reporter(self.policy, self.ignore, self.findings, self._run, self._world_size)
        self._train = TrainingChecks(self._reporter.report, self._count, self._phase, self.allow_eval_mode)
        self._trainer, self._module = trainer, pl_module
        self._grad_enabled = torch.is_grad_enabled()  # the grad mode when the run started: given back after an error
        self._disabled = False
        self._eval: EvalRun | None = None
        self._restore_hooked: set[RunningStage] = set()
        self._index: ModeIndex | None = None  # the per-batch module list, kept while the structure does not change

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
        self._give_back(trainer, exception)
        self._end_run(status="interrupted")

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_eval("on_sanity_check_end")
        self._sync("on_sanity_check_end")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train.start_epoch()

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
        self._new_run(trainer, pl_module, str(getattr(stage, "value", stage)))
        with self._guard("setup"):
            self._restore_hooked = self._hooks.install(
                trainer, pl_module, self._run.fn, self, begin_eval=self._begin_eval, check_restore=self._check_restore,
                mark=self._mark, finish_eval=self._finish_eval)

    def _give_back(self, trainer: pl.Trainer, exception: BaseException) -> None:
        """After an exception inside an evaluation: the model as it was before that evaluation began.

        Lightning restores each submodule's mode only when an evaluation ends normally, so after a crash the next
        ``fit`` on the same object would train with dropout off and BatchNorm frozen. Never raises: the user's
        exception is the one that propagates.
        """
        self._run.interrupted_by = type(exception).__name__
        run, module = self._eval, self._module
        if run is None or module is None or trainer.state.stage not in _EVALUATING:
            return
        try:
            self._run.given_back = run.give_back(module, self._grad_enabled)
        except Exception as err:  # a model that cannot be walked any more: say so, keep the user's exception
            rank_zero_warn(f"ModeCheck could not give the model back after `{type(exception).__name__}` "
                           f"({type(err).__name__}: {err}); put it back with `model.train()` before training again.",
                           category=ModeCheckWarning)

    def _end_run(self, status: str) -> None:
        if self._trainer is None:  # hooks called twice (teardown after on_exception) or never set up
            return
        error: ModeCheckError | None = None
        if status == "finished" and not self._disabled:  # after an exception, the user's error is the one to see
            try:
                with self._guard("teardown"):
                    self._finish_eval("teardown")
            except ModeCheckError as err:
                error = err
        self._hooks.uninstall()
        if self._eval is not None:
            self._eval.remove_probe()
        trainer, self._trainer, self._module, self._eval = self._trainer, None, None, None
        self._run.close(status, error)
        self._run.publish(self.report_path, trainer.global_rank, trainer.world_size,
                          summary=self.verbose and trainer.is_global_zero)
        if error is not None:
            raise error

    def summary(self) -> str:
        """Describe the latest run: boundaries checked, findings by code, and whether it was interrupted.

        Example:
            >>> print(ModeCheck().summary())
            ModeCheck: 0 boundaries checked, no findings.

        """
        return self._run.summary()

    # ----------------------------------------------------------------------------------------------------------
    # Reporting: the policy is the run's `Reporter`

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _sync(self, boundary: str) -> None:
        """Under DDP and FSDP: every rank learns every rank's findings; with ``"raise"`` all raise together.

        Called at boundaries that every rank passes in the same order, also after the callback disabled itself,
        so that no rank waits for a collective the others never join (``Reporter.sync``).
        """
        if self._trainer is not None:
            self._reporter.sync(boundary)

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
                self._eval.remove_probe()
            self._eval = None
            rank_zero_warn(
                f"ModeCheck internal error in `{where}` ({type(err).__name__}: {err}); ModeCheck is disabled for the "
                "rest of this run. Your model and training are unaffected; please report this error.",
                category=ModeCheckWarning,
            )

    def _count(self, boundary: str) -> None:
        self._run.boundaries[boundary] += 1

    def _is_disabled(self) -> bool:
        return self._disabled

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
        self._train.interrupt()  # a validation inside fit interrupts the training epoch
        baseline = take_snapshot(self._module, content=True, grads=True)
        index = self._index
        if index is None or index.model is not self._module or index.names != list(baseline.modes):
            index = self._index = ModeIndex(self._module, self.allow_train_mode)  # the structure changed: walk again
        self._eval = EvalRun(stage, self._phase(stage), baseline, index, self.allow_train_mode)
        self._count(boundary or f"on_{hook_word(stage)}_model_eval")

    def _ensure_eval(self, stage: RunningStage, boundary: str) -> None:
        """Fallback baseline when the ``on_{stage}_model_eval`` wrapper did not run (the hook was replaced)."""
        with self._guard(boundary):
            if self._eval is None or self._eval.finished or self._eval.stage != stage:
                self._begin_eval(stage, boundary)

    def _mark(self, before: str = "", after: str = "", trusted: bool = False) -> None:
        if self._eval is not None and self._module is not None:
            self._eval.mark(self._module, before, after, trusted)

    def _check_eval_batch(self, boundary: str, start: bool) -> None:
        if self._disabled:
            return
        with self._guard(boundary):
            run = self._eval
            if run is None or run.finished or self._module is None:
                return
            if start and run.batches == 0:
                self._train.open_metrics(run.stage, run.index)
            self._count(boundary)
            if not start and run.probe_calls is not None:
                self._count("probe")
            self._reporter.report(run.check_batch(self._module, boundary, start, self.allow_grad, self.probe))

    def _finish_eval(self, boundary: str) -> None:
        """End of an evaluation: compare content (and ``requires_grad`` without a restore override) to the baseline."""
        run = self._eval
        if run is None or self._module is None:
            return
        if run.finished:  # a content comparison left for the restore hook, which never ran
            self._reporter.report(run.finish_pending(boundary))
            return
        self._count(boundary)
        # With a restore override, the content, requires_grad flags and modes are compared right after it: the
        # model as it is given back.
        hooked = run.stage in self._restore_hooked
        findings = run.finish(self._module, boundary, requires_grad=not hooked,
                              buffers=not buffers_broadcast(self._trainer), verbose=self.verbose, after_restore=hooked)
        self._train.close_metrics(run.stage, epoch_end=True)
        self._reporter.report(findings)

    def _check_restore(self, stage: RunningStage) -> None:
        """After the LightningModule's ``on_{stage}_model_train`` override: modes and flags as before ``.eval()``."""
        run = self._eval
        if run is None or self._module is None:
            return
        self._count(f"on_{hook_word(stage)}_model_train")
        self._reporter.report(run.check_restore(self._module, type(self._module).__name__))

    # ----------------------------------------------------------------------------------------------------------
    # Training: the checks are the run's `TrainingChecks`

    def _check_train_batch(self) -> None:
        if not self._disabled and self._module is not None:
            with self._guard("on_train_batch_start"):
                self._train.check_batch(self._module)

    def _close_train_epoch(self) -> None:
        if not self._disabled:
            with self._guard("on_train_epoch_end"):
                self._finish_eval("on_train_epoch_end")
                self._train.end_epoch()
