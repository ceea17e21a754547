"""The no-sync tests' tool: calls that read a tensor back to the host raise, as each would sync with a GPU.

Each test module names what it forbids (``FORBIDDEN``: ``(owner, attribute)`` pairs), since what counts as a read
back depends on the path under test (``__index__`` in loss terms, ``masked_select`` in the intervals' path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import pytest

__all__ = ["no_host_sync"]


def _forbid(name: str) -> Callable[..., None]:
    def raiser(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"host-device sync: {name} called in the path under test")

    return raiser


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch, forbidden: Iterable[tuple[object, str]]) -> Iterator[None]:
    """Inside the block, every ``owner.attribute`` of ``forbidden`` raises ``AssertionError`` naming it."""
    with monkeypatch.context() as m:
        for owner, name in forbidden:
            m.setattr(owner, name, _forbid(name))
        yield
