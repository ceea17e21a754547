"""Wrapping the LightningModule's and other callbacks' hooks for ``ModeCheck``, and putting them back exactly.

A callback never sees the state right before ``.eval()`` or between two other callbacks' hooks, so ``ModeCheck``
puts a wrapper around those hooks as instance attributes for the length of a run. Which hooks are wrapped, and what
runs before and after each, is decided here (``HookWrappers.install``); the callback only passes its checks in.
Lightning's own callbacks are sorted here into those whose documented work changes the model (trusted) and those
that only read it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_validate.stages import RunningStage, evaluation_stages, hook_word

__all__ = ["HookWrappers", "is_lightning_readonly", "trusted_callback_types"]

_WRAPPED = "__modecheck_wrapped__"
_MISSING = object()


def trusted_callback_types() -> tuple[type, ...]:
    """Lightning callbacks whose documented work changes the model inside evaluation hooks."""
    from lightning.pytorch import callbacks

    names = ("WeightAveraging", "StochasticWeightAveraging", "ModelPruning", "BaseFinetuning")
    return tuple(t for t in (getattr(callbacks, n, None) for n in names) if isinstance(t, type))


def is_lightning_readonly(cb: Callback) -> bool:
    """Lightning's own callbacks that only read the model (checkpointing, progress bars, monitors)."""
    module = type(cb).__module__
    return module.startswith("lightning.pytorch.callbacks") and type(cb).__name__ != "LambdaCallback"


class HookWrappers:
    """The wrappers installed during one run, each undone by ``uninstall``.

    Args:
        guard: runs the checks' own work for a hook name; an internal error disables the checks.
        disabled: whether the checks are disabled (then the wrappers only call the hook).
        sync: called after hooks wrapped with ``sync=True``, with the hook's name (DDP verdicts).
    """

    def __init__(self, guard: Callable[[str], AbstractContextManager[None]], disabled: Callable[[], bool],
                 sync: Callable[[str], None]) -> None:
        self.guard = guard
        self.disabled = disabled
        self.sync = sync
        self.installed: list[tuple[Any, str, object]] = []

    def wrap(self, owner: object, name: str, before: Callable[[], None] | None,
             after: Callable[[], None] | None, sync: bool = False) -> None:
        """Put a wrapper around ``owner.<name>`` as an instance attribute; several wrappers nest.

        The wrapper is a plain function (``copy.deepcopy`` shares it, so ``EMAWeightAveraging``'s copy of the module
        does not copy the callback). The user's hook runs unchanged and its exceptions pass through untouched.
        """
        original = getattr(owner, name)
        hooks = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None and not hooks.disabled():
                with hooks.guard(name):
                    before()
            out = original(*args, **kwargs)
            if after is not None and not hooks.disabled():
                with hooks.guard(name):
                    after()
            if sync:
                hooks.sync(name)
            return out

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(wrapper, _WRAPPED, True)
        self.installed.append((owner, name, owner.__dict__.get(name, _MISSING)))
        object.__setattr__(owner, name, wrapper)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fn: str, skip: Callback, *,
                begin_eval: Callable[[RunningStage], None], check_restore: Callable[[RunningStage], None],
                mark: Callable[[str, str, bool], None], finish_eval: Callable[[str], None]) -> set[RunningStage]:
        """Wrap the hooks of every evaluation stage of the trainer function ``fn``; the stages whose restore is hooked.

        - ``on_{stage}_model_eval``: ``begin_eval(stage)`` first, right before ``.eval()`` (the baseline), and when
          the LightningModule overrides it ``mark("", "Owner.on_{stage}_model_eval", False)`` after it;
        - ``on_{stage}_model_train`` when the LightningModule overrides it: ``check_restore(stage)`` after it;
        - the overridden ``on_{stage}_start``, ``..._epoch_start``, ``..._epoch_end`` and ``..._end`` of the other
          callbacks (``skip`` excepted, and Lightning's read-only ones) and of the LightningModule:
          ``mark(before, "", False)`` and ``mark("", after, trusted)`` around each, ``before``/``after`` being
          ``"Owner.hook"``;
        - the LightningModule's ``on_{stage}_end``: ``finish_eval("on_{stage}_end")`` after every other hook.
        """
        trusted = trusted_callback_types()
        callbacks: list[Callback] = getattr(trainer, "callbacks", [])
        owners: list[tuple[object, str, bool]] = [
            (cb, type(cb).__name__, isinstance(cb, trusted)) for cb in callbacks
            if cb is not skip and (isinstance(cb, trusted) or not is_lightning_readonly(cb))
        ]
        owners.append((pl_module, type(pl_module).__name__, False))
        restore_hooked: set[RunningStage] = set()
        for stage in evaluation_stages(fn):
            s = hook_word(stage)
            # An override may change the model after the baseline (observers switched off for the evaluation): a
            # mark after it tells such a change from the steps'.
            eval_hook = f"on_{s}_model_eval"
            after_eval = (functools.partial(mark, "", f"{type(pl_module).__name__}.{eval_hook}", False)
                          if is_overridden(eval_hook, pl_module) else None)
            self.wrap(pl_module, eval_hook, functools.partial(begin_eval, stage), after_eval)
            if stage is not RunningStage.PREDICTING and is_overridden(f"on_{s}_model_train", pl_module):
                restore_hooked.add(stage)
                self.wrap(pl_module, f"on_{s}_model_train", None, functools.partial(check_restore, stage), sync=True)
            for hook in (f"on_{s}_start", f"on_{s}_epoch_start", f"on_{s}_epoch_end", f"on_{s}_end"):
                for owner, name, is_trusted in owners:
                    parent = pl.LightningModule if owner is pl_module else Callback
                    if is_overridden(hook, owner, parent=parent):
                        label = f"{name}.{hook}"
                        self.wrap(owner, hook, functools.partial(mark, label, "", False),
                                  functools.partial(mark, "", label, is_trusted))
            # After the LightningModule's `on_{s}_end` every evaluation hook has run and logged metrics are not
            # reset yet: the end of the evaluation for content and metric counts.
            self.wrap(pl_module, f"on_{s}_end", None, functools.partial(finish_eval, f"on_{s}_end"), sync=True)
        return restore_hooked

    def uninstall(self) -> None:
        """Put back every wrapped attribute, innermost last, exactly as it was (also a user's own attribute)."""
        for owner, name, previous in reversed(self.installed):
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
        self.installed = []
