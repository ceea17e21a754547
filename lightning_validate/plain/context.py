"""``evaluating()``: eval mode and grad off for a block, and the model given back exactly as it came.

The usual hand-written loop calls ``model.eval()`` and, at the end, ``model.train()``. The second call un-freezes
every submodule the user had put in eval on purpose (a frozen BatchNorm backbone), and neither runs when a batch
raises. ``evaluating()`` records each submodule's own ``training`` flag and assigns it back on exit, also on an
exception.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> _ = model[1].eval()  # frozen on purpose
    >>> with evaluating(model):
    ...     _ = model(torch.randn(3, 2))
    >>> model.training, model[1].training  # the frozen layer stays frozen
    (True, False)

"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from lightning_validate.engine import (
    Globs,
    ModeIndex,
    check_eval_state,
    compare,
    not_state,
    take_snapshot,
    unwrap,
)
from lightning_validate.findings import PLAIN, Finding, ModeCheckError, ModeCheckWarning, Policy

__all__ = ["evaluating"]

_log = logging.getLogger("lightning_validate")

Check = bool | Literal["warn", "raise"]


def _policy(check: object) -> Policy | None:
    if check is False or check is None:
        return None
    policy = Policy.WARN if check is True else Policy.parse(check)
    if policy is None:
        raise ValueError(f"`evaluating(check={check!r})` is not valid. Expected False, True, 'warn' or 'raise'.")
    return policy


@contextlib.contextmanager
def evaluating(
    model: nn.Module,
    *,
    inference_mode: bool = False,
    check: Check = False,
    allow_train_mode: Sequence[str] = (),
) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and turn grad off for the block; restore both on exit.

    On exit, also when the block raises, each submodule gets back its own ``training`` flag (assigned, not set by
    calling ``.train()``, so a ``train()`` override cannot un-freeze anything) and grad mode is what it was.
    Nesting works: the inner block restores the outer block's state. A submodule whose ``train(mode)`` override
    ignores ``mode`` is put in eval mode directly (and reported as LV101 with ``check``).

    Args:
        model: the module to evaluate (a ``torch.compile``d or DDP-wrapped module is fine).
        inference_mode: use ``torch.inference_mode()`` instead of ``torch.no_grad()``. Faster, but tensors created
            inside cannot be used for autograd later.
        check: ``True`` or ``"warn"``: on a normal exit, warn (``ModeCheckWarning``) if the block changed
            parameters, buffers (BatchNorm statistics), ``requires_grad`` flags or ``.grad``, or left a submodule in
            train mode; ``"raise"``: raise ``ModeCheckError`` instead. The model is restored first either way.
        allow_train_mode: with ``check``, names or glob patterns of submodules the block may put in train mode on
            purpose (their buffers may change too).

    Yields:
        The model, for ``with evaluating(model) as m:``.

    Raises:
        TypeError: if ``model`` is not a ``torch.nn.Module``.
        TypeError: if ``inference_mode`` is not a bool or ``allow_train_mode`` is not a list of patterns.
        ValueError: if ``check`` is not one of the accepted values.
        ModeCheckError: with ``check="raise"``, when the block changed the model.

    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`evaluating(model)` expected a torch.nn.Module but got {type(model).__name__}. "
            "Pass the model itself: `with evaluating(model): ...`."
        )
    if not isinstance(inference_mode, bool):
        raise TypeError(f"`evaluating(inference_mode={inference_mode!r})` is not valid. Expected True or False.")
    policy = _policy(check)
    allowed = Globs.parse("allow_train_mode", allow_train_mode)
    inner = unwrap(model)
    # The wrappers' own flags too (DDP, OptimizedModule): `model.eval()` below sets them.
    modes = [(m, m.training) for m in model.modules()]
    before = take_snapshot(inner, grads=True) if policy is not None else None
    grad_ctx = torch.inference_mode() if inference_mode else torch.no_grad()
    findings: list[Finding] = []
    try:
        with grad_ctx:
            model.eval()
            findings += _force_eval(inner, allowed, report=policy is not None)
            yield model
            # Checked inside the block's own grad context, before anything is restored: what the block saw. Grad is
            # ours to manage here, so only the modes are checked.
            if policy is not None:
                findings += check_eval_state(inner, phase=PLAIN, boundary="end", allow_train_mode=allowed,
                                             allow_grad=True)
    finally:
        for module, flag in modes:
            module.training = flag
    if before is not None and policy is not None:
        after = take_snapshot(inner, grads=True)
        findings += compare(before, after, phase=PLAIN, boundary="end", allow_train_mode=allowed)
        for item in not_state(before, after):
            _log.info("evaluating(): buffer `%s` %s, not reported", item.name, item.describe())
        _report(findings, policy)


def _force_eval(model: nn.Module, allowed: Globs, *, report: bool) -> list[Finding]:
    """Put in eval mode the submodules whose ``train(mode)`` override ignored ``mode`` in ``model.eval()``.

    Allowlisted submodules (MC dropout kept in train on purpose) are left as they are. With ``report``, the
    override is reported (LV101 at the start) so that its owner can fix it; evaluation is correct either way.
    """
    if not any(m.training for m in model.modules()):
        return []
    index = ModeIndex(model, allowed)
    findings = check_eval_state(index, phase=PLAIN, boundary="start", allow_grad=True) if report else []
    for _, module in index.checked:
        module.training = False
    return findings


def _report(findings: list[Finding], policy: Policy) -> None:
    if not findings:
        return
    if policy is Policy.RAISE:
        raise ModeCheckError(
            "evaluating() found that the block broke a rule of evaluation:\n"
            + "\n".join(f"  {f.message}" for f in findings),
            findings,
        )
    for f in findings:
        warnings.warn(f.message, ModeCheckWarning, stacklevel=4)
