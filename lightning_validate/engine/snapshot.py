"""Snapshots: the state of a module at one moment (modes, grad mode, ``requires_grad``, content fingerprints).

Example:
    >>> import torch
    >>> s = take_snapshot(torch.nn.Sequential(torch.nn.Linear(1, 1)).eval())
    >>> s.modes, s.grad_enabled
    ({'': False, '0': False}, True)

"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_validate.engine.buffers import Role, record_buffers
from lightning_validate.engine.fingerprint import Fingerprint, dtensor_type, is_sharded
from lightning_validate.engine.names import class_name, unwrap, walk
from lightning_validate.findings import display_name

__all__ = ["Snapshot", "give_back", "take_snapshot"]


@dataclass(eq=False)
class Snapshot:
    """The state of a module at one moment, for ``compare``. Build it with ``take_snapshot``.

    Attributes:
        modes: qualified submodule name -> ``training`` flag (the root is ``""``).
        types: qualified submodule name -> class name, for messages.
        grad_enabled: ``torch.is_grad_enabled()`` when taken.
        inference_mode: ``torch.is_inference_mode_enabled()`` when taken.
        requires_grad: parameter name -> ``requires_grad``.
        has_grad: parameter name -> whether ``.grad`` was set (``None`` when grads were not recorded).
        sharded: names of the parameters that were sharded (``DTensor``) when taken. FSDP2 swaps them for whole
            tensors, without ``.grad``, around a forward: their ``.grad`` is compared only between equal layouts.
        buffer_shapes: buffer name -> shape (recorded with content), to tell initialisation from a change.
        roles: submodule name -> what it is, for the submodules whose buffers have a role of their own: ``"norm"``
            (BatchNorm), ``"observer"`` or ``"fake_quant"`` (``torch.ao.quantization``). Recorded with content.
        non_persistent: names of the non-persistent buffers (not in the ``state_dict``). Recorded with content.

    """

    modes: dict[str, bool]
    types: dict[str, str]
    grad_enabled: bool
    inference_mode: bool
    requires_grad: dict[str, bool]
    has_grad: dict[str, bool] | None
    sharded: frozenset[str] = frozenset()
    _fingerprint: Fingerprint | None = None
    buffer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    non_persistent: frozenset[str] = frozenset()

    @property
    def has_content(self) -> bool:
        """Whether parameter, buffer and grad contents were fingerprinted."""
        return self._fingerprint is not None

    def fingerprints(self) -> dict[tuple[str, str], tuple[float, float]]:
        """``(kind, name) -> (sum, norm)`` for every fingerprinted tensor; synchronizes once per device."""
        return self._fingerprint.values() if self._fingerprint is not None else {}

    def describe(self, name: str) -> str:
        """``"backbone.bn1 (BatchNorm2d)"``: a submodule's display name with its class."""
        cls = self.types.get(name)
        return f"{display_name(name)} ({cls})" if cls else display_name(name)


def take_snapshot(model: nn.Module, *, content: bool = True, grads: bool = True) -> Snapshot:
    """Record a module's modes, grad mode, ``requires_grad`` flags and (optionally) content fingerprints.

    Wrappers (``torch.compile``, DDP, FSDP, Lightning's strategy wrappers) are looked through, and wrapper segments
    are removed from names, so snapshots of the wrapped and the bare model compare equal. Sharded parameters and
    buffers (``DTensor``) are fingerprinted by this rank's local shard.

    Args:
        model: the module to record.
        content: fingerprint parameters and buffers (and ``.grad`` when ``grads``). Without it only flags are kept.
        grads: record which parameters have ``.grad`` and, with ``content``, fingerprint the grads.

    Returns:
        The snapshot. Taking it never synchronizes with a GPU.

    Example:
        >>> s = take_snapshot(torch.nn.Sequential(torch.nn.Linear(1, 1)).eval())
        >>> s.modes, s.requires_grad
        ({'': False, '0': False}, {'0.weight': True, '0.bias': True})

    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be a torch.nn.Module but got {type(model).__name__}: "
            "`take_snapshot(model)` with the model itself."
        )
    modules, params, buffers = walk(unwrap(model))
    modes = {n: bool(m.training) for n, m in modules.items()}
    types = {n: class_name(m) for n, m in modules.items()}
    requires_grad = {n: bool(p.requires_grad) for n, p in params}
    has_grad = {n: p.grad is not None for n, p in params} if grads else None
    dtensor = dtensor_type()
    sharded = frozenset(n for n, p in params if is_sharded(p, dtensor)) if dtensor is not None else frozenset()
    fp = None
    if content:
        named: list[tuple[str, str, Tensor]] = [("param", n, p) for n, p in params]
        named += [("buffer", n, b) for n, b in buffers]
        if grads:
            named += [("grad", n, p.grad) for n, p in params if p.grad is not None]
        fp = Fingerprint.of(named)
    shapes = {n: tuple(b.shape) for n, b in buffers} if content else {}
    roles, non_persistent = record_buffers(modules) if content else ({}, frozenset[str]())
    return Snapshot(
        modes=modes,
        types=types,
        grad_enabled=torch.is_grad_enabled(),
        inference_mode=torch.is_inference_mode_enabled(),
        requires_grad=requires_grad,
        has_grad=has_grad,
        sharded=sharded,
        _fingerprint=fp,
        buffer_shapes=shapes,
        roles=roles,
        non_persistent=non_persistent,
    )


def give_back(model: nn.Module, snapshot: Snapshot) -> tuple[list[str], list[str]]:
    """Set each submodule's own mode and each parameter's ``requires_grad`` back to those of ``snapshot``.

    Only the flags are set, submodule by submodule (``module.train()`` would recurse and overwrite the children's
    own modes). Submodules and parameters that no longer exist are skipped.

    Returns:
        The submodules whose mode and the parameters whose flag were set back.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout())
        >>> before = take_snapshot(net, content=False)
        >>> _ = net.eval()
        >>> give_back(net, before), net.training
        ((['', '0', '1'], []), True)

    """
    modules, params, _ = walk(unwrap(model))
    modes = []
    for name, module in modules.items():
        want = snapshot.modes.get(name)
        if want is not None and module.training != want:
            module.training = want
            modes.append(name)
    flags = []
    for name, p in params:
        want = snapshot.requires_grad.get(name)
        if want is not None and p.requires_grad != want and p.is_leaf:
            p.requires_grad_(want)
            flags.append(name)
    return modes, flags
