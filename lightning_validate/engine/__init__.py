"""The check engine: snapshot a module, compare two snapshots, check a state, return findings.

The ground floor of the package: plain torch, no Lightning and no adapter is imported here (a test enforces it).
``evaluating()``, ``validate()``, ``ModeCheck`` and ``ValidationMixin`` are adapters over it. By concern:

- ``names``: qualified names through wrappers, one walk over a module, glob allowlists, grouping;
- ``fingerprint``: content fingerprints kept on the device until compared;
- ``snapshot``: ``Snapshot``, ``take_snapshot``, ``give_back`` (flags back from a snapshot) and
  ``initialised_buffers`` (placeholders filled in on the first forward, not a change);
- ``compare``: ``compare`` (LV201 to LV206);
- ``state``: ``ModeIndex``, ``check_eval_state`` (LV101, LV102), ``check_train_state`` (LV301, LV302).
"""

from __future__ import annotations

from lightning_validate.engine.compare import compare
from lightning_validate.engine.names import Globs, unwrap
from lightning_validate.engine.snapshot import Snapshot, give_back, initialised_buffers, take_snapshot
from lightning_validate.engine.state import ModeIndex, check_eval_state, check_train_state

__all__ = [
    "Globs",
    "ModeIndex",
    "Snapshot",
    "check_eval_state",
    "check_train_state",
    "compare",
    "give_back",
    "initialised_buffers",
    "take_snapshot",
    "unwrap",
]
