"""lightning-validate: model validation in PyTorch and PyTorch Lightning, correct, checked and fast.

Three rules of validation: switch the model to eval mode, turn gradients off, and afterwards give the model back
exactly as it was. ``evaluating()`` and ``validate()`` apply them in plain PyTorch, ``ValidationMixin`` supplies
exact, sync-free validation and test steps for Lightning, and ``ModeCheck`` checks all three rules at every phase
boundary of a Lightning run.

``import lightning_validate`` does not import Lightning: ``ModeCheck`` and ``ValidationMixin`` load it on first use.

Example:
    >>> import torch
    >>> from lightning_validate import evaluating
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    >>> with evaluating(model):
    ...     (model.training, torch.is_grad_enabled())
    (False, False)
    >>> model.training
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_validate.__about__ import __version__
from lightning_validate.engine import Snapshot, compare, take_snapshot
from lightning_validate.findings import CODES, Finding, ModeCheckError, ModeCheckWarning
from lightning_validate.metrics.intervals import Intervals
from lightning_validate.metrics.loss_terms import LossMean, LossTerms
from lightning_validate.metrics.paired import PairedReport
from lightning_validate.metrics.records import SampleRecord
from lightning_validate.plain.context import evaluating

if TYPE_CHECKING:
    from lightning_validate.mixin.mixin import ValidationMixin
    from lightning_validate.mode_check.callback import ModeCheck
    from lightning_validate.plain.loop import validate
    from lightning_validate.plain.paired import paired_comparison, record_samples

__all__ = [
    "CODES",
    "Finding",
    "Intervals",
    "LossMean",
    "LossTerms",
    "ModeCheck",
    "ModeCheckError",
    "ModeCheckWarning",
    "PairedReport",
    "SampleRecord",
    "Snapshot",
    "ValidationMixin",
    "__version__",
    "compare",
    "evaluating",
    "paired_comparison",
    "record_samples",
    "take_snapshot",
    "validate",
]

# Names whose modules import Lightning (or tqdm) are loaded on first attribute access, so that plain-PyTorch
# users of `evaluating()` pay nothing for Lightning.
_LAZY = {
    "ModeCheck": "lightning_validate.mode_check.callback",
    "ValidationMixin": "lightning_validate.mixin.mixin",
    "validate": "lightning_validate.plain.loop",
    "paired_comparison": "lightning_validate.plain.paired",
    "record_samples": "lightning_validate.plain.paired",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_validate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
