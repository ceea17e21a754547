"""benchmarks/gpu.py works before a GPU is lent: its dry run goes through every path, and without CUDA it says so.

The GPU run happens once per lent machine (docs/gpu-run.md), so every code path it takes is run here on the CPU
first (``--dry-run``: tiny sizes, sync counts "n/a on CPU"). The sync counting itself is tested by feeding it the
warning that ``torch.cuda.set_sync_debug_mode("warn")`` issues.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gpu = _load()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One dry run as a user starts it: a subprocess, this checkout's package first on the path."""
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "-u", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"the dry run exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout, json.loads(out.read_text())


def test_dry_run_prints_a_row_for_every_path(dry_run: tuple[str, dict[str, Any]]) -> None:
    stdout, _ = dry_run
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model / section | path | batch | ms |")

    def rows(section: str, path: str) -> list[str]:
        return [line for line in table if line.startswith(f"| {section}") and f"| {path} |" in line]

    plain = (gpu.PLAIN_FLOOR, gpu.PLAIN_SAME, gpu.PLAIN_USUAL, gpu.VALIDATE_ACC)
    lightning = (gpu.FLOOR, gpu.SAME, gpu.IDIOM, gpu.MIXIN, gpu.MIXIN_MC)
    for path in plain:
        assert len(rows("MLP, plain PyTorch", path)) == 2, path  # batch 4 and 16 in the dry run (64, 4096 on a GPU)
    for path in lightning:
        assert len(rows("MLP, Lightning", path)) == 2, path
    syncs_only = [gpu.VALIDATE_LOSS, gpu.VALIDATE_ACC_NOCHECK, gpu.VALIDATE_BAR, gpu.FLOOR_MC]
    for label in ("Lightning floor: least `training_step`, forward-only evaluation", "`ValidationMixin`",
                  "`ValidationMixin` + `ModeCheck()`"):
        syncs_only += [f"{label}: `{step}` (fit, test)" for step in ("training_step", "validation_step", "test_step")]
    for path in syncs_only:
        (row,) = rows("MLP, syncs only", path)
        assert row.rstrip().endswith("| n/a on CPU |  |"), row
    for arch, source in (("resnet50", "tiny self-contained ResNet"), ("vit_b_16", "tiny self-contained ViT")):
        section = f"{arch}, dry run: {source}"
        for path in lightning:
            assert len(rows(section, path)) == 1, (arch, path)
        for path in ("one forward pass, batch 2, eval, `no_grad` (floor)",
                     "ModeCheck's snapshot: `take_snapshot(model)`",
                     "ModeCheck's check of one evaluation: `take_snapshot` + `compare`"):
            assert len(rows(section, path)) == 1, (arch, path)
    fsdp = "dry run: `strategy='auto'` on the CPU (FSDP needs CUDA)"
    (exact,) = rows(fsdp, "mixin `val/loss`, `val/acc` vs a float64 reference over all samples")
    assert exact.rstrip().endswith(": exact |"), exact
    (clean,) = rows(fsdp, "`ModeCheck()` on `fit` (with sanity check) and `validate`, clean model")
    assert clean.rstrip().endswith("| no findings |"), clean
    (param,) = rows(fsdp, "`ModeCheck()` with a planted bug: head scaled in place in `validation_step`")
    assert "| caught (LV201 expected; seen: LV201 `net.8`) |" in param
    (mode,) = rows(fsdp, "`ModeCheck()` with a planted bug: BatchNorm set to train mode in `validation_step`")
    assert "caught (LV101 expected; seen: LV101 `net.1`" in mode
    assert "- goal: 0 syncs per batch in every evaluation path of ours" in stdout
    assert "n/a on CPU (not evaluated)" in stdout


