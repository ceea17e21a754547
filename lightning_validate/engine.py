"""The check engine: snapshot a module's state, compare two snapshots, check a state, return findings.

Plain torch, no Lightning: ``ModeCheck``, ``evaluating()`` and ``validate()`` are thin adapters over it.

A ``Snapshot`` records every submodule's ``training`` flag by qualified name, the grad mode, each parameter's
``requires_grad``, and a content fingerprint of every parameter, buffer and ``.grad``. The fingerprint is computed
from the values (a float64 sum and a float64 L2 norm per tensor; a position-weighted sum instead of the norm for
integer and bool tensors), not from ``tensor._version``: writes through ``.data`` and native BatchNorm running-stat
updates do not bump version counters. The fingerprint stays on the tensors' device until two snapshots are
compared, so taking a snapshot never synchronizes with a GPU, and a comparison copies both snapshots' fingerprints
to the host at once: one synchronization per device.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> before = take_snapshot(model)
    >>> _ = model(torch.randn(4, 2))  # train mode: BatchNorm updates its running statistics
    >>> for f in compare(before, take_snapshot(model), phase="evaluating"):
    ...     print(f.code, f.module, f.seen)
    LV202 1 3 buffers changed

"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_validate.findings import Finding

__all__ = [
    "ModeIndex",
    "Snapshot",
    "attribute_path",
    "check_eval_state",
    "check_train_state",
    "compare",
    "display_name",
    "matches_any",
    "take_snapshot",
    "unwrap",
]

#: Attribute segments that wrappers insert into qualified names; removed so that names stay those of the user's
#: model whether it is compiled, wrapped by FSDP or activation checkpointing.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

ROOT = "<model>"


def unwrap(model: nn.Module) -> nn.Module:
    """Return the user's module inside ``torch.compile``, DDP/DataParallel and Lightning strategy wrappers.

    Example:
        >>> net = torch.nn.Linear(1, 1)
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True

    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner: object = model.__dict__.get("_modules", {}).get("_orig_mod")  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if inner is None:  # Lightning's wrappers (Fabric's _FabricModule, _LightningModuleWrapperBase) keep it here
            inner = model.__dict__.get("_modules", {}).get("_forward_module")
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _clean(name: str) -> str:
    if "_orig_mod" not in name and "_wrapped_module" not in name:  # the common case, checked cheaply
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map each cleaned qualified name to its submodule.

    A compiled submodule appears twice (wrapper, then the module it wraps) under one cleaned name: the wrapped
    module, listed second, wins.
    """
    return {_clean(n): m for n, m in model.named_modules()}


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """Submodules, parameters and buffers in one walk (three ``named_*`` walks cost three times as much).

    Shared parameters and buffers are listed once, under their first name, as ``named_parameters()`` does.
    """
    modules = _named_modules(model)
    params: list[tuple[str, Tensor]] = []
    buffers: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for name, module in modules.items():
        prefix = name + "." if name else ""
        for out, members in ((params, module._parameters), (buffers, module._buffers)):
            for key, t in members.items():
                if t is not None:
                    i = id(t)
                    if i not in seen:
                        seen.add(i)
                        out.append((prefix + key, t))
    return modules, params, buffers


def _patterns(argument: str, patterns: Sequence[str]) -> Sequence[str]:
    """Validate a list of glob patterns: a bare string would silently be read as one pattern per character."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"Expected argument `{argument}` to be a list of glob patterns but got {patterns!r}: "
            f"`{argument}=[{patterns!r}]`" if isinstance(patterns, str) else
            f"Expected argument `{argument}` to be a list of glob patterns (str) but got {list(patterns)!r}."
        )
    return tuple(patterns)


def display_name(name: str) -> str:
    """Qualified name as shown to users: the root module (``""``) is ``"<model>"``."""
    return name or ROOT


