"""Per-batch device scalars kept in one preallocated buffer until they are folded into running sums.

An accumulator that kept each batch's value as its own small tensor (a Python list of 0-dim tensors) looked free: an
``append`` costs nanoseconds. It is not. Each of those tensors is a small heap allocation that lives for hundreds of
batches, interleaved with the activations of every forward pass; on glibc's allocator they keep the freed
activation memory from being reused, and the next forward's large buffers come from fresh pages: thousands of page
faults per epoch, up to 10% of a small model's evaluation time on a CPU (``benchmarks/user_config.py``). A
``Slots`` buffer is allocated once per fold window; a batch copies its scalar into the next slot (one small copy
kernel, through a view made once), and the fold reads the filled slots as one tensor.

Example:
    >>> import torch
    >>> slots = Slots(torch.float64)
    >>> for value in (torch.tensor(1.5), torch.tensor(2.5, dtype=torch.bfloat16)):
    ...     slots.add(value)
    >>> slots.take()  # the filled slots, in the buffer's dtype; the buffer is empty again
    tensor([1.5000, 2.5000], dtype=torch.float64)
    >>> len(slots)
    0

"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FOLD_EVERY", "Slots", "sum_dtype"]

#: Slots per buffer: device scalars kept before they are folded into running sums (bounds memory, amortizes cost).
FOLD_EVERY = 256


def sum_dtype(device: torch.device) -> torch.dtype:
    """Dtype for sums of losses and metric values on ``device``: float64 (exact epoch means), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class Slots:
    """A fixed-size buffer on the device of the first value, that per-batch scalars are copied into.

    Args:
        dtype: the buffer's dtype: a floating dtype means the sum dtype of the device (float64; float32 on MPS),
            an integer dtype is kept as it is.
        size: the number of slots; ``full`` says when the owner must ``take()`` them.
    """

    def __init__(self, dtype: torch.dtype, size: int = FOLD_EVERY) -> None:
        self.dtype = dtype
        self.size = size
        self._buffer: Tensor | None = None
        self._views: tuple[Tensor, ...] = ()
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def __getstate__(self) -> dict[str, object]:
        # Copies (deepcopy, pickle) keep the filled values; the views are rebuilt on the copy's own buffer, since
        # copied one by one they would no longer write into it.
        filled = self._buffer[: self._filled].clone() if self._buffer is not None else None
        return {"dtype": self.dtype, "size": self.size, "filled": filled}

    def __setstate__(self, state: dict[str, object]) -> None:
        dtype, size, filled = state["dtype"], state["size"], state["filled"]
        assert isinstance(dtype, torch.dtype) and isinstance(size, int)
        self.__init__(dtype, size)  # type: ignore[misc]
        if isinstance(filled, Tensor):
            for value in filled:
                self.add(value)

    @property
    def full(self) -> bool:
        """Whether every slot is filled."""
        return self._filled >= self.size

    def add(self, value: Tensor) -> None:
        """Copy a 0-dim (or one-element) tensor into the next slot; no host-device sync, nothing allocated."""
        if value.requires_grad:  # copying a graph's output in grad mode would record the copy
            value = value.detach()
        if self._buffer is None or self._buffer.device != value.device:
            self._allocate(value.device)
        self._views[self._filled].copy_(value.reshape(()) if value.ndim else value)
        self._filled += 1

    def take(self) -> Tensor | None:
        """The filled slots as one tensor (a view, valid until the next ``add``), and the buffer empty; or ``None``."""
        if not self._filled or self._buffer is None:
            return None
        filled, self._filled = self._filled, 0
        return self._buffer[:filled]

    def _allocate(self, device: torch.device) -> None:
        dtype = sum_dtype(device) if self.dtype.is_floating_point else self.dtype
        kept = self._buffer[: self._filled] if self._buffer is not None else None  # a value came on another device
        # A normal tensor even when the first value comes inside inference_mode: it is written in place in later
        # stages too (trainer.validate, then fit), which an inference tensor does not allow.
        with torch.inference_mode(False):
            self._buffer = torch.zeros(self.size, dtype=dtype, device=device)
            self._views = self._buffer.unbind(0)
            if kept is not None and len(kept):
                self._buffer[: len(kept)] = kept.to(device=device, dtype=dtype)
