"""The engine on sharded models: FSDP2 ``fully_shard`` (``DTensor`` parameters) in a 1-process gloo group.

With one rank every shard is the whole tensor, which is what makes the expected values easy to state; the
2-process runs through Lightning are in ``tests/mode_check/test_fsdp2.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from distributed_exit import free_port
from torch import nn

from lightning_validate.engine import compare, take_snapshot
from lightning_validate.engine.fingerprint import Fingerprint, dtensor_type
from lightning_validate.findings import Finding

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("this build of torch has no torch.distributed", allow_module_level=True)


@pytest.fixture
def mesh() -> Iterator[object]:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(mesh: object) -> nn.Module:
    """Blocks sharded one by one and the root; ``norm`` and ``scale`` are in the root's group."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Module()
    model.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model.norm = nn.BatchNorm1d(8)
    model.head = nn.Linear(8, 3)
    model.scale = nn.Parameter(torch.ones(3))
    model.forward = lambda x: model.head(model.norm(model.block(x))) * model.scale  # type: ignore[method-assign]
    fully_shard(model.block, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.code, f.module) for f in findings]


def test_sharded_parameters_are_fingerprinted_by_their_local_shard(mesh: object) -> None:
    model = _sharded(mesh)
    dtensor = dtensor_type()
    assert dtensor is not None and isinstance(model.head.weight, dtensor)
    snap = take_snapshot(model)
    names = ["block.0.weight", "block.0.bias", "head.weight", "head.bias", "scale", "norm.weight", "norm.bias"]
    assert snap.sharded == frozenset(names)
    fps = snap.fingerprints()
    assert {n for k, n in fps if k == "param"} == set(names)
    local = model.head.weight.to_local()
    assert fps[("param", "head.weight")] == Fingerprint.of([("param", "w", local)]).values()[("param", "w")]
    assert snap._fingerprint is not None and snap._fingerprint.sharded[("param", "head.weight")] == (3, 8)


def test_names_and_classes_are_the_users(mesh: object) -> None:
    snap = take_snapshot(_sharded(mesh))
    assert snap.types == {"": "Module", "block": "Sequential", "block.0": "Linear", "block.1": "ReLU",
                          "norm": "BatchNorm1d", "head": "Linear"}
    assert not [n for n in [*snap.modes, *snap.requires_grad] if "fsdp" in n.lower()]


def test_in_place_write_to_a_shard_is_lv201(mesh: object) -> None:
    model = _sharded(mesh).eval()
    before = take_snapshot(model)
    with torch.no_grad():
        model(torch.randn(5, 4))
        for p in model.head.parameters():
            p.mul_(0.999)  # the head is resharded after its forward: this writes its DTensor shards
    found = compare(before, take_snapshot(model), phase="evaluating", modes=False)
    assert _codes(found) == [("LV201", "head")]
    assert found[0].message.startswith("LV201 parameter changed by evaluation: `head` at evaluating/end: expected "
                                       "unchanged values, saw 2 parameters changed")


def test_unsharded_root_parameters_are_not_a_change(mesh: object) -> None:
    # After a forward without backward FSDP2 keeps the root's group unsharded: whole tensors without `.grad` stand
    # where the shards (with `.grad` from training) were. Neither the values nor the grads changed.
    model = _sharded(mesh)
    model(torch.randn(5, 4)).sum().backward()
    assert model.scale.grad is not None
    model.eval()
    before = take_snapshot(model)
    with torch.no_grad():
        model(torch.randn(5, 4))
    after = take_snapshot(model)
    dtensor = dtensor_type()
    assert dtensor is not None and not isinstance(model.scale, dtensor) and model.scale.grad is None
    assert after.sharded == frozenset({"block.0.weight", "block.0.bias", "head.weight", "head.bias"})
    assert compare(before, after, phase="evaluating", modes=False) == []


def test_a_plain_model_pays_no_dtensor_import() -> None:
    import subprocess
    import sys

    code = ("import sys, torch; from lightning_validate.engine import take_snapshot; "
            "take_snapshot(torch.nn.Linear(2, 2)); print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture
def gloo_group() -> Iterator[None]:
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [True, False])
@pytest.mark.filterwarnings("ignore:.*FSDP.*:UserWarning", "ignore:.*FSDP.*:FutureWarning")
def test_fsdp1_units_are_named_by_the_users_modules(gloo_group: None, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model = FullyShardedDataParallel(
        bare, device_id=torch.device("cpu"), use_orig_params=use_orig_params,
        auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse or isinstance(module, nn.Linear))
    model.eval()
    before = take_snapshot(model)
    assert before.types == {"": "Sequential", "0": "Linear", "1": "BatchNorm1d", "2": "Linear"}
    expected = (["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"] if use_orig_params
                else ["", "0", "2"])  # each flat parameter is named by its unit; the root's holds the BatchNorm's
    assert sorted(before.requires_grad) == sorted(expected)
    with torch.no_grad():
        model(torch.randn(3, 4))
        assert compare(before, take_snapshot(model), phase="evaluating", modes=False) == []
        for name, p in model.named_parameters():  # the last Linear's weight, or its unit's flat parameter
            if ".2._fsdp_wrapped_module." in name and name.endswith(("weight", "_flat_param")):
                p.mul_(0.5)
    found = compare(before, take_snapshot(model), phase="evaluating", modes=False)
    assert _codes(found) == [("LV201", "2.weight" if use_orig_params else "2")]
