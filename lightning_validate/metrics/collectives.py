"""What a collective leaves behind: wait until the backend has let go of the tensors it was given.

A gloo collective returns when its result is ready, but the backend's worker thread still holds the tensors for a
moment (about one ``all_gather`` in ten on a busy 2-core machine), and letting go of a tensor that Python also holds
takes the GIL. If the process reaches interpreter shutdown in that moment (a ``ddp_spawn`` worker returns right after
its last collective), the thread gets the GIL only once shutdown has begun, Python ends the thread from inside C++,
and the process aborts with ``terminate called without an active exception`` (pytorch #190489). The package's own
collectives (``ModeCheck``'s exchange of findings, the mixin's epoch sums) therefore return only once ``released``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

__all__ = ["released"]

#: The longest wait for the backend to let go of a collective's tensors; it normally takes microseconds. Past it the
#: caller goes on anyway: a slow backend thread then keeps the risk it had before, it never hangs the run.
_RELEASE_TIMEOUT_S = 1.0


def released(tensors: Sequence[torch.Tensor], timeout_s: float = _RELEASE_TIMEOUT_S) -> bool:
    """Wait until nothing but Python holds ``tensors``: the collective's backend thread has let go of them.

    The thread takes the GIL to let go, so this sleeps (which gives the GIL up) between looks. GPU tensors are not
    waited for: NCCL's watchdog lets go of them later by design, and Lightning destroys NCCL process groups at
    exit, before interpreter shutdown. Returns whether they were let go of within ``timeout_s``.

    Example:
        >>> released([torch.zeros(1)])
        True

    """
    use_count = getattr(torch.Tensor, "_use_count", None)  # private in torch; without it, nothing to wait for
    watched = [t for t in tensors if t.device.type == "cpu"]
    if use_count is None or not watched:
        return True
    deadline = time.monotonic() + timeout_s
    pause = 1e-5
    while any(use_count(t) > 1 for t in watched):
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)
    return True
