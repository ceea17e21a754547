"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """Give every test the process-wide torch settings the previous one found.

    `Trainer(deterministic=True)` (the LightningCLI example's config) switches on deterministic algorithms for the
    whole process and never switches them off; torchmetrics then takes other code paths (no `bincount`, no range
    check of targets), so later tests would depend on test order. Grad mode is restored for the same reason.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    grad = torch.is_grad_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_grad_enabled(grad)


@pytest.fixture(autouse=True)
def _no_process_group_left() -> Iterator[None]:
    """A test that starts a process group in this process ends it before the next test.

    A gloo group still alive at interpreter shutdown can abort the process (pytorch #190489; see
    ``distributed_exit.py``), so a test that leaves one fails here, after its group is destroyed.
    """
    yield
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("The test left a process group initialized: destroy it in a `finally` "
                    "(`distributed_exit.ended_process_group()`).")
