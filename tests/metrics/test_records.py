"""Sample records: saved and loaded as they were, merged across processes by sample index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_validate.metrics.records import SampleRecord, fingerprints


def make(ids: list[int]) -> SampleRecord:
    n = len(ids)
    rows = torch.stack([torch.tensor(ids, dtype=torch.float64) % 2, torch.ones(n, dtype=torch.float64)], 1)
    return SampleRecord(ids=torch.tensor(ids), fingerprint=torch.tensor(ids, dtype=torch.float64) * 3,
                        rows={"acc": rows},
                        kinds={"acc": "proportion", "f1": "bootstrap"}, replicates={"f1": torch.linspace(0, 1, 5)},
                        values={"acc": 0.5, "f1": 0.4}, seed=3, confidence=0.9)


def test_save_and_load_give_the_record_back(tmp_path: Path) -> None:
    record = make([0, 1, 2, 3])
    record.save(tmp_path / "a.pt")
    loaded = SampleRecord.load(tmp_path / "a.pt")
    assert torch.equal(loaded.ids, record.ids) and torch.equal(loaded.rows["acc"], record.rows["acc"])
    assert loaded.values == record.values and loaded.seed == 3 and loaded.confidence == 0.9
    assert torch.equal(loaded.replicates["f1"], record.replicates["f1"])
    assert repr(loaded) == "SampleRecord(4 samples: acc (proportion), f1 (bootstrap))"
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"Expected a sample record \(saved with `SampleRecord.save`\) but got dict "
                                         r"with keys \['weights'\]"):
        SampleRecord.load(tmp_path / "other.pt")


def test_merge_joins_the_processes_samples_in_index_order() -> None:
    merged = SampleRecord.merge([make([0, 2, 4]), make([1, 3])])  # DistributedSampler's layout on 2 processes
    assert torch.equal(merged.ids, torch.arange(5))
    assert torch.equal(merged.rows["acc"][:, 0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(merged.fingerprint, torch.arange(5, dtype=torch.float64) * 3)
    with pytest.raises(ValueError, match="Expected at least one record to merge but got none"):
        SampleRecord.merge([])
    other = make([5])
    other.seed = 4
    with pytest.raises(ValueError, match="Expected records of one evaluation"):
        SampleRecord.merge([make([0]), other])


def test_fingerprints_change_with_the_target_and_its_order() -> None:
    target = torch.tensor([[1, 2], [2, 1], [1, 2]])
    found = fingerprints(target, 3)
    assert found is not None and found[0] == found[2] and found[0] != found[1]
    assert fingerprints([1, 2], 2) is None
