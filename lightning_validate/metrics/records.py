"""A compact record of one evaluation, per sample and per replicate, so that two runs can be compared later.

A paired comparison of two checkpoints needs, for each sample, what each checkpoint scored on it (McNemar counts
the samples one got right and the other wrong; a paired t-test takes the difference of two losses on the same
sample), and, for metrics without a per-sample form (macro F1), the bootstrap replicates both computed with the
same weights. ``SampleRecord`` keeps exactly that: per sample its index, a fingerprint of its target (to catch two
runs that did not see the samples in the same order) and, for each value, the sample's ``(sum, weight)`` terms
(for an accuracy: correct or not, and 1); per bootstrap metric its ``B`` replicate values. A few bytes per sample
and value: 50,000 samples with a loss and an accuracy take under 2 MB.

Example:
    >>> import torch
    >>> record = SampleRecord(ids=torch.arange(3), fingerprint=torch.zeros(3, dtype=torch.float64),
    ...                       rows={"acc": torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)},
    ...                       kinds={"acc": "proportion"}, values={"acc": 2 / 3})
    >>> record.samples, sorted(record.values)
    (3, ['acc'])

"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["KINDS", "TRANSFORMS", "SampleRecord"]

#: How a value is built: "proportion" (per sample: successes and trials), "ratio" (per sample: a numerator and a
#: denominator), "bootstrap" (no per-sample form: replicate values).
KINDS = ("proportion", "ratio", "bootstrap")
#: What is applied to a ratio to give the logged value: RMSE is the square root of an MSE, perplexity the exp of a
#: loss, Hamming distance one minus an accuracy.
TRANSFORMS = ("", "sqrt", "exp", "complement")

_FORMAT = "lightning-validate sample record"
_VERSION = 1


@dataclass
class SampleRecord:
    """What one evaluation saw, per sample and per bootstrap replicate; see the module docstring.

    Attributes:
        ids: each sample's index in the evaluation order, int64 ``(N,)``.
        fingerprint: a number per sample computed from its target (``nan`` if the target is not one tensor).
        rows: per value name, float64 ``(N, 2)``: the sample's numerator and denominator.
        kinds: per value name, one of ``KINDS``.
        transforms: per value name, one of ``TRANSFORMS`` (absent: none).
        replicates: per bootstrap value name, its ``B`` replicate values.
        values: every value of the evaluation, as logged.
        seed: the bootstrap's seed; two records compare replicate by replicate only with the same seed.
        confidence: the confidence level the evaluation's intervals used.
    """

    ids: Tensor
    fingerprint: Tensor
    rows: dict[str, Tensor] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)
    replicates: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    confidence: float = 0.95

    @property
    def samples(self) -> int:
        """The number of samples recorded."""
        return int(self.ids.numel())

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings, for ``torch.save`` (``save`` writes it to a file)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "ids": self.ids.cpu(),
            "fingerprint": self.fingerprint.cpu(),
            "rows": {k: v.cpu() for k, v in self.rows.items()},
            "kinds": dict(self.kinds),
            "transforms": dict(self.transforms),
            "replicates": {k: v.cpu() for k, v in self.replicates.items()},
            "values": dict(self.values),
            "seed": self.seed,
            "confidence": self.confidence,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SampleRecord:
        """The record ``state_dict()`` gave.

        Raises:
            ValueError: if ``state`` is not a sample record's state.
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            keys = f" with keys {sorted(state)[:6]!r}" if isinstance(state, Mapping) else ""
            raise ValueError(
                f"Expected a sample record (saved with `SampleRecord.save`) but got {type(state).__name__}{keys}."
            )
        return cls(
            ids=state["ids"], fingerprint=state["fingerprint"], rows=dict(state["rows"]), kinds=dict(state["kinds"]),
            transforms=dict(state["transforms"]), replicates=dict(state["replicates"]), values=dict(state["values"]),
            seed=int(state["seed"]), confidence=float(state["confidence"]),
        )

    def save(self, path: str | Path) -> None:
        """Write the record to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> SampleRecord:
        """Read a record written by ``save``."""
        return cls.from_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))

    @classmethod
    def merge(cls, records: Sequence[SampleRecord]) -> SampleRecord:
        """One record from the records of the processes of one evaluation (each saw its own samples).

        The replicate values and the values are the evaluation's (the same on every process); the samples are
        joined and sorted by index.

        Raises:
            ValueError: if no record is given, or they do not come from one evaluation (other values or seeds).
        """
        if not records:
            raise ValueError("Expected at least one record to merge but got none.")
        first = records[0]
        for other in records[1:]:
            if other.seed != first.seed or set(other.rows) != set(first.rows):
                raise ValueError("Expected records of one evaluation (the same values and seed) but they differ.")
        ids = torch.cat([r.ids.cpu() for r in records])
        order = torch.argsort(ids)
        return cls(
            ids=ids[order],
            fingerprint=torch.cat([r.fingerprint.cpu() for r in records])[order],
            rows={k: torch.cat([r.rows[k].cpu() for r in records])[order] for k in first.rows},
            kinds=dict(first.kinds), transforms=dict(first.transforms),
            replicates={k: v.cpu() for k, v in first.replicates.items()}, values=dict(first.values),
            seed=first.seed, confidence=first.confidence,
        )

    def __repr__(self) -> str:
        names = ", ".join(f"{k} ({self.kinds.get(k, '?')})" for k in self.values)
        return f"SampleRecord({self.samples} samples: {names})"


def fingerprints(target: Any, n: int) -> Tensor | None:
    """A float64 number per sample from its target (a weighted sum of its elements), or ``None`` if not a tensor."""
    if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != n:
        return None
    flat = target.detach().reshape(n, -1).to(torch.float64)
    # Position weights make a permutation inside a sample change its fingerprint too.
    weights = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64, device=flat.device) * (1 + 1 / math.pi)
    return flat @ weights + flat.sum(1)
