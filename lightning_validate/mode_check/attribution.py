"""Which hook made a change seen at the end of an evaluation (for ``ModeCheck``).

During an evaluation ``ModeCheck`` takes a content snapshot (a ``Mark``) around each overridden epoch-level hook.
Comparing consecutive marks tells which hook changed what: each finding gets the hooks that made it in its detail,
and changes made only by trusted Lightning callbacks (weight averaging, pruning) are dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lightning_validate.engine import Snapshot, compare
from lightning_validate.findings import ROOT, Finding
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["Mark", "attribute"]


@dataclass
class Mark:
    """A content snapshot taken during an evaluation, with the hook it follows (``""``: not after a hook)."""

    snapshot: Snapshot
    after_hook: str = ""
    trusted: bool = False
    batches: int = 0  # evaluation batches started before this mark


def attribute(marks: Sequence[Mark], findings: list[Finding], phase: str, stage: RunningStage) -> list[Finding]:
    """Name the hook that made each change; drop changes made only by trusted callbacks (EMA swap, pruning).

    Args:
        marks: the evaluation's marks, the baseline first.
        findings: the changes between the baseline and the end of the evaluation.
        phase: the evaluation's phase.
        stage: the evaluation stage (``validation``, ``test``, ``predict``).

    Returns:
        The findings kept, each with ``changed in ...`` added to its detail where a hook is known.
    """
    segments: list[tuple[str, bool, list[Finding]]] = []
    for a, b in itertools.pairwise(marks):
        if a.snapshot is b.snapshot:
            continue
        label = b.after_hook or ("the evaluation steps" if b.batches > a.batches else "")
        # Content only: modes are those of evaluation throughout, requires_grad flags are compared elsewhere.
        found = compare(a.snapshot, b.snapshot, phase=phase, modes=False, requires_grad=False)
        segments.append((label, b.trusted and bool(b.after_hook), found))
    kept: list[Finding] = []
    for f in findings:
        hits = [(label, trusted) for label, trusted, found in segments
                if any(g.code == f.code and _overlaps(g.module, f.module) for g in found)]
        if hits and all(trusted for _, trusted in hits):
            continue
        labels = list(dict.fromkeys(label for label, trusted in hits if not trusted and label))
        if labels:
            made = ", ".join(f"`{x}`" if x != "the evaluation steps" else
                             f"{_step(stage)} or a batch hook" for x in labels)
            f = replace(f, detail="; ".join(x for x in (f.detail, f"changed in {made}") if x))
        kept.append(f)
    return kept


def _step(stage: RunningStage) -> str:
    """The step that runs the batches of an evaluation stage: ``validation_step``, ``test_step``..."""
    return f"{hook_word(stage)}_step"


def _overlaps(a: str, b: str) -> bool:
    """Whether two reported names cover a common tensor: equal, or one a dotted prefix of the other."""
    if a == b or ROOT in (a, b):
        return True
    return a.startswith(b + ".") or b.startswith(a + ".")
