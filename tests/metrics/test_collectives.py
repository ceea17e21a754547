"""``released``: waiting until a collective's backend thread has let go of its tensors, bounded by a timeout.

The package's own collectives (``ModeCheck``'s exchange, ``tests/mode_check/test_rank_agreement.py``; the mixin's
epoch sums, ``tests/mixin/test_epoch_ddp.py``) are checked with real gloo processes; here, the wait itself.
"""

from __future__ import annotations

import torch

from lightning_validate.metrics.collectives import released


def test_returns_at_once_for_tensors_only_python_holds() -> None:
    assert released([torch.zeros(3), torch.ones(2)], timeout_s=0.0)


def test_gives_up_after_its_timeout_on_a_tensor_held_elsewhere() -> None:
    t = torch.zeros(1, requires_grad=True)
    graph = t * t  # the autograd graph holds `t` on the C++ side, as a backend thread would
    assert not released([t], timeout_s=0.01)
    del graph
    assert released([t], timeout_s=0.01)


def test_does_not_wait_for_tensors_off_the_cpu() -> None:
    t = torch.zeros(1, device="meta", requires_grad=True)
    graph = t * t  # held elsewhere, but not a gloo tensor on the CPU: NCCL's are let go of by its watchdog
    assert released([t], timeout_s=0.0)
    del graph
