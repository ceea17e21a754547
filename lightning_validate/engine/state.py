"""Checking a state, cheap enough for every batch.

Eval mode and grad off during evaluation (LV101, LV102); grad on and trainable submodules in train mode during
training (LV301, LV302).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1))
    >>> [f.code for f in check_eval_state(net, phase="evaluating", boundary="start")]
    ['LV101', 'LV102']

"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_validate.engine.names import (
    Globs,
    ancestors,
    class_name,
    covers,
    group,
    named_modules,
    unwrap,
    walk,
)
from lightning_validate.findings import Finding, display_name, make_finding

__all__ = ["ModeIndex", "check_eval_state", "check_train_state"]


class ModeIndex:
    """Submodules of a model, listed once, for cheap repeated mode checks.

    Walking ``named_modules()`` costs about a millisecond per thousand modules; reading ``.training`` from a cached
    list costs a few microseconds per hundred. Build the index at a phase boundary, query it per batch.

    Args:
        model: the model (wrappers are looked through).
        allow_train_mode: names or glob patterns of submodules that may stay in train mode during evaluation.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout()).eval()
        >>> index = ModeIndex(net)
        >>> net[1].train(); index.in_train_mode()
        Dropout(p=0.5, inplace=False)
        ['1']

    """

    def __init__(self, model: nn.Module, allow_train_mode: Sequence[str] = ()) -> None:
        allowed = Globs.parse("allow_train_mode", allow_train_mode)
        self.model = unwrap(model)
        by_name = named_modules(self.model)
        self.names = list(by_name)
        self.modules = list(by_name.values())
        self.types = {n: class_name(m) for n, m in by_name.items()}
        self.by_name = by_name
        #: The submodules checked for eval mode: every one but the allowlisted.
        self.checked = [(n, m) for n, m in by_name.items() if not allowed.covers(n)]
        self._param_owners: list[tuple[Tensor, list[str]]] | None = None
        self.num_modules = len(by_name)

    def trainable_modules(self) -> set[str]:
        """Name the submodules that hold, themselves or through a descendant, a trainable parameter.

        The ``requires_grad`` flags are read now: they may have changed since the index was built.
        """
        if self._param_owners is None:
            _, params, _ = walk(self.model)
            self._param_owners = [(p, ancestors(n.rpartition(".")[0])) for n, p in params]
        out: set[str] = set()
        for p, owners in self._param_owners:
            if p.requires_grad:
                out.update(owners)
        return out

    def in_train_mode(self) -> list[str]:
        """Names of the submodules in train mode, allowlisted ones excluded."""
        return [n for n, m in self.checked if m.training]

    def any_in_train_mode(self) -> bool:
        """Fast path: ``True`` when any checked submodule is in train mode."""
        return any(m.training for _, m in self.checked)

    def overrides_train(self, name: str) -> bool:
        """Whether the submodule's class overrides ``train()``: the usual reason ``.eval()`` leaves it in train mode.

        Only the class is inspected; calling the override from a check could have side effects on the user's model.
        """
        module = self.by_name.get(name)
        return module is not None and type(module).train is not nn.Module.train


def check_eval_state(
    model: nn.Module | ModeIndex,
    *,
    phase: str,
    boundary: str,
    allow_train_mode: Sequence[str] = (),
    allow_grad: bool = False,
) -> list[Finding]:
    """Check that every submodule is in eval mode and grad is off (codes LV101, LV102).

    Args:
        model: the model, or a ``ModeIndex`` of it for repeated checks (its own allowlist applies).
        phase: where this is checked (``"evaluating"``, or a Lightning running stage).
        boundary: the point within the phase.
        allow_train_mode: names or glob patterns of submodules kept in train mode on purpose (MC dropout); ignored
            when a ``ModeIndex`` is given.
        allow_grad: do not report enabled grad.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1)).eval()
        >>> check_eval_state(net, phase="evaluating", boundary="start", allow_grad=True)
        []

    """
    index = model if isinstance(model, ModeIndex) else ModeIndex(model, allow_train_mode)
    findings: list[Finding] = []
    if index.any_in_train_mode():
        for name, count in group(index.in_train_mode(), index.names):
            cls = index.types.get(name, "")
            why = " (its class overrides `train()`: check that it honors `mode`)" if index.overrides_train(name) else ""
            findings.append(make_finding(
                "LV101", module=display_name(name), phase=phase, boundary=boundary, expected="eval mode",
                seen=f"{display_name(name)}{f' ({cls})' if cls else ''} in train mode{why}",
                detail=covers(count, "submodules"),
            ))
    if torch.is_grad_enabled() and not allow_grad:
        findings.append(make_finding(
            "LV102", module="grad mode", phase=phase, boundary=boundary,
            expected="grad disabled (`torch.no_grad()` or `torch.inference_mode()`)", seen="grad enabled",
        ))
    return findings


def check_train_state(
    model: nn.Module | ModeIndex,
    *,
    boundary: str,
    phase: str = "train",
    allow_eval_mode: Sequence[str] = (),
) -> list[Finding]:
    """Check the state during training: grad enabled (LV301), no trainable submodule in eval mode (LV302).

    A submodule in eval mode is reported when it or a descendant holds a parameter with ``requires_grad=True``:
    a pretrained backbone loaded in eval mode trains with dropout off and BatchNorm frozen. A frozen backbone
    (eval mode and ``requires_grad=False``) is not reported.

    Args:
        model: the model or a ``ModeIndex`` of it.
        boundary: the point within training.
        phase: reported phase name.
        allow_eval_mode: names or glob patterns of submodules kept in eval mode on purpose.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1)).eval()
        >>> [f.code + " " + f.module for f in check_train_state(net, boundary="on_train_batch_start")]
        ['LV302 <model>']

    """
    index = model if isinstance(model, ModeIndex) else ModeIndex(model)
    allowed = Globs.parse("allow_eval_mode", allow_eval_mode)
    findings: list[Finding] = []
    if not torch.is_grad_enabled():
        findings.append(make_finding("LV301", module="grad mode", phase=phase, boundary=boundary,
                                     expected="grad enabled", seen="grad disabled"))
    in_eval = [n for n, m in zip(index.names, index.modules, strict=True) if not m.training]
    if not in_eval:
        return findings
    trainable_under = index.trainable_modules()
    suspects = [n for n in in_eval if n in trainable_under and not allowed.covers(n)]
    for name, count in group(suspects, [n for n in index.names if n in trainable_under]):
        cls = index.types.get(name, "")
        findings.append(make_finding(
            "LV302", module=display_name(name), phase=phase, boundary=boundary,
            expected="train mode (it has trainable parameters)",
            seen=f"{display_name(name)}{f' ({cls})' if cls else ''} in eval mode", detail=covers(count, "submodules"),
        ))
    return findings
