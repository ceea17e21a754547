"""Every process the distributed tests start ends its process group before it exits, whatever way it leaves.

Why (pytorch #190489): a gloo collective returns while the backend's worker thread still holds its tensors, and
letting go of a tensor that Python also holds takes the GIL. A process that reaches interpreter shutdown with its
process group alive destroys the group during shutdown; a worker thread still waiting for the GIL then gets it, finds
the interpreter finalizing and exits from inside C++: ``terminate called without an active exception``, SIGABRT.
Lightning 2.6 destroys the group at exit for NCCL only, never for gloo, so the tests do it themselves:

- ``DDPSpawn()`` is Lightning's ``"ddp_spawn"`` whose workers destroy their group when they return or raise;
- ``ended_process_group()`` wraps the body of a script that launches its own ranks (``sharded_scenarios.py``).

Destroying a group waits for the collectives still in flight; after an error, one whose other ranks never come would
hold it until the group's timeout (30 minutes under Lightning). So the destroy is waited for ``timeout_s`` at most,
and the worker's own error goes on either way.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

__all__ = ["DDPSpawn", "end_process_group", "ended_process_group", "free_port"]


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous (``tcp://127.0.0.1:<port>``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_process_group(timeout_s: float = 60.0) -> bool:
    """Destroy this process's default process group, if there is one; whether none is left.

    Example:
        >>> end_process_group()  # no group: nothing to do
        True

    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    ender = threading.Thread(target=dist.destroy_process_group, name="end-process-group", daemon=True)
    ender.start()
    ender.join(timeout_s)
    return not ender.is_alive()


@contextmanager
def ended_process_group(timeout_s: float = 60.0) -> Iterator[None]:
    """Run the body, then destroy the process group, also when the body raises (its error propagates)."""
    try:
        yield
    finally:
        end_process_group(timeout_s)


class _EndingLauncher(_MultiProcessingLauncher):
    """Lightning's launcher for ``ddp_spawn``; each worker destroys its process group before it returns or raises."""

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        with ended_process_group():
            super()._wrapping_function(*args, **kwargs)


class DDPSpawn(DDPStrategy):
    """``strategy="ddp_spawn"``, whose workers end their process group on every way out (see the module docstring).

    Example:
        >>> DDPSpawn()._start_method
        'spawn'

    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    @override
    def _configure_launcher(self) -> None:
        self._launcher = _EndingLauncher(self, start_method=self._start_method)
