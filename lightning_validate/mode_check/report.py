"""What ``ModeCheck`` found in one run: distinct findings with counts, the boundaries checked, summary and JSON.

The summary goes through logging, never ``print``: an application or a test that patches ``print`` sees nothing
of it, and ``logging.getLogger("lightning_validate").setLevel(logging.WARNING)`` silences it. The logger is
configured as Lightning configures its own: INFO to stderr unless the application configured logging itself.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_validate.findings import CODES, Finding, ModeCheckWarning

__all__ = ["GivenBack", "RunReport", "log", "log_summary"]

log = logging.getLogger("lightning_validate")
log.setLevel(logging.INFO)
if not log.handlers and not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False

_REPORT_VERSION = 2  # 2: "interrupted_by" and "given_back"


@dataclass
class GivenBack:
    """What ``ModeCheck`` put back after an exception inside an evaluation."""

    modes: list[str] = field(default_factory=list)  # submodules whose mode was set back
    requires_grad: list[str] = field(default_factory=list)  # parameters whose flag was set back
    grad_enabled: bool | None = None  # the grad mode set back, or None when it was already right

    def describe(self) -> str:
        """One line for the summary, e.g. ``"the modes of 3 submodules"``; empty when nothing was needed."""
        parts = []
        if self.modes:
            parts.append(f"the mode{'s' if len(self.modes) != 1 else ''} of {_count(self.modes, 'submodule')}")
        if self.requires_grad:
            parts.append(f"`requires_grad` on {_count(self.requires_grad, 'parameter')}")
        if self.grad_enabled is not None:
            parts.append(f"grad mode ({'enabled' if self.grad_enabled else 'disabled'})")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {"modes": self.modes, "requires_grad": self.requires_grad, "grad_enabled": self.grad_enabled}


def _count(names: Sequence[str], noun: str) -> str:
    shown = ", ".join(f"`{n or '<root>'}`" for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {noun}{'s' if len(names) != 1 else ''} ({shown})"


@dataclass
class RunReport:
    """The findings and boundaries of one run (``fit``, ``validate``, ``test`` or ``predict``)."""

    fn: str = ""  # the trainer function
    findings: list[Finding] = field(default_factory=list)  # distinct, first occurrence first
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    boundaries: Counter[str] = field(default_factory=Counter)
    status: str = "running"  # "finished" or "interrupted" once the run ended
    interrupted_by: str = ""  # the exception's type when interrupted
    given_back: GivenBack | None = None

    def add(self, finding: Finding) -> bool:
        """Count ``finding``; whether it is new in this run."""
        self.counts[finding.key] += 1
        if self.counts[finding.key] > 1:
            return False
        self.findings.append(finding)
        return True

    def close(self, status: str, error: BaseException | None = None) -> None:
        """The run ended with ``status``; ModeCheck's own ``error`` at the end makes it ``"interrupted"``."""
        self.status = status if error is None else "interrupted"
        if error is not None and not self.interrupted_by:
            self.interrupted_by = type(error).__name__

    def publish(self, path: str | os.PathLike[str] | None, rank: int, world_size: int, summary: bool) -> None:
        """Write the JSON report to ``path`` (a warning when it cannot be), and log the summary when asked."""
        if path is not None:
            try:
                self.write(path, rank, world_size)
            except OSError as err:
                rank_zero_warn(f"ModeCheck could not write its report to {str(path)!r}: {err}.",
                               category=ModeCheckWarning)
        if summary:
            log_summary(self.summary())

    def summary(self) -> str:
        """Boundaries checked and findings by code, as a small table."""
        total = sum(self.boundaries.values())
        where = ", ".join(x for x in (self.fn, self._interruption()) if x)
        where = f" ({where})" if where else ""
        back = self.given_back.describe() if self.given_back is not None else ""
        tail = f"\n  gave back {back} as they were before the evaluation." if back else ""
        if not self.findings:
            return f"ModeCheck{where}: {total} boundaries checked, no findings.{tail}"
        by_code: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_code.setdefault(f.code, []).append(f)
        rows = [("code", "title", "seen", "modules")]
        for code in sorted(by_code):
            fs = by_code[code]
            seen = sum(self.counts[f.key] for f in fs)
            modules = ", ".join(dict.fromkeys(f.module for f in fs))
            rows.append((code, CODES.get(code, ""), str(seen), modules if len(modules) <= 60 else modules[:57] + "..."))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        n = len(self.findings)
        lines = [f"ModeCheck{where}: {total} boundaries checked, {n} distinct finding{'s' if n != 1 else ''}:"]
        for i, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if j != 2 else c.rjust(w) for j, (c, w) in
                                          enumerate(zip(row, widths, strict=True))).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines) + tail

    def _interruption(self) -> str:
        if self.status != "interrupted":
            return ""
        return f"interrupted by {self.interrupted_by}" if self.interrupted_by else "interrupted"

    def write(self, path: str | os.PathLike[str], rank: int, world_size: int) -> None:
        """Write the JSON report: by rank zero, or by every rank when the path contains ``{rank}``."""
        target = str(path)
        if "{rank}" in target:
            target = target.replace("{rank}", str(rank))
        elif rank != 0:
            return
        report = {
            "version": _REPORT_VERSION,
            "stage": self.fn,
            "status": self.status,
            "interrupted_by": self.interrupted_by or None,
            "given_back": self.given_back.to_dict() if self.given_back is not None else None,
            "rank": rank,
            "world_size": world_size,
            "boundaries_checked": dict(sorted(self.boundaries.items())),
            "total_boundaries": sum(self.boundaries.values()),
            "findings": [{**f.to_dict(), "count": self.counts[f.key]} for f in self.findings],
        }
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=2) + "\n")


@rank_zero_only
def log_summary(text: str) -> None:
    """Log the summary on rank zero."""
    log.info(text)
