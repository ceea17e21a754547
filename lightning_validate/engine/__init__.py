"""The check engine: snapshot a module, compare two snapshots, check a state, return findings.

The ground floor of the package: plain torch, no Lightning and no adapter is imported here (a test enforces it).
``evaluating()``, ``validate()``, ``ModeCheck`` and ``ValidationMixin`` are adapters over it. By concern:

- ``names``: qualified names through wrappers, one walk over a module, glob allowlists, grouping;
- ``fingerprint``: content fingerprints kept on the device until compared;
- ``snapshot``: ``Snapshot``, ``take_snapshot``, ``give_back`` (flags back from a snapshot);
- ``buffers``: which buffer changes are not state (``not_state``: placeholders filled in, non-persistent caches
  rebuilt, fake-quantization parameters recomputed; ``initialised_buffers``), and what owns a buffer, for the fix;
- ``compare``: ``compare`` (LV201 to LV206);
- ``state``: ``ModeIndex``, ``check_eval_state`` (LV101, LV102), ``check_train_state`` (LV301, LV302).
"""

from __future__ import annotations

from lightning_validate.engine.buffers import NotState, initialised_buffers, not_state
from lightning_validate.engine.compare import compare
from lightning_validate.engine.names import Globs, unwrap
from lightning_validate.engine.snapshot import Snapshot, give_back, take_snapshot
from lightning_validate.engine.state import ModeIndex, check_eval_state, check_train_state

__all__ = [
    "Globs",
    "ModeIndex",
    "NotState",
    "Snapshot",
    "check_eval_state",
    "check_train_state",
    "compare",
    "give_back",
    "initialised_buffers",
    "not_state",
    "take_snapshot",
    "unwrap",
]
