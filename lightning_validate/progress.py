"""Progress display helpers shared by ``validate()`` and ``ValidationMixin``.

Running values on a bar need a host-device synchronization each time they are read, so they are read at most a
few times per second (``Throttle``), never per batch.

Example:
    >>> t = Throttle(interval=0.0)
    >>> t.due()
    True
    >>> format_postfix({"loss": 0.12345, "acc": 0.9})
    {'loss': '0.123', 'acc': '0.900'}
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

__all__ = ["Throttle", "format_postfix"]

#: Default seconds between two refreshes of the running values: "a few times per second".
DEFAULT_INTERVAL = 0.25


class Throttle:
    """Say when a refresh is due: at most once per ``interval`` seconds (monotonic clock).

    The first call is always due, so short runs still show a value.

    Args:
        interval: seconds between two refreshes; ``0`` refreshes every time.

    Raises:
        ValueError: if ``interval`` is negative or not finite.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        if not isinstance(interval, (int, float)) or not math.isfinite(interval) or interval < 0:
            raise ValueError(f"Expected `interval` to be a finite number >= 0 (seconds) but got {interval!r}.")
        self.interval = float(interval)
        self._last = -math.inf

    def due(self) -> bool:
        """Return ``True`` (and start a new interval) when a refresh is due."""
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        """Make the next call due."""
        self._last = -math.inf


def format_postfix(values: Mapping[str, float], digits: int = 3) -> dict[str, str]:
    """Format running values for a tqdm postfix: fixed digits, so the bar does not jitter in width."""
    return {name: f"{value:.{digits}f}" for name, value in values.items()}
