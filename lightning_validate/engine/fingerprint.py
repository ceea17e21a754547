"""Content fingerprints: per tensor a float64 sum and L2 norm, computed on the tensor's device without a sync.

The fingerprint is computed from the values, not from ``tensor._version``: writes through ``.data`` and native
BatchNorm running-stat updates do not bump version counters. It stays on the tensors' device until two snapshots
are compared; ``to_host`` then copies several fingerprints to the host at once, one synchronization per device.

Sharded tensors (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism) are fingerprinted by their local shard
(``to_local()``): what this rank holds and can change, read without a collective. A rank's verdict covers its own
shard; agreeing across ranks is the adapters' work.

Example:
    >>> import torch
    >>> fp = Fingerprint.of([("param", "w", torch.tensor([3.0, 4.0]))])
    >>> fp.values()
    {('param', 'w'): (7.0, 5.0)}

"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Fingerprint", "dtensor_type", "is_sharded", "same", "to_host"]


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
class Fingerprint:
    """Fingerprints of named tensors, kept on their devices until first read."""

    keys: list[tuple[str, str]] = field(default_factory=list)  # (kind, name); kind: param, buffer, grad
    integral: set[tuple[str, str]] = field(default_factory=set)  # keys whose second value is a positional sum
    #: Keys of sharded tensors (``DTensor``), fingerprinted by their local shard, with the shard's shape.
    sharded: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    _device_rows: list[tuple[list[int], Tensor]] = field(default_factory=list)
    _host: dict[tuple[str, str], tuple[float, float]] | None = None

    @classmethod
    def of(cls, named: list[tuple[str, str, Tensor]]) -> Fingerprint:
        """Fingerprint ``(kind, name, tensor)`` triples; tensors without values (lazy, meta) are skipped."""
        # One pass, few attribute reads per tensor: at a few thousand tensors the Python bookkeeping costs as much
        # as the reductions.
        keys: list[tuple[str, str]] = []
        integral: set[tuple[str, str]] = set()
        sharded: dict[tuple[str, str], tuple[int, ...]] = {}
        by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        dtensor = dtensor_type()
        for kind, name, t in named:
            if is_sharded(t, dtensor):
                with torch.no_grad():
                    t = t.to_local()  # type: ignore[attr-defined]
                sharded[(kind, name)] = tuple(t.shape)
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
        fp = cls(keys=keys, integral=integral, sharded=sharded)
        fp._device_rows = [(idx, _fingerprint_rows(tensors)) for idx, tensors in by_device.values()]
        return fp

    def comparable(self, other: Fingerprint, key: tuple[str, str]) -> bool:
        """Whether ``key`` holds the same layout in both: both whole tensors, or both shards of the same shape.

        FSDP2 swaps a module's sharded parameters for whole (unsharded) ones around its forward; the root module keeps
        them unsharded after a forward without backward (evaluation). A shard and the whole tensor are different
        values of one unchanged parameter: not comparable, so not reported.
        """
        return self.sharded.get(key) == other.sharded.get(key)

    def values(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Host copy of every fingerprint: one device-to-host copy (one synchronization) per device, once."""
        if self._host is None:
            to_host([self])
        return self._host or {}


def to_host(fingerprints: Sequence[Fingerprint]) -> None:
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


#: The types of nearly every tensor in a model: an identity test rules them out faster than ``isinstance(t, DTensor)``.
_PLAIN = frozenset({torch.Tensor, nn.Parameter})


def is_sharded(t: Tensor, dtensor: type | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (``dtensor``, from ``dtensor_type()``)."""
    return dtensor is not None and type(t) not in _PLAIN and isinstance(t, dtensor)


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` when that module is loaded, else ``None``.

    No ``DTensor`` exists before its module is imported, so nothing is imported here: a model without sharding
    pays one dictionary lookup, and a build of torch without ``torch.distributed`` works as well.
    """
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls if isinstance(cls, type) else None


def _fingerprintable(t: Tensor) -> bool:
    # Lazy modules' uninitialized tensors and meta tensors have no values; sparse and quantized ones are rare
    # enough in models that skipping them beats special-casing their reductions.
    return not (nn.parameter.is_lazy(t) or t.is_meta or t.layout != torch.strided or t.is_quantized)


def same(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two fingerprints are equal."""
    # NaN weights compare equal to themselves: "still NaN" is not a change made by evaluation.
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))