def test_dry_run_writes_the_json(dry_run: tuple[str, dict[str, Any]]) -> None:
    stdout, payload = dry_run
    assert payload["errors"] == {}
    assert payload["env"]["dry_run"] is True
    assert payload["markdown"] in stdout
    assert {g["goal"] for g in payload["goals"]} >= {gpu.SYNC_GOAL}
    assert all(g["met"] is None for g in payload["goals"])  # a dry run evaluates no goal
    fsdp = payload["raw"]["fsdp"]
    reference = fsdp["reference"]
    (entry,) = [v for k, v in fsdp.items() if k != "reference"]
    # The mixin against the float64 loop over all samples, and the usual mean of batch means, which is not exact
    # with a short last batch: the check can tell them apart.
    assert entry["exact"]["mixin"]["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
    assert entry["exact"]["mixin"]["val/acc"] == pytest.approx(reference["val/acc"], abs=1e-6)
    assert abs(reference["mean of batch means (the usual loop's loss)"] - reference["val/loss"]) > 1e-4


def test_without_cuda_it_exits_with_a_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks/gpu.py needs a CUDA GPU, but torch.cuda.is_available() is False (torch ")
    assert err.rstrip().endswith(
        "Run it on the GPU machine (docs/gpu-run.md), or pass --dry-run to run every code path on the CPU with tiny "
        "sizes."
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the exit on a machine without CUDA")
def test_without_cuda_the_script_exits_non_zero() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "needs a CUDA GPU, but torch.cuda.is_available() is False" in proc.stderr
    assert proc.stdout == ""


def _sync(n: int = 1) -> None:
    for _ in range(n):
        # What torch issues for each synchronizing call under set_sync_debug_mode("warn").
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1.)",
                      UserWarning, stacklevel=1)


def test_sync_counter_counts_per_batch_window(monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.warns(UserWarning, match="^unrelated$"), gpu.SyncCounter(enabled=True) as counter:
        _sync()  # before the first batch: per epoch
        for syncs in (3, 0, 1, 0, 2):  # first batch 3, interior 0, 1, 0, last 2
            counter.mark("val")
            _sync(syncs)
        counter.mark("epoch_end")
        _sync(2)
        warnings.warn("unrelated", UserWarning, stacklevel=1)  # still shown, not counted
    assert modes == ["warn", "default"]
    summary = counter.summary("val")
    assert summary["windows"] == [3, 0, 1, 0, 2]
    assert summary["per_batch"] == pytest.approx(1 / 3)
    assert (summary["first_batch"], summary["last_batch"]) == (3, 2)
    assert summary["outside_batch_windows"] == 3
    assert summary["total"] == 9
    ((site, count),) = summary["sites"].items()  # the syncs inside the batch windows, by call site
    assert count == 6
    assert site.startswith("tests/test_gpu_benchmark.py:") and site.endswith(" _sync")
    assert summary["sites_outside_batch_windows"] == {site: 3}


def test_sync_counter_without_cuda_keeps_the_marks_and_counts_nothing() -> None:
    with gpu.SyncCounter(enabled=False) as counter:
        for _ in range(3):
            counter.mark("batch")
        counter.mark("epoch_end")
    assert counter.summary("batch") == {"batches": 3, "per_batch": None, "note": "n/a on CPU"}
    with pytest.raises(RuntimeError, match=r"^no batch window labelled 'val' was marked"):
        counter.summary("val")


def test_sync_goal_judges_each_path_against_its_floor() -> None:
    def s(per_batch: float) -> dict[str, Any]:
        return {"per_batch": per_batch}

    assert gpu.sync_goal({"a": (s(0.0), None), "b": (s(0.0), s(0.0))}).met is True
    lightning_syncs = gpu.sync_goal({"mixin": (s(1.0), s(1.0))})
    assert lightning_syncs.met is True
    assert lightning_syncs.value == "all 0 [syncs that are not ours: mixin: its floor makes 1.00]"
    ours = gpu.sync_goal({"mixin": (s(2.0), s(1.0)), "validate": (s(0.5), None)})
    assert ours.met is False
    assert ours.value.startswith("non-zero: mixin: 2.00 (floor 1.00); validate: 0.50 (floor 0.00)")
    assert gpu.sync_goal({"a": ({"per_batch": None}, None)}).value == "n/a on CPU"


def test_self_contained_architectures_match_torchvision_sizes() -> None:
    # torchvision's resnet50 and vit_b_16 hold 25,557,032 and 86,567,656 parameters; built on the meta device here.
    with torch.device("meta"):
        resnet, vit = gpu.local_resnet50(), gpu.LocalViT()
    assert sum(p.numel() for p in resnet.parameters()) == 25_557_032
    assert sum(p.numel() for p in vit.parameters()) == 86_567_656
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules()) == 53
