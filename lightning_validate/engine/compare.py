"""Comparing two snapshots: what evaluation changed that it must leave unchanged (codes LV201 to LV206).

Example:
    >>> import torch
    >>> from lightning_validate.engine.snapshot import take_snapshot
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> before = take_snapshot(model)
    >>> _ = model(torch.randn(4, 2))  # train mode: BatchNorm updates its running statistics
    >>> for f in compare(before, take_snapshot(model), phase="evaluating"):
    ...     print(f.code, f.module, f.seen)
    LV202 1 3 buffers changed

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_validate.engine.buffers import fix_variant, not_state
from lightning_validate.engine.fingerprint import same, to_host
from lightning_validate.engine.names import Globs, covers, group
from lightning_validate.engine.snapshot import Snapshot
from lightning_validate.findings import Finding, display_name, make_finding

__all__ = ["compare"]


def compare(
    before: Snapshot,
    after: Snapshot,
    *,
    phase: str,
    boundary: str = "end",
    allow_train_mode: Sequence[str] = (),
    detail: str = "",
    structure: bool = True,
    modes: bool = True,
    requires_grad: bool = True,
    buffers: bool = True,
) -> list[Finding]:
    """Find what changed between two snapshots that evaluation must leave unchanged.

    Reports (codes in ``docs/codes.md``): submodules added, removed or replaced (LV206), a submodule whose mode
    differs (LV205), ``requires_grad`` flags (LV203), parameters (LV201), buffers (LV202) and ``.grad`` (LV204).
    Changes are grouped: a backbone whose forty BatchNorm layers were all un-frozen is one finding. Buffer changes that
    are not state are left out (``engine.buffers.not_state``: a placeholder filled in, a non-persistent cache rebuilt
    with another shape, fake-quantization parameters recomputed), and each fix is written for what owns the tensors
    (a BatchNorm, a quantization observer, a cache).

    Args:
        before: snapshot taken before evaluation.
        after: snapshot taken after evaluation.
        phase: where this is reported: ``"evaluating"`` in plain PyTorch, or a Lightning running stage
            (``"validate"``, ``"test"``...), whose hooks the fixes then name.
        boundary: the point within the phase.
        allow_train_mode: names or glob patterns of submodules kept in train mode on purpose: their mode may
            differ and their buffers may change.
        detail: extra context added to each finding (for example the hook that made the change).
        structure: report submodules added, removed or replaced (LV206).
        modes: report modes that differ (LV205). Inside an evaluation every mode differs from the baseline on
            purpose: compare content only with ``modes=False``.
        requires_grad: report ``requires_grad`` flags that differ (LV203).
        buffers: report buffers that changed (LV202).

    Returns:
        The findings, in the order above. Comparing content synchronizes once per device.

    Raises:
        TypeError: if ``allow_train_mode`` is not a list of names or glob patterns.

    """
    allowed = Globs.parse("allow_train_mode", allow_train_mode)
    report = _Report(phase, boundary, detail)
    if structure:
        _compare_structure(before, after, report)
    replaced = {n for n in before.modes if n in after.modes and _replaced(before, after, n)}
    if modes:
        _compare_modes(before, after, [n for n in before.modes if n in after.modes and n not in replaced], allowed,
                       report)
    if requires_grad:
        _compare_flags(before, after, report)
    if before.has_content and after.has_content:
        _compare_content(before, after, allowed if buffers else None, report)
    return report.findings


@dataclass
class _Report:
    phase: str
    boundary: str
    detail: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, name: str, *, expected: str, seen: str, count: int = 1, noun: str = "",
            variant: str = "", owner: str | None = None) -> None:
        extra = "; ".join(x for x in (covers(count, noun), self.detail) if x)
        self.findings.append(make_finding(
            code, module=display_name(name), phase=self.phase, boundary=self.boundary, expected=expected, seen=seen,
            detail=extra, variant=variant, owner=owner,
        ))


def _replaced(before: Snapshot, after: Snapshot, name: str) -> bool:
    """Same name, another class: the submodule was replaced.

    Lazy modules change class when they materialize (``LazyLinear`` -> ``Linear``): that is not a replacement.
    """
    was = before.types.get(name, "")
    return was != after.types.get(name) and not was.startswith("Lazy")


def _compare_structure(before: Snapshot, after: Snapshot, report: _Report) -> None:
    expected = "the same submodules"
    added = [n for n in after.modes if n not in before.modes]
    removed = [n for n in before.modes if n not in after.modes]
    for name, count in group(added, after.modes):
        report.add("LV206", name, expected=expected, seen="added " + after.describe(name), count=count,
                   noun="submodules")
    for name, count in group(removed, before.modes):
        report.add("LV206", name, expected=expected, seen="removed " + before.describe(name), count=count,
                   noun="submodules")
    common = [n for n in before.modes if n in after.modes]
    replaced = [n for n in common if _replaced(before, after, n)]
    for name, count in group(replaced, common):
        report.add("LV206", name, expected=expected,
                   seen=f"replaced {before.describe(name)} by {after.types.get(name, '?')}", count=count,
                   noun="submodules")


def _compare_modes(before: Snapshot, after: Snapshot, common: list[str], allowed: Globs, report: _Report) -> None:
    for was in (False, True):
        flipped = [n for n in common if before.modes[n] == was and after.modes[n] != was and not allowed.covers(n)]
        # The universe is every common submodule: a prefix absorbs its members only if all of them flipped,
        # so a flipped backbone under an unchanged head is reported as `backbone`, not as the whole model.
        for name, count in group(flipped, common):
            mode, now = ("eval", "train") if not was else ("train", "eval")
            report.add("LV205", name, expected=f"{mode} mode as before evaluation",
                       seen=f"{after.describe(name)} in {now} mode", count=count, noun="submodules",
                       variant="left_in_eval" if was else "")


def _compare_flags(before: Snapshot, after: Snapshot, report: _Report) -> None:
    flags = [n for n in before.requires_grad if n in after.requires_grad
             and before.requires_grad[n] != after.requires_grad[n]]
    for name, count in group(flags, before.requires_grad, root=False):
        if count > 1 or name not in before.requires_grad:
            seen = f"requires_grad changed on {count} parameters"
        else:
            seen = f"requires_grad={after.requires_grad[name]}"
        expected = (f"requires_grad={before.requires_grad[name]}" if name in before.requires_grad
                    else "requires_grad unchanged")
        report.add("LV203", name, expected=expected, seen=seen)


def _compare_content(before: Snapshot, after: Snapshot, buffers_allowed: Globs | None, report: _Report) -> None:
    if before._fingerprint is not None and after._fingerprint is not None:
        to_host([before._fingerprint, after._fingerprint])  # one synchronization per device for both
    fb, fa = before.fingerprints(), after.fingerprints()
    if before._fingerprint is not None and after._fingerprint is not None and (
            before._fingerprint.sharded or after._fingerprint.sharded):
        # A shard against the whole tensor (FSDP2 unshards around a forward) is not a change: leave such keys out.
        pb, pa = before._fingerprint, after._fingerprint
        fa = {k: v for k, v in fa.items() if pb.comparable(pa, k)}
    kinds = [("param", "LV201")] + ([("buffer", "LV202")] if buffers_allowed is not None else [])
    for kind, code in kinds:
        keys = [n for k, n in fb if k == kind]
        changed = [n for n in keys if (kind, n) in fa and not same(fb[(kind, n)], fa[(kind, n)])]
        if kind == "buffer" and buffers_allowed is not None:
            # Not state (engine/buffers.py): a placeholder filled in, a non-persistent cache rebuilt with another
            # shape, fake-quantization parameters recomputed from unchanged statistics.
            excused = {n.name for n in not_state(before, after, changed)}
            # Filtered per tensor, before grouping: a group names a module whose owner test would be its parent.
            changed = [n for n in changed if n not in excused and not buffers_allowed.covers(n.rpartition(".")[0])]
        for name, count in group(changed, keys, root=False):
            noun = "parameters" if kind == "param" else "buffers"
            owner = name.rpartition(".")[0] if (kind, name) in fb else name
            if count > 1:
                seen = f"{count} {noun} changed"
            else:
                integral = after._fingerprint is not None and (kind, name) in after._fingerprint.integral
                seen = _change(fb[(kind, name)], fa[(kind, name)], integral)
            members = [n for n in changed if n == name or n.startswith(name + ".")]
            report.add(code, name, expected="unchanged values", seen=seen, owner=owner,
                       variant=fix_variant(members, after, kind))
    if before.has_grad is not None and after.has_grad is not None:
        _compare_grads(before, after, fb, fa, report)


def _compare_grads(before: Snapshot, after: Snapshot, fb: dict[tuple[str, str], tuple[float, float]],
                   fa: dict[tuple[str, str], tuple[float, float]], report: _Report) -> None:
    assert before.has_grad is not None and after.has_grad is not None
    # FSDP2's whole (unsharded) parameters have no `.grad`; their shards keep it: compare equal layouts only.
    names = [n for n in before.has_grad if n in after.has_grad and (n in before.sharded) == (n in after.sharded)]
    changed = []
    for n in names:
        b, a = fb.get(("grad", n)), fa.get(("grad", n))
        if before.has_grad[n] != after.has_grad[n] or (b is not None and a is not None and not same(b, a)):
            changed.append(n)
    for name, count in group(changed, names, root=False):
        if count > 1 or name not in before.has_grad:
            seen = f".grad changed on {count} parameters"
        elif not before.has_grad[name]:
            seen = ".grad set (was None)"
        elif not after.has_grad[name]:
            seen = ".grad cleared (was set)"
        else:
            seen = ".grad values changed"
        report.add("LV204", name, expected=".grad unchanged", seen=seen)


def _change(b: tuple[float, float], a: tuple[float, float], integral: bool) -> str:
    second = "positional sum" if integral else "norm"
    return f"changed (sum {b[0]:.6g} -> {a[0]:.6g}, {second} {b[1]:.6g} -> {a[1]:.6g})"
