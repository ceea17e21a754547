"""What ``ModeCheck`` does with each finding: ignore, count, warn once or raise, and agree across ranks.

Kept apart from the callback and from ``RunReport`` (which only records): the reporting policy is the one place that
decides between a warning and an error, and under DDP and FSDP it holds back a rank's findings until the next
boundary that every rank passes, so that all ranks warn the same or raise together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from lightning_validate.findings import Finding, ModeCheckError, ModeCheckWarning, Policy
from lightning_validate.mode_check.rank_agreement import agreed_error, share_findings
from lightning_validate.mode_check.report import RunReport

__all__ = ["Reporter"]


class Reporter:
    """The reporting policy of one run.

    Args:
        policy: warn or raise.
        ignore: finding codes to silence.
        findings: the callback's findings over all its runs (appended to; a finding seen in an earlier run is not
            warned again).
        run: the latest run's record: counts and distinct findings.
        world_size: the number of ranks, read when a finding comes (1 outside a run).

    Example:
        >>> from lightning_validate.findings import make_finding
        >>> f = make_finding("LV301", module="grad mode", phase="train", boundary="on_train_batch_start",
        ...                  expected="grad enabled", seen="grad disabled")
        >>> reporter = Reporter(Policy.RAISE, frozenset(), [], RunReport("fit"), lambda: 1)
        >>> reporter.report([f])
        Traceback (most recent call last):
        ...
        lightning_validate.findings.ModeCheckError: LV301 grad disabled during training: ...

    """

    def __init__(self, policy: Policy, ignore: frozenset[str], findings: list[Finding], run: RunReport,
                 world_size: Callable[[], int]) -> None:
        self.policy = policy
        self.ignore = ignore
        self.findings = findings
        self.run = run
        self.world_size = world_size
        self.pending: list[Finding] = []  # told to the other ranks at the next `sync`

    def report(self, findings: Sequence[Finding], shared: bool = False) -> None:
        """Count each finding; warn once per distinct finding, or raise (with several ranks: at the next sync)."""
        for f in findings:
            if f.code in self.ignore or not self.run.add(f):
                continue
            known = any(g.key == f.key for g in self.findings)
            if not known:
                self.findings.append(f)
            if self.policy is Policy.WARN:
                if self.world_size() > 1 and not shared:
                    self.pending.append(f)  # told to the other ranks at the next `sync`
                if known:  # warned in an earlier run of this callback: once per distinct finding
                    continue
                rank_zero_warn(f.message, category=ModeCheckWarning)
            elif self.world_size() > 1:
                self.pending.append(f)  # raised together with the other ranks at the next `sync`
            else:
                raise ModeCheckError(f.message, [f])

    def sync(self, boundary: str) -> None:
        """Under DDP and FSDP: every rank learns every rank's findings; with ``"raise"`` all raise together.

        A collective: every rank must call it at the same boundary. Under sharding a write may touch one rank's
        shard only: the other ranks report it too (with ``"warn"``, rank zero prints it).
        """
        if self.world_size() <= 1:
            return
        mine, self.pending = self.pending, []
        shared = share_findings(mine)
        if self.policy is Policy.RAISE:
            error = agreed_error(mine, shared, boundary)
            if error is not None:
                raise error
        else:
            self.report([f for _, f in shared if f.key not in self.run.counts], shared=True)