def attribute_path(name: str, root: str = "model") -> str:
    """Write the Python expression that reaches a submodule, for fixes written as code.

    Example:
        >>> attribute_path("backbone.1.conv"), attribute_path("", "self")
        ('model.backbone[1].conv', 'self')

    """
    return root + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a qualified name, or one of its ancestors, matches one of the glob ``patterns``.

    A pattern that names a submodule covers its descendants too, so allowing ``"head.mc_dropout"`` allows
    ``"head.mc_dropout.inner"``.

    Example:
        >>> matches_any("head.drop.inner", ["head.drop"]), matches_any("head.fc", ["*.drop*"])
        (True, False)

    """
    if not patterns:
        return False
    parts = name.split(".") if name else []
    candidates = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def _ancestors(name: str) -> list[str]:
    """List the root, then each prefix of ``name``, then ``name`` itself (top-down)."""
    if not name:
        return [""]
    parts = name.split(".")
    return ["", *(".".join(parts[:k]) for k in range(1, len(parts) + 1))]


def _group(changed: Iterable[str], universe: Iterable[str], *, root: bool = True) -> list[tuple[str, int]]:
    """Collapse names into the topmost prefixes all of whose members changed, with how many each covers.

    Fifty BatchNorm layers of a backbone un-frozen together are one finding about ``backbone``, not fifty.
    With ``root=False`` nothing collapses into the whole model: "the model's tensors changed" names nothing.
    """
    changed = list(dict.fromkeys(changed))
    if not changed:
        return []
    changed_set = set(changed)
    total: dict[str, int] = {}
    hits: dict[str, int] = {}
    for name in universe:
        inside = name in changed_set
        for anc in _ancestors(name):
            total[anc] = total.get(anc, 0) + 1
            if inside:
                hits[anc] = hits.get(anc, 0) + 1
    out: dict[str, int] = {}
    for name in changed:
        ancestors = _ancestors(name)[0 if root else 1:]
        for k, anc in enumerate(ancestors):
            # A prefix that is not itself a member only absorbs groups of two or more: one changed tensor is
            # named by its own name, not by its module's.
            if total.get(anc, 0) and hits.get(anc, 0) == total[anc] and (anc == name or total[anc] > 1):
                # A deeper prefix with the same members names them more precisely: `backbone.1`, not `backbone`,
                # when the backbone's only buffers are those of its one BatchNorm.
                while k + 1 < len(ancestors) and total.get(ancestors[k + 1], 0) == total[anc]:
                    k += 1
                out.setdefault(ancestors[k], hits[ancestors[k]])
                break
        else:
            out.setdefault(name, 1)
    return list(out.items())


def _covers(count: int, noun: str) -> str:
    return f"covers {count} {noun}" if count > 1 else ""


# --------------------------------------------------------------------------------------------------------------
# Fingerprints


#: Elements per stacked block on the CPU: below torch's intra-op grain size (32768), so that each reduction runs on
#: one thread. From the grain size on, a reduction is split across threads, and on a busy machine (data-loader
#: workers, other jobs) the thread pool's hand-offs cost ~20 ms per call (measured, 2 cores): blocks of 32768
#: elements made a snapshot 6x slower than one reduction per tensor.
_STACK_ELEMENTS = 1 << 14


def _positional_sum_rows(stacked: Tensor) -> Tensor:
    return stacked.to(torch.float64) @ torch.arange(stacked.shape[1], dtype=torch.float64)


def _fingerprint_rows(tensors: list[Tensor]) -> Tensor:
    """Per tensor ``[sum, L2 norm]`` in float64, on the tensors' (common) device, without a host synchronization.

    The sum is sensitive to sign flips, the norm to changes that keep the sum; float64 accumulation makes both
    see a change of one element by one part in a million. Integer and bool tensors (counters, masks, indices) get a
    position-weighted sum instead of a norm, which also sees values that moved (``mask.flip(0)``). A permutation of
    a float tensor's values (a transpose written through ``.data``) keeps both its sum and its norm: not seen.
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.float64)
    device = tensors[0].device
    with torch.no_grad():
        # No per-tensor reshape: on a Parameter it costs more than the reduction of a small tensor.
        flat = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
        if device.type == "cpu":
            return _stacked_rows(flat)
        return _per_tensor_rows(flat)


def _per_tensor_rows(flat: list[Tensor]) -> Tensor:
    """Accelerator path: one reduction per tensor, launched asynchronously; the norms fused (``_foreach_norm``).

    Nothing here copies to or from the host, so nothing waits for the device.
    """
    sums = torch.stack([t.sum(dtype=torch.float64) for t in flat])
    floats = [t for t in flat if t.is_floating_point()]
    norms = iter(torch._foreach_norm(floats, 2, dtype=torch.float64) if floats else ())
    second = [next(norms) if t.is_floating_point() else _positional_sum(t.reshape(-1)) for t in flat]
    return torch.stack([sums, torch.stack(second)], 1)


