"""Looking at a batch without reading its values.

Sample counts from shapes, descriptions for error messages, and moving nested batches to a device.

Example:
    >>> import torch
    >>> describe((torch.zeros(4, 2), [1, 2], {"x": 1}))
    "a tuple of 3: (Tensor(shape=(4, 2), dtype=float32), a list of 2, a dict with keys ['x'])"

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

__all__ = ["batch_size_of", "describe", "to_device", "unpack_example"]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch (tuples, lists, dicts, namedtuples, dataclasses) to ``device``.

    Tensors already there are not touched; copies are ``non_blocking`` (a pinned CPU batch overlaps the copy).
    """
    if type(batch) in (tuple, list):  # the common case, `(inputs, target)` already there: no walk, no new containers
        for t in batch:
            if not isinstance(t, Tensor) or t.device != device:
                break
        else:
            return batch

    def move(t: Tensor) -> Tensor:
        return t if t.device == device else t.to(device, non_blocking=True)

    return apply_to_collection(batch, Tensor, move)


def batch_size_of(obj: Any) -> int | None:
    """Number of samples in a batch's target (or outputs), read from shapes only (no host-device sync).

    - a tensor: its first dimension (``None`` for a 0-dim tensor);
    - a dict: that of its first value with a size (a dict of per-task batch tensors);
    - a list or tuple of tensors whose batch dimensions agree: that dimension (per-task targets, as
      ``default_collate`` gives them; 0-dim tensors are ignored);
    - any other non-empty list or tuple: its length (per-sample items: the dicts of a detection batch, tensors of
      different lengths, strings);
    - anything else: ``None``.

    Example:
        >>> y = torch.zeros(5)
        >>> batch_size_of(y), batch_size_of([y, y]), batch_size_of([{"boxes": torch.zeros(3, 4)}] * 2)
        (5, 5, 2)
    """
    if isinstance(obj, Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    if isinstance(obj, Mapping):
        for value in obj.values():
            size = batch_size_of(value)
            if size is not None:
                return size
        return None
    if isinstance(obj, (list, tuple)) and obj:
        if all(isinstance(item, Tensor) for item in obj):
            sizes = {int(item.shape[0]) for item in obj if item.ndim}
            if len(sizes) == 1:
                return sizes.pop()
        return len(obj)
    return None


def describe(obj: object, depth: int = 0) -> str:
    """Type and structure of a batch or a value, for error messages.

    Example:
        >>> describe((torch.zeros(4, 2), [1, 2], {"x": 1}))
        "a tuple of 3: (Tensor(shape=(4, 2), dtype=float32), a list of 2, a dict with keys ['x'])"

    """
    if obj is None:
        return "None"
    if isinstance(obj, Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={str(obj.dtype).removeprefix('torch.')})"
    if isinstance(obj, Mapping):
        return f"{_article(type(obj).__name__)} with keys {list(obj)!r}"
    if isinstance(obj, (tuple, list)):
        if depth >= 1 or not obj:
            return f"a {type(obj).__name__} of {len(obj)}"
        inner = ", ".join(describe(x, depth + 1) for x in obj[:4])
        return f"a {type(obj).__name__} of {len(obj)}: ({inner}{', ...' if len(obj) > 4 else ''})"
    return _article(type(obj).__name__)


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def unpack_example(batch: object) -> tuple[str, str]:
    """Expressions that take ``(inputs, target)`` out of ``batch``, for the fix an unpack error names.

    Example:
        >>> unpack_example({"image": 1, "label": 2})
        ("batch['image']", "batch['label']")

    """
    if isinstance(batch, Mapping) and len(batch) >= 2:
        keys = list(batch)
        return f"batch[{keys[0]!r}]", f"batch[{keys[1]!r}]"
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return "batch[0]", "batch[1]"
    return "<inputs from batch>", "<target from batch>"
