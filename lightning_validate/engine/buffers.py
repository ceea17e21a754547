"""What a buffer is to the checks: state, a placeholder, a cache, or parameters derived from other buffers.

A buffer is *state* when the model keeps it from one call to the next as a record of the data it saw: BatchNorm's
running statistics, a quantization observer's ranges, a counter. Evaluation must leave state unchanged (LV202). Three
kinds of change are not a change of state, and ``compare`` does not report them:

- **a placeholder filled in**: a buffer that held nothing yet (all zeros, no elements, or a single element) replaced
  by one of another shape, as the first forward computes it (timm's ConViT table of relative positions; a
  fake-quantization ``scale`` of shape ``(1,)`` resized to one value per channel);
- **a cache rebuilt**: a non-persistent buffer (``persistent=False``: not in the ``state_dict``, so no checkpoint
  holds it) replaced by one of another shape (rotary cos/sin tables grown for a longer sequence, a causal mask or an
  ALiBi bias rebuilt larger);
- **quantization parameters recomputed**: a fake-quantization module's ``scale`` and ``zero_point`` are computed
  from its observer's statistics; while those are unchanged (or only filled in), so is what the model learned.

The shape is the evidence: a statistic keeps its shape from one update to the next, while a table or a mask computed
for an input takes the input's size. A change that keeps the shape is reported, also of a non-persistent buffer.

The roles recorded here also pick the fix a finding gives: a BatchNorm, a quantization observer, a cache.

Example:
    >>> import torch
    >>> from lightning_validate.engine.snapshot import take_snapshot
    >>> net = torch.nn.Module()
    >>> net.register_buffer("cos", torch.ones(4, 2), persistent=False)
    >>> before = take_snapshot(net)
    >>> net.cos = torch.ones(8, 2)  # rebuilt for a longer sequence
    >>> [n.describe() for n in not_state(before, take_snapshot(net))]
    ['was rebuilt with another shape ((4, 2) -> (8, 2)): a non-persistent cache']

"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from lightning_validate.engine.fingerprint import same

if TYPE_CHECKING:
    from lightning_validate.engine.snapshot import Snapshot

__all__ = ["NotState", "fix_variant", "initialised_buffers", "not_state", "record_buffers"]

Role = Literal["norm", "observer", "fake_quant"]

#: The on/off flags of ``torch.ao.quantization`` fake-quantization modules (``_LearnableFakeQuantize`` adds two).
_TOGGLES = frozenset({"observer_enabled", "fake_quant_enabled", "static_enabled", "learning_enabled"})

#: The quantization parameters a fake-quantization module computes from its observer's statistics.
_QPARAMS = ("scale", "zero_point")


def _quantization_types() -> tuple[type | None, type | None]:
    """``torch.ao.quantization``'s ``ObserverBase`` and ``FakeQuantizeBase``, from the modules torch has loaded.

    Nothing is imported here (``torch`` loads both modules itself today); a build without them has no observers.
    """
    observer = getattr(sys.modules.get("torch.ao.quantization.observer"), "ObserverBase", None)
    fake_quant = getattr(sys.modules.get("torch.ao.quantization.fake_quantize"), "FakeQuantizeBase", None)
    return (observer if isinstance(observer, type) else None, fake_quant if isinstance(fake_quant, type) else None)


def record_buffers(modules: Mapping[str, nn.Module]) -> tuple[dict[str, Role], frozenset[str]]:
    """The roles of the modules that own buffers, and the names of the non-persistent buffers.

    Only modules that own buffers are looked at; the others cost one dictionary lookup each.

    Returns:
        ``(roles, non_persistent)``: module name -> ``"norm"`` (BatchNorm, InstanceNorm), ``"observer"`` or
        ``"fake_quant"`` (``torch.ao.quantization``), and the qualified names of non-persistent buffers.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
        >>> net.register_buffer("mask", torch.ones(2), persistent=False)
        >>> record_buffers(dict(net.named_modules()))
        ({'0': 'norm'}, frozenset({'mask'}))

    """
    observer, fake_quant = _quantization_types()
    roles: dict[str, Role] = {}
    non_persistent: set[str] = set()
    for name, module in modules.items():
        if not module._buffers:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase):
            roles[name] = "norm"
        elif fake_quant is not None and isinstance(module, fake_quant):
            roles[name] = "fake_quant"
        elif observer is not None and isinstance(module, observer):
            roles[name] = "observer"
        if module._non_persistent_buffers_set:
            prefix = name + "." if name else ""
            non_persistent.update(prefix + b for b in module._non_persistent_buffers_set if b in module._buffers)
    return roles, frozenset(non_persistent)


@dataclass(frozen=True)
class NotState:
    """A buffer that changed without a change of state, and why.

    Attributes:
        name: the buffer's qualified name.
        reason: ``"placeholder"`` (filled in), ``"cache"`` (a non-persistent buffer rebuilt with another shape) or
            ``"qparams"`` (fake-quantization parameters recomputed from unchanged observer statistics).
        before: its shape before.
        after: its shape after.

    """

    name: str
    reason: Literal["placeholder", "cache", "qparams"]
    before: tuple[int, ...]
    after: tuple[int, ...]

    def describe(self) -> str:
        """What happened to the buffer, for an info line: ``"was rebuilt with another shape (...)"``."""
        if self.reason == "placeholder":
            return f"was filled in on the first forward (shape {self.before} -> {self.after}): initialisation"
        if self.reason == "cache":
            return f"was rebuilt with another shape ({self.before} -> {self.after}): a non-persistent cache"
        return "was recomputed from its observer's unchanged statistics: fake-quantization parameters"


def not_state(before: Snapshot, after: Snapshot, changed: Iterable[str] | None = None) -> list[NotState]:
    """The buffers that changed between two snapshots without a change of state (see the module's docstring).

    Args:
        before: the earlier snapshot.
        after: the later snapshot.
        changed: the buffers whose content differs, when the caller knows them; by default they are found from the
            fingerprints (one synchronization per device).

    Returns:
        One ``NotState`` per such buffer, in the order of ``changed``; empty without content fingerprints.

    """
    if not before.has_content or not after.has_content:
        return []
    fb = before.fingerprints()
    if changed is None:
        fa = after.fingerprints()
        changed = [n for k, n in fb if k == "buffer" and ("buffer", n) in fa
                   and not same(fb[("buffer", n)], fa[("buffer", n)])]
    names = list(changed)
    if not names:
        return []
    out: dict[str, NotState] = {}
    for name in names:
        was, now = before.buffer_shapes.get(name), after.buffer_shapes.get(name)
        if was is None or now is None or was == now:
            continue
        if _placeholder(was, fb.get(("buffer", name), (0.0, 0.0))):
            out[name] = NotState(name, "placeholder", was, now)
        elif name in after.non_persistent or name in before.non_persistent:
            out[name] = NotState(name, "cache", was, now)
    # A fake-quantization module's qparams follow its observer (its submodule): when nothing the observer holds is
    # reported, the qparams are what that observer's statistics give, not something evaluation taught the model.
    reported = [n for n in names if n not in out]
    for module, role in after.roles.items():
        if role != "fake_quant":
            continue
        prefix = module + "." if module else ""
        if any(n.startswith(prefix) and "." in n[len(prefix):] for n in reported):
            continue
        for key in _QPARAMS:
            name = prefix + key
            if name in reported:
                out[name] = NotState(name, "qparams", before.buffer_shapes.get(name, ()),
                                     after.buffer_shapes.get(name, ()))
    return [out[n] for n in names if n in out]


def _placeholder(shape: tuple[int, ...], fingerprint: tuple[float, float]) -> bool:
    """A buffer that holds nothing yet: all zeros, no elements, or a single element (``torch.tensor([1.0])``)."""
    elements = 1
    for size in shape:
        elements *= size
    return elements <= 1 or fingerprint == (0.0, 0.0)


def initialised_buffers(before: Snapshot, after: Snapshot) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Buffers that a first forward filled in: a placeholder replaced by a buffer of another shape.

    The placeholder held nothing yet: zeros, no elements, or a single element. Such a buffer is initialisation, not a
    change evaluation made to the model's state: a fixed table (relative positions, a mask) or a per-channel tensor
    computed on the first forward. ``not_state`` gives these and the other changes that are not state.

    Returns:
        ``(name, shape before, shape after)`` for each such buffer; comparing content synchronizes once per device.

    Example:
        >>> import torch
        >>> from lightning_validate.engine.snapshot import take_snapshot
        >>> net = torch.nn.Module()
        >>> net.register_buffer("table", torch.zeros(1, 1, 3))
        >>> before = take_snapshot(net)
        >>> net.table = torch.ones(1, 4, 3)
        >>> initialised_buffers(before, take_snapshot(net))
        [('table', (1, 1, 3), (1, 4, 3))]

    """
    return [(n.name, n.before, n.after) for n in not_state(before, after) if n.reason == "placeholder"]


def fix_variant(members: Sequence[str], snapshot: Snapshot, kind: str = "buffer") -> str:
    """The fix that fits the changed tensors ``members`` (one finding): named by what owns them.

    Args:
        members: qualified names of the changed parameters or buffers that one finding covers.
        snapshot: a snapshot with the roles (``take_snapshot(content=True)``).
        kind: ``"buffer"`` or ``"param"``.

    Returns:
        ``"norm"`` (BatchNorm statistics), ``"observer"`` (a quantization observer), ``"quant_toggle"`` (a
        fake-quantization on/off flag), ``"cache"`` (non-persistent buffers) or ``""`` (the general fix). Parameters
        get ``"observer"`` or ``""``.

    """
    if not members:
        return ""
    roles = [snapshot.roles.get(n.rpartition(".")[0]) for n in members]
    if all(r in ("observer", "fake_quant") for r in roles):
        if kind == "buffer" and all(n.rpartition(".")[2] in _TOGGLES for n in members):
            return "quant_toggle"
        return "observer"
    if kind != "buffer":
        return ""
    if all(r == "norm" for r in roles):
        return "norm"
    if all(n in snapshot.non_persistent and "." in n for n in members):  # the root module cannot be allowed
        return "cache"
    return ""