def _positional_sum(flat: Tensor) -> Tensor:
    """``sum(i * t[i])`` in float64: exact for integer tensors below 2**53, sees values that changed places."""
    return flat.to(torch.float64) @ torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)


def _stacked_rows(flat: list[Tensor]) -> Tensor:
    """CPU path: stack tensors of equal dtype and size, reduce each stack along its rows.

    A thousand-module model has a few thousand small tensors but few distinct shapes: one reduction per shape
    instead of one per tensor is ten times faster. Row reductions over a contiguous stack give bitwise the
    per-tensor result (tested), so a snapshot does not depend on which other tensors shared a stack.
    """
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[int]] = {}
    for i, t in enumerate(flat):
        groups.setdefault((t.dtype, tuple(t.shape)), []).append(i)
    order: list[int] = []
    sums: list[Tensor] = []
    seconds: list[Tensor] = []
    for (dtype, shape), idx in groups.items():
        if len(idx) == 1:  # a shape of its own: reduce the tensor itself, a stack would only add a copy
            t = flat[idx[0]]
            sums.append(t.sum(dtype=torch.float64).reshape(1))
            second = (torch.linalg.vector_norm(t, 2, dtype=torch.float64) if dtype.is_floating_point
                      else _positional_sum(t.reshape(-1)))
            seconds.append(second.reshape(1))
            order += idx
            continue
        per_block = max(1, _STACK_ELEMENTS // max(math.prod(shape), 1))
        for start in range(0, len(idx), per_block):
            block = idx[start:start + per_block]
            stacked = torch.stack([flat[i] for i in block]).reshape(len(block), -1)
            sums.append(stacked.sum(1, dtype=torch.float64))
            seconds.append(torch.linalg.vector_norm(stacked, 2, dim=1, dtype=torch.float64)
                           if dtype.is_floating_point else _positional_sum_rows(stacked))
            order += block
    values = torch.stack([torch.cat(sums), torch.cat(seconds)], 1)
    if order == list(range(len(flat))):
        return values
    rows = torch.empty(len(flat), 2, dtype=torch.float64)
    rows[torch.tensor(order)] = values
    return rows


_HostValues = dict[tuple[str, str], tuple[float, float]]


@dataclass
class _Fingerprint:
    """Fingerprints of named tensors, kept on their devices until first read."""

    keys: list[tuple[str, str]] = field(default_factory=list)  # (kind, name); kind: param, buffer, grad
    integral: set[tuple[str, str]] = field(default_factory=set)  # keys whose second value is a positional sum
    _device_rows: list[tuple[list[int], Tensor]] = field(default_factory=list)
    _host: dict[tuple[str, str], tuple[float, float]] | None = None

    @classmethod
    def of(cls, named: list[tuple[str, str, Tensor]]) -> _Fingerprint:
        # One pass, few attribute reads per tensor: at a few thousand tensors the Python bookkeeping costs as much
        # as the reductions.
        keys: list[tuple[str, str]] = []
        integral: set[tuple[str, str]] = set()
        by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        for kind, name, t in named:
            if not _fingerprintable(t):
                continue
            if not (t.is_floating_point() or t.is_complex()):
                integral.add((kind, name))
            device = t.device
            entry = by_device.get(device)
            if entry is None:
                entry = by_device[device] = ([], [])
            entry[0].append(len(keys))
            entry[1].append(t)
            keys.append((kind, name))
        fp = cls(keys=keys, integral=integral)
        fp._device_rows = [(idx, _fingerprint_rows(tensors)) for idx, tensors in by_device.values()]
        return fp

    def values(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Host copy of every fingerprint: one device-to-host copy (one synchronization) per device, once."""
        if self._host is None:
            _to_host([self])
        return self._host or {}


def _to_host(fingerprints: Sequence[_Fingerprint]) -> None:
    """Copy the fingerprints of several snapshots to the host together: one copy per device for all of them."""
    by_device: dict[torch.device, list[tuple[_HostValues, list[tuple[str, str]], Tensor]]] = {}
    for fp in fingerprints:
        if fp._host is not None:
            continue
        host: _HostValues = {}
        for idx, rows in fp._device_rows:
            by_device.setdefault(rows.device, []).append((host, [fp.keys[i] for i in idx], rows))
        fp._host, fp._device_rows = host, []
    for parts in by_device.values():
        values = iter(torch.cat([rows for _, _, rows in parts]).cpu().tolist())
        for host, keys, _ in parts:
            for key in keys:
                s, n = next(values)
                host[key] = (s, n)


def _fingerprintable(t: Tensor) -> bool:
    # Lazy modules' uninitialized tensors and meta tensors have no values; sparse and quantized ones are rare
    # enough in models that skipping them beats special-casing their reductions.
    if nn.parameter.is_lazy(t) or t.is_meta or t.layout != torch.strided or t.is_quantized:
        return False
    # Sharded tensors (DTensor) would need a collective to read; their local shard is what this rank can change.
    to_local = getattr(t, "to_local", None)
    return not (callable(to_local) and type(t).__name__ == "DTensor")


def _same(a: tuple[float, float], b: tuple[float, float]) -> bool:
    # NaN weights compare equal to themselves: "still NaN" is not a change made by evaluation.
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------------------
# Snapshots


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

    """

    modes: dict[str, bool]
    types: dict[str, str]
    grad_enabled: bool
    inference_mode: bool
    requires_grad: dict[str, bool]
    has_grad: dict[str, bool] | None
    _fingerprint: _Fingerprint | None = None

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

    Wrappers (``torch.compile``, DDP, Lightning's strategy wrappers) are looked through, and wrapper segments are
    removed from names, so snapshots of the wrapped and the bare model compare equal.

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
    modules, params, buffers = _walk(unwrap(model))
    modes = {n: bool(m.training) for n, m in modules.items()}
    types = {n: type(m).__name__ for n, m in modules.items()}
    requires_grad = {n: bool(p.requires_grad) for n, p in params}
    has_grad = {n: p.grad is not None for n, p in params} if grads else None
    fp = None
    if content:
        named: list[tuple[str, str, Tensor]] = [("param", n, p) for n, p in params]
        named += [("buffer", n, b) for n, b in buffers]
        if grads:
            named += [("grad", n, p.grad) for n, p in params if p.grad is not None]
        fp = _Fingerprint.of(named)
    return Snapshot(
        modes=modes,
        types=types,
        grad_enabled=torch.is_grad_enabled(),
        inference_mode=torch.is_inference_mode_enabled(),
        requires_grad=requires_grad,
        has_grad=has_grad,
        _fingerprint=fp,
    )


# --------------------------------------------------------------------------------------------------------------
# Comparing two snapshots

_FIX_MODE_RESTORE = (
    "restore each submodule's own mode instead of calling `model.train()`: "
    "`with lightning_validate.evaluating(model): ...`, or in Lightning remove the `on_validation_model_train` "
    "override (Lightning >= 2.2 restores every submodule's mode itself)"
)
_FIX_MODE_LEFT_EVAL = (
    "put the submodule back in train mode after evaluation: remove the `on_validation_model_train` override that "
    "does nothing, or call `{name}.train()` at the end of evaluation"
)
_FIX_PARAM = (
    "do not write parameters during evaluation (`p.data.clamp_()`, an EMA update, `optimizer.step()`): "
    "move the write to `on_train_batch_end` or after `optimizer.step()`"
)
_FIX_BUFFER = (
    "a submodule ran in train mode during evaluation and updated its buffers (BatchNorm running statistics): "
    "keep it in eval mode (`{module}.eval()`), or restore the buffers after computing the loss"
)
_FIX_REQUIRES_GRAD = (
    "do not freeze or unfreeze during evaluation; save and restore the flags: "
    "`flags = {n: p.requires_grad for n, p in model.named_parameters()}` ... "  # not a format string
    "`for n, p in model.named_parameters(): p.requires_grad_(flags[n])`"
)
_FIX_GRAD = (
    "do not call `loss.backward()` during evaluation; for input gradients use "
    "`torch.autograd.grad(output.sum(), inputs)`, which leaves `.grad` untouched"
)
_FIX_STRUCTURE = "do not add or remove submodules during evaluation; create them in `__init__` or `setup()`"


def compare(
    before: Snapshot,
    after: Snapshot,
    *,
    phase: str,
    boundary: str = "end",
    allow_train_mode: Sequence[str] = (),
    detail: str = "",
) -> list[Finding]:
    """Find what changed between two snapshots that evaluation must leave unchanged.

    Reports (codes in ``docs/codes.md``): submodules added or removed (LV206), a submodule whose mode differs
    (LV205), ``requires_grad`` flags (LV203), parameters (LV201), buffers (LV202) and ``.grad`` (LV204).
    Changes are grouped: a backbone whose forty BatchNorm layers were all un-frozen is one finding.

    Args:
        before: snapshot taken before evaluation.
        after: snapshot taken after evaluation.
        phase: where this is reported (``"validation"``, ``"evaluating"``...).
        boundary: the point within the phase.
        allow_train_mode: glob patterns of submodules whose mode may differ (kept in train on purpose).
        detail: extra context added to each finding (for example the hook that made the change).

    Returns:
        The findings, in the order above. Comparing content synchronizes once per device.

    """
    allow_train_mode = _patterns("allow_train_mode", allow_train_mode)
    report = _Report(phase, boundary, detail)
    add = report.add
    added = [n for n in after.modes if n not in before.modes]
    removed = [n for n in before.modes if n not in after.modes]
    for name, count in _group(added, after.modes):
        add("LV206", display_name(name), "the same submodules", "added " + after.describe(name), _FIX_STRUCTURE,
            _covers(count, "submodules"))
    for name, count in _group(removed, before.modes):
        add("LV206", display_name(name), "the same submodules", "removed " + before.describe(name), _FIX_STRUCTURE,
            _covers(count, "submodules"))

    # Same name, another class: the submodule was replaced. Lazy modules change class when they materialize
    # (`LazyLinear` -> `Linear`): that is not a replacement.
    replaced = [n for n in before.modes if n in after.modes and before.types.get(n) != after.types.get(n)
                and not before.types.get(n, "").startswith("Lazy")]
    for name, count in _group(replaced, [n for n in before.modes if n in after.modes]):
        add("LV206", display_name(name), "the same submodules",
            f"replaced {before.describe(name)} by {after.types.get(name, '?')}", _FIX_STRUCTURE,
            _covers(count, "submodules"))

    replaced_set = set(replaced)
    common = [n for n in before.modes if n in after.modes and n not in replaced_set]
    for was in (False, True):
        flipped = [n for n in common if before.modes[n] == was and after.modes[n] != was
                   and not matches_any(n, allow_train_mode)]
        # The universe is every common submodule: a prefix absorbs its members only if all of them flipped,
        # so a flipped backbone under an unchanged head is reported as `backbone`, not as the whole model.
        for name, count in _group(flipped, common):
            mode, now = ("eval", "train") if not was else ("train", "eval")
            fix = _FIX_MODE_RESTORE if not was else _FIX_MODE_LEFT_EVAL.format(name=attribute_path(name))
            add("LV205", display_name(name), f"{mode} mode as before evaluation",
                f"{after.describe(name)} in {now} mode", fix, _covers(count, "submodules"))

    flags = [n for n in before.requires_grad if n in after.requires_grad
             and before.requires_grad[n] != after.requires_grad[n]]
    for name, count in _group(flags, before.requires_grad, root=False):
        if count > 1 or name not in before.requires_grad:
            seen = f"requires_grad changed on {count} parameters"
        else:
            seen = f"requires_grad={after.requires_grad[name]}"
        expected = (f"requires_grad={before.requires_grad[name]}" if name in before.requires_grad
                    else "requires_grad unchanged")
        add("LV203", display_name(name), expected, seen, _FIX_REQUIRES_GRAD)

    if before.has_content and after.has_content:
        _compare_content(before, after, add)
    return report.findings


@dataclass
class _Report:
    phase: str
    boundary: str
    detail: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, module: str, expected: str, seen: str, fix: str, more: str = "") -> None:
        extra = "; ".join(x for x in (more, self.detail) if x)
        self.findings.append(Finding(code, module, self.phase, self.boundary, expected, seen, fix, extra))


def _compare_content(before: Snapshot, after: Snapshot, add: Callable[..., None]) -> None:
    if before._fingerprint is not None and after._fingerprint is not None:
        _to_host([before._fingerprint, after._fingerprint])  # one synchronization per device for both
    fb, fa = before.fingerprints(), after.fingerprints()
    for kind, code in (("param", "LV201"), ("buffer", "LV202")):
        keys = [n for k, n in fb if k == kind]
        changed = [n for n in keys if (kind, n) in fa and not _same(fb[(kind, n)], fa[(kind, n)])]
        for name, count in _group(changed, keys, root=False):
            noun = "parameters" if kind == "param" else "buffers"
            owner = name.rpartition(".")[0] if (kind, name) in fb else name
            fix = _FIX_PARAM if kind == "param" else _FIX_BUFFER.format(module=attribute_path(owner))
            if count > 1:
                seen = f"{count} {noun} changed"
            else:
                integral = after._fingerprint is not None and (kind, name) in after._fingerprint.integral
                seen = _change(fb[(kind, name)], fa[(kind, name)], integral)
            add(code, display_name(name), "unchanged values", seen, fix)
    if before.has_grad is not None and after.has_grad is not None:
        names = [n for n in before.has_grad if n in after.has_grad]
        changed = []
        for n in names:
            b, a = fb.get(("grad", n)), fa.get(("grad", n))
            if before.has_grad[n] != after.has_grad[n] or (b is not None and a is not None and not _same(b, a)):
                changed.append(n)
        for name, count in _group(changed, names, root=False):
            if count > 1 or name not in before.has_grad:
                seen = f".grad changed on {count} parameters"
            elif not before.has_grad[name]:
                seen = ".grad set (was None)"
            elif not after.has_grad[name]:
                seen = ".grad cleared (was set)"
            else:
                seen = ".grad values changed"
            add("LV204", display_name(name), ".grad unchanged", seen, _FIX_GRAD)


def _change(b: tuple[float, float], a: tuple[float, float], integral: bool) -> str:
    second = "positional sum" if integral else "norm"
    return f"changed (sum {b[0]:.6g} -> {a[0]:.6g}, {second} {b[1]:.6g} -> {a[1]:.6g})"


# --------------------------------------------------------------------------------------------------------------
# Checking a state (cheap enough for every batch)


class ModeIndex:
    """Submodules of a model, listed once, for cheap repeated mode checks.

    Walking ``named_modules()`` costs about a millisecond per thousand modules; reading ``.training`` from a cached
    list costs a few microseconds per hundred. Build the index at a phase boundary, query it per batch.

    Args:
        model: the model (wrappers are looked through).
        allow_train_mode: glob patterns of submodules that may stay in train mode during evaluation.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout()).eval()
        >>> index = ModeIndex(net)
        >>> net[1].train(); index.in_train_mode()
        Dropout(p=0.5, inplace=False)
        ['1']

    """

    def __init__(self, model: nn.Module, allow_train_mode: Sequence[str] = ()) -> None:
        allow_train_mode = _patterns("allow_train_mode", allow_train_mode)
        self.model = unwrap(model)
        by_name = _named_modules(self.model)
        self.names = list(by_name)
        self.modules = list(by_name.values())
        self.types = {n: type(m).__name__ for n, m in by_name.items()}
        self._by_name = by_name
        self._checked = [(n, m) for n, m in by_name.items() if not matches_any(n, allow_train_mode)]
        self._param_owners: list[tuple[Tensor, list[str]]] | None = None
        self.num_modules = len(by_name)

    def trainable_modules(self) -> set[str]:
        """Name the submodules that hold, themselves or through a descendant, a trainable parameter.

        The ``requires_grad`` flags are read now: they may have changed since the index was built.
        """
        if self._param_owners is None:
            _, params, _ = _walk(self.model)
            self._param_owners = [(p, _ancestors(n.rpartition(".")[0])) for n, p in params]
        out: set[str] = set()
        for p, owners in self._param_owners:
            if p.requires_grad:
                out.update(owners)
        return out

    def in_train_mode(self) -> list[str]:
        """Names of the submodules in train mode, allowlisted ones excluded."""
        return [n for n, m in self._checked if m.training]

    def any_in_train_mode(self) -> bool:
        """Fast path: ``True`` when any checked submodule is in train mode."""
        return any(m.training for _, m in self._checked)



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
        phase: where this is checked.
        boundary: the point within the phase.
        allow_train_mode: glob patterns of submodules kept in train mode on purpose (MC dropout); ignored when a
            ``ModeIndex`` is given.
        allow_grad: do not report enabled grad.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1))
        >>> [f.code for f in check_eval_state(net, phase="validation", boundary="start")]
        ['LV101', 'LV102']

    """
    index = model if isinstance(model, ModeIndex) else ModeIndex(model, allow_train_mode)
    findings: list[Finding] = []
    if index.any_in_train_mode():
        for name, count in _group(index.in_train_mode(), index.names):
            cls = index.types.get(name, "")
            findings.append(Finding(
                "LV101", display_name(name), phase, boundary, "eval mode",
                f"{display_name(name)}{f' ({cls})' if cls else ''} in train mode"
                + (" (its class overrides `train()`: check that it honors `mode`)"
                   if _overrides_train(index, name) else ""),
                f"call `model.eval()` before evaluating{_lightning_eval_hint(phase)}; if `{display_name(name)}` "
                f"must stay in train mode on purpose, allow it: `allow_train_mode=[{display_name(name)!r}]`",
                _covers(count, "submodules"),
            ))
    if torch.is_grad_enabled() and not allow_grad:
        findings.append(Finding(
            "LV102", "grad mode", phase, boundary, "grad disabled (`torch.no_grad()` or `torch.inference_mode()`)",
            "grad enabled", "remove `torch.set_grad_enabled(True)` from evaluation code; for input gradients use a "
            "local `with torch.enable_grad():` block inside the step",
        ))
    return findings


def _lightning_eval_hint(phase: str) -> str:
    """Name the Lightning hook that puts the model in eval mode for a Lightning phase; nothing for other phases."""
    hook = {"validation": "validation", "sanity_check": "validation", "test": "test", "predict": "predict"}.get(phase)
    return f" (Lightning does it unless `on_{hook}_model_eval` is overridden)" if hook else ""


def _overrides_train(index: ModeIndex, name: str) -> bool:
    """Whether the submodule's class overrides ``train()``: the usual reason ``.eval()`` leaves it in train mode.

    Only the class is inspected; calling the override from a check could have side effects on the user's model.
    """
    module = index._by_name.get(name)
    return module is not None and type(module).train is not nn.Module.train


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
        allow_eval_mode: glob patterns of submodules kept in eval mode on purpose.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1)).eval()
        >>> [f.code + " " + f.module for f in check_train_state(net, boundary="on_train_batch_start")]
        ['LV302 <model>']

    """
    index = model if isinstance(model, ModeIndex) else ModeIndex(model)
    findings: list[Finding] = []
    if not torch.is_grad_enabled():
        findings.append(Finding(
            "LV301", "grad mode", phase, boundary, "grad enabled", "grad disabled",
            "do not call `torch.set_grad_enabled(False)` outside a `with` block; wrap evaluation in "
            "`torch.no_grad()` or `lightning_validate.evaluating(model)` so grad comes back",
        ))
    allow_eval_mode = _patterns("allow_eval_mode", allow_eval_mode)
    in_eval = [n for n, m in zip(index.names, index.modules, strict=True) if not m.training]
    if not in_eval:
        return findings
    trainable_under = index.trainable_modules()
    suspects = [n for n in in_eval if n in trainable_under and not matches_any(n, allow_eval_mode)]
    for name, count in _group(suspects, [n for n in index.names if n in trainable_under]):
        cls = index.types.get(name, "")
        findings.append(Finding(
            "LV302", display_name(name), phase, boundary, "train mode (it has trainable parameters)",
            f"{display_name(name)}{f' ({cls})' if cls else ''} in eval mode",
            f"call `{attribute_path(name, 'self')}.train()` in `on_train_start` (a pretrained model "
            "loaded in eval mode stays there: Lightning >= 2.2 no longer calls `.train()`), or freeze it "
            "with `requires_grad_(False)` if it should not learn",
            _covers(count, "submodules"),
        ))
    return findings
