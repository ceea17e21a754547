"""Findings: what the check engine reports, with a stable code, the place it was seen and the fix.

Every finding code is documented in ``docs/codes.md``, one section each. Codes never change meaning once
released; a retired code is not reused.

Example:
    >>> f = Finding(code="LV101", module="backbone.bn1", phase="validation", boundary="on_validation_batch_start",
    ...             expected="eval mode", seen="train mode", fix="model.backbone.bn1.eval()")
    >>> print(f.message)
    LV101 submodule in train mode during evaluation: `backbone.bn1` at validation/on_validation_batch_start: \
expected eval mode, saw train mode. Fix: model.backbone.bn1.eval()

"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["CODES", "Finding", "ModeCheckError", "ModeCheckWarning", "OnViolation"]

OnViolation = Literal["warn", "raise"]

#: Every finding code with its one-line title. The 1xx codes are about the state during evaluation, 2xx about
#: what evaluation changed, 3xx about the state during training, 4xx about metric objects.
CODES: dict[str, str] = {
    "LV101": "submodule in train mode during evaluation",
    "LV102": "grad enabled during evaluation",
    "LV103": "non-deterministic forward in eval mode",
    "LV201": "parameter changed by evaluation",
    "LV202": "buffer changed by evaluation",
    "LV203": "requires_grad changed by evaluation",
    "LV204": ".grad changed by evaluation",
    "LV205": "submodule mode not restored after evaluation",
    "LV206": "submodules added or removed by evaluation",
    "LV301": "grad disabled during training",
    "LV302": "trainable submodule in eval mode during training",
    "LV401": "metric object updated in two stages",
    "LV402": "metric object not reset between epochs",
}


class ModeCheckError(RuntimeError):
    """Raised for a finding when the user asked to fail fast (``on_violation="raise"``).

    Attributes:
        findings: the findings that caused the error, first one first.

    """

    def __init__(self, message: str, findings: list[Finding] | None = None) -> None:
        super().__init__(message)
        self.findings: list[Finding] = list(findings or [])


class ModeCheckWarning(UserWarning):
    """Warning category of every finding reported with ``on_violation="warn"``; filter it like any warning."""


@dataclass(frozen=True)
class Finding:
    """One problem the checks found.

    Attributes:
        code: stable code such as ``"LV101"``; see ``CODES`` and ``docs/codes.md``.
        module: qualified name of the submodule, parameter or buffer (``"backbone.bn1"``), ``"<model>"`` for the
            root module, or the name of a global state (``"grad mode"``).
        phase: where it was seen: ``"validation"``, ``"sanity_check"``, ``"test"``, ``"predict"``, ``"train"``,
            ``"evaluating"``.
        boundary: the hook or point inside the phase (``"on_validation_batch_start"``, ``"end"``).
        expected: what should have been seen.
        seen: what was seen.
        fix: the fix, written as code where possible.
        detail: optional extra context (for example the hook that made a change).

    """

    code: str
    module: str
    phase: str
    boundary: str
    expected: str
    seen: str
    fix: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(
                f"Expected argument `code` to be one of the documented codes ({', '.join(CODES)}) but got "
                f"{self.code!r}. Add a new code to `CODES` and a section to docs/codes.md first."
            )

    @property
    def title(self) -> str:
        """The one-line title of this finding's code."""
        return CODES[self.code]

    @property
    def message(self) -> str:
        """A one-line message: code, title, module, where, expected, seen and the fix."""
        where = f"{self.phase}/{self.boundary}" if self.boundary else self.phase
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"{self.code} {self.title}: `{self.module}` at {where}: expected {self.expected}, saw {self.seen}{extra}."
            f" Fix: {self.fix}"
        )

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity used to report a finding once: code, module and phase (not the batch or boundary)."""
        return (self.code, self.module, self.phase)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields plus ``title`` and ``message``."""
        out = asdict(self)
        out["title"] = self.title
        out["message"] = self.message
        return out

    def __str__(self) -> str:
        return self.message
