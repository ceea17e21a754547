"""ModeCheck and the mixin under sharded strategies: FSDP2 (``ModelParallelStrategy``) on 2 CPU processes (gloo).

The strategy launches its workers by re-running the command, so the scenarios run as a standalone script
(``sharded_scenarios.py``), in one launch: a clean model, a BatchNorm left in train mode, an in-place write to the
head's sharded parameters in ``validation_step`` on rank 1 only (``"warn"``), on every rank, and on rank 1 only
(``"raise"``). The same tests run with
Lightning's ``FSDPStrategy`` (FSDP1) where CUDA is available. References are computed here with sklearn, from the
logits of the whole data under the full weights the script gathered from the shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

Results = dict[str, list[dict[str, Any]]]
SCRIPT = Path(__file__).with_name("sharded_scenarios.py")
ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.ddp

STRATEGIES = [
    pytest.param("fsdp2", id="fsdp2-cpu"),
    pytest.param("fsdp1", id="fsdp1-cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs CUDA")),
]


@pytest.fixture(scope="module", params=STRATEGIES)
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Run every scenario once per strategy; ``{scenario: [rank 0's result, rank 1's result, ...]}``."""
    out = tmp_path_factory.mktemp(request.param)
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]  # tests/: distributed_exit.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), request.param], cwd=out, env=env,
                          capture_output=True, text=True, timeout=150)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*-*.json")):
        data = json.loads(path.read_text())
        found.setdefault(path.stem.rpartition("-")[0], []).append(data)
    for scenario in found.values():
        scenario.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in scenario] == list(range(scenario[0]["world_size"]))  # every rank got there
    return found


def reference(result: dict[str, Any], duplicate_first: bool = False) -> dict[str, float]:
    """sklearn on the whole data; with ``duplicate_first``, what counting the sampler's repeated sample gives."""
    from sklearn.metrics import accuracy_score, log_loss

    logits, target = torch.tensor(result["logits"], dtype=torch.float64), torch.tensor(result["targets"])
    if duplicate_first:  # 35 samples on 2 ranks: rank 1 repeats global position 0
        logits, target = torch.cat([logits, logits[:1]]), torch.cat([target, target[:1]])
    prob = logits.softmax(1).numpy()
    return {"loss": log_loss(target.numpy(), prob, labels=[0, 1, 2]),
            "acc": accuracy_score(target.numpy(), prob.argmax(1))}


def test_clean_model_has_no_findings(results: Results) -> None:
    for r in results["clean"]:
        assert r["error"] == "" and r["findings"] == []


def test_exact_values_with_padding(results: Results) -> None:
    ranks = results["clean"]
    ref = reference(ranks[0])
    for r in ranks:
        assert r["logits"] == ranks[0]["logits"]  # the gathered weights agree
        assert r["logged"]["val/loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert r["logged"]["val/acc"] == pytest.approx(ref["acc"], abs=1e-6)
    if ranks[0]["world_size"] == 2:
        naive = reference(ranks[0], duplicate_first=True)
        assert abs(ranks[0]["logged"]["val/loss"] - naive["loss"]) > 1e-4  # counting the repeat would show


def test_batchnorm_in_train_mode_is_reported_on_every_rank(results: Results) -> None:
    for r in results["bn_train"]:
        assert r["findings"] == [["LV101", "norm"], ["LV202", "norm"]]
        assert r["messages"][0].startswith(
            "LV101 submodule in train mode during evaluation: `norm` at validate/on_validation_batch_start: "
            "expected eval mode, saw norm (BatchNorm1d) in train mode")
        assert "saw 3 buffers changed" in r["messages"][1]


def test_in_place_write_to_sharded_parameters_is_lv201_on_every_rank(
        results: Results) -> None:
    for r in results["scale_head"]:
        assert r["findings"] == [["LV201", "head"]]
        assert r["error"].startswith("LV201 parameter changed by evaluation: `head` at validate/on_validation_end: "
                                     "expected unchanged values, saw 2 parameters changed")
        assert "FSDP" not in r["error"] and "_fsdp" not in r["error"]


def test_one_rank_shard_changing_stops_every_rank(results: Results) -> None:
    ranks = results["scale_head_rank1"]
    if len(ranks) < 2:
        pytest.skip("one process: there is no rank 1")
    assert ranks[1]["error"].startswith("LV201 parameter changed by evaluation: `head` at validate/on_validation_end")
    assert ranks[0]["error"].startswith(
        "ModeCheck: another rank reported a finding at on_validation_end; this rank stops with it. Rank 1: LV201 "
        "parameter changed by evaluation: `head` at validate/on_validation_end")


def test_one_rank_shard_changing_is_reported_by_every_rank(results: Results) -> None:
    ranks = results["scale_head_rank1_warn"]
    if len(ranks) < 2:
        pytest.skip("one process: there is no rank 1")
    for r in ranks:  # rank zero, whose shard did not change, prints and records rank 1's finding
        assert r["error"] == "" and r["findings"] == [["LV201", "head"]]


def test_tensor_parallel_ranks_count_their_samples_once(results: Results) -> None:
    # ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2): both ranks see all 35 samples; the values
    # are summed over the data-parallel replicas (one), not over the world (two).
    if "tp2" not in results:
        pytest.skip("tensor parallelism runs with ModelParallelStrategy only")
    ranks = results["tp2"]
    ref = reference(ranks[0])
    for r in ranks:
        assert r["error"] == "" and r["findings"] == []
        assert r["logged"]["val/n"] == 35
        assert r["logged"]["val/loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert r["logged"]["val/acc"] == pytest.approx(ref["acc"], abs=1e-6)
