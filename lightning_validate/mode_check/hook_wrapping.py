"""Wrapping the LightningModule's and other callbacks' hooks for ``ModeCheck``, and putting them back exactly.

A callback never sees the state right before ``.eval()`` or between two other callbacks' hooks, so ``ModeCheck``
puts a wrapper around those hooks as instance attributes for the length of a run. Lightning's own callbacks are
sorted here into those whose documented work changes the model (trusted) and those that only read it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from lightning.pytorch.callbacks import Callback

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

    def uninstall(self) -> None:
        """Put back every wrapped attribute, innermost last, exactly as it was (also a user's own attribute)."""
        for owner, name, previous in reversed(self.installed):
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
        self.installed = []
