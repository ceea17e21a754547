"""Tests of the check engine against real modules: snapshots, content fingerprints, compare, state checks."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from distributed_exit import free_port
from torch import nn

from lightning_validate.engine import (
    Globs,
    ModeIndex,
    check_eval_state,
    check_train_state,
    compare,
    take_snapshot,
    unwrap,
)
from lightning_validate.engine.fingerprint import _fingerprint_rows, _per_tensor_rows, _stacked_rows
from lightning_validate.findings import Finding, display_name


def matches_any(name: str, patterns: list[str]) -> bool:
    return Globs.parse("patterns", patterns).covers(name)


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    model.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))
    model.forward = lambda x: model.head(model.backbone(x))  # type: ignore[method-assign]
    return model


def _codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.code, f.module) for f in findings]


def _diff(model: nn.Module, change: object, **kwargs: object) -> list[Finding]:
    before = take_snapshot(model)
    change(model)  # type: ignore[operator]
    return compare(before, take_snapshot(model), phase="validate", **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# What a snapshot records


def test_snapshot_records_modes_types_and_flags_by_qualified_name() -> None:
    model = _net()
    model.backbone[1].eval()
    model.head[1].weight.requires_grad_(False)
    snap = take_snapshot(model)
    assert snap.modes == {"": True, "backbone": True, "backbone.0": True, "backbone.1": False, "backbone.2": True,
                          "head": True, "head.0": True, "head.1": True}
    assert snap.types["backbone.1"] == "BatchNorm1d"
    assert snap.describe("backbone.1") == "backbone.1 (BatchNorm1d)"
    assert snap.describe("") == "<model> (Module)"
    assert snap.requires_grad["head.1.weight"] is False
    assert snap.requires_grad["backbone.0.weight"] is True
    assert snap.has_grad == dict.fromkeys(snap.requires_grad, False)
    keys = set(snap.fingerprints())
    assert ("buffer", "backbone.1.running_mean") in keys
    assert ("buffer", "backbone.1.num_batches_tracked") in keys
    assert ("param", "head.1.bias") in keys


def test_snapshot_records_grad_and_inference_mode() -> None:
    model = _net()
    assert take_snapshot(model).grad_enabled is True
    with torch.no_grad():
        snap = take_snapshot(model)
    assert (snap.grad_enabled, snap.inference_mode) == (False, False)
    with torch.inference_mode():
        snap = take_snapshot(model)
    assert (snap.grad_enabled, snap.inference_mode) == (False, True)


def test_snapshot_without_content_or_grads() -> None:
    snap = take_snapshot(_net(), content=False, grads=False)
    assert not snap.has_content
    assert snap.fingerprints() == {}
    assert snap.has_grad is None


def test_shared_parameters_are_recorded_once() -> None:
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    snap = take_snapshot(model)
    assert list(snap.requires_grad) == [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]


def test_take_snapshot_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"Expected argument `model` to be a torch.nn.Module but got dict"):
        take_snapshot({"weight": torch.zeros(1)})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Content fingerprints


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (lambda m: m.backbone[0].weight.data.clamp_(-0.05, 0.05), "clamp_"),
        (lambda m: m.backbone[0].weight.data[0, 0].add_(1e-6), "add 1e-6 to one element"),
        (lambda m: m.backbone[0].weight.data.mul_(-1), "mul_(-1) on the whole tensor"),
        (lambda m: m.backbone[0].weight.data.copy_(m.backbone[0].weight.data * 1.5), "copy_ of a scaled copy"),
    ],
)
def test_data_writes_are_caught_although_the_version_counter_misses_them(change: object, name: str) -> None:
    model = _net()
    version = model.backbone[0].weight._version
    findings = _diff(model, change)
    assert model.backbone[0].weight._version == version, "a `.data` write bumped the version counter"
    assert _codes(findings) == [("LV201", "backbone.0.weight")], name
    assert findings[0].seen.startswith("changed (sum ")
    assert "LV201 parameter changed by evaluation: `backbone.0.weight` at validate/end: expected unchanged values, " \
           "saw changed (sum " in findings[0].message
    assert "Fix: do not write parameters during evaluation (`p.data.clamp_()`" in findings[0].message


def test_a_small_change_to_one_element_of_a_large_tensor_is_caught() -> None:
    model = nn.Linear(1000, 1000)
    findings = _diff(model, lambda m: m.weight.data[123, 456].add_(1e-6))
    assert _codes(findings) == [("LV201", "weight")]


def test_a_whole_module_rewritten_is_one_grouped_finding() -> None:
    model = _net()
    findings = _diff(model, lambda m: [p.data.zero_() for p in m.backbone[0].parameters()])
    assert _codes(findings) == [("LV201", "backbone.0")]
    assert findings[0].seen == "2 parameters changed"


def test_batchnorm_running_stats_updated_in_train_mode_are_caught() -> None:
    model = _net()
    bn = model.backbone[1]
    versions = (bn.running_mean._version, bn.running_var._version)
    findings = _diff(model, lambda m: m(torch.randn(16, 4)))  # train mode: the native kernel updates the stats
    # The native BatchNorm kernel writes the running statistics without bumping their version counters: only
    # a content fingerprint sees the change.
    assert (bn.running_mean._version, bn.running_var._version) == versions
    assert _codes(findings) == [("LV202", "backbone.1")]
    assert findings[0].message == (
        "LV202 buffer changed by evaluation: `backbone.1` at validate/end: expected unchanged values, saw 3 buffers "
        "changed. Fix: a submodule ran in train mode during evaluation and updated its buffers (BatchNorm running "
        "statistics): keep it in eval mode (`model.backbone[1].eval()`), or restore the buffers after computing the "
        "loss"
    )


def test_batchnorm_in_eval_mode_changes_nothing() -> None:
    model = _net().eval()
    with torch.no_grad():
        assert _diff(model, lambda m: m(torch.randn(16, 4))) == []


def test_grad_set_cleared_and_changed() -> None:
    model = nn.Sequential(nn.Linear(3, 1))

    def backward(m: nn.Module) -> None:
        m(torch.randn(4, 3)).sum().backward()

    set_ = _diff(model, backward)
    assert [(f.code, f.module, f.seen) for f in set_] == [("LV204", "0", ".grad changed on 2 parameters")]
    cleared = _diff(model, lambda m: setattr(m[0].bias, "grad", None))
    assert [(f.code, f.module, f.seen) for f in cleared] == [("LV204", "0.bias", ".grad cleared (was set)")]
    assert [(f.module, f.seen) for f in _diff(model, backward)] == [("0", ".grad changed on 2 parameters")]
    changed = _diff(model, lambda m: m[0].weight.grad.add_(1.0))
    assert [(f.code, f.module, f.seen) for f in changed] == [("LV204", "0.weight", ".grad values changed")]
    assert changed[0].message == (
        "LV204 .grad changed by evaluation: `0.weight` at validate/end: expected .grad unchanged, saw .grad values "
        "changed. Fix: do not call `loss.backward()` during evaluation; for input gradients use "
        "`torch.autograd.grad(output.sum(), inputs)`, which leaves `.grad` untouched"
    )
    # Input gradients through torch.autograd.grad leave .grad alone: not a finding.
    x = torch.randn(2, 3, requires_grad=True)
    assert _diff(model, lambda m: torch.autograd.grad(m(x).sum(), x)) == []


def test_grads_not_recorded_are_not_compared() -> None:
    model = nn.Linear(3, 1)
    before = take_snapshot(model, grads=False)
    model(torch.randn(2, 3)).sum().backward()
    assert compare(before, take_snapshot(model, grads=False), phase="validate") == []


def test_ema_swap_in_and_back_is_not_a_change() -> None:
    model = _net()
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.data.mul_(0.9)
    before = take_snapshot(model)
    saved = [p.data.clone() for p in model.parameters()]
    for p, e in zip(model.parameters(), ema.parameters(), strict=True):
        p.data.copy_(e.data)  # EMAWeightAveraging swaps the averaged weights in for validation...
    assert {f.code for f in compare(before, take_snapshot(model), phase="validate")} == {"LV201"}
    for p, s in zip(model.parameters(), saved, strict=True):
        p.data.copy_(s)  # ...and back at the end
    assert compare(before, take_snapshot(model), phase="validate") == []


def test_nan_parameters_left_unchanged_are_not_a_change() -> None:
    model = nn.Linear(2, 2)
    model.weight.data.fill_(float("nan"))
    assert _diff(model, lambda m: None) == []
    assert _codes(_diff(model, lambda m: m.weight.data.fill_(0.0))) == [("LV201", "weight")]


def test_fingerprint_of_a_tensor_does_not_depend_on_its_stack_neighbours() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(7, 5) * 10.0**k for k in range(-3, 4)]
    alone = torch.cat([_fingerprint_rows([t]) for t in tensors])
    together = _fingerprint_rows([tensors[2], torch.arange(3), *tensors, torch.randn(2, dtype=torch.complex64)])
    assert torch.equal(together[2:-1], alone)
    assert together[1].tolist() == [3.0, 5.0]  # an integer tensor: its sum and its positional sum 0*0 + 1*1 + 2*2


def test_accelerator_path_agrees_with_the_cpu_path() -> None:
    # The per-tensor path runs on GPUs; on the CPU it must give the same values as the stacked path.
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(5), torch.tensor(7), torch.tensor([True, False]),
               torch.randn(2, dtype=torch.float16), torch.zeros(0)]
    torch.testing.assert_close(_per_tensor_rows(tensors), _stacked_rows(tensors), rtol=1e-12, atol=1e-12)


def test_fingerprints_of_odd_dtypes() -> None:
    model = nn.Module()
    model.register_buffer("flag", torch.tensor([True, False]))
    model.register_buffer("f16", torch.ones(3, dtype=torch.float16))
    model.register_buffer("bf", torch.ones(3, dtype=torch.bfloat16))
    model.register_buffer("cplx", torch.ones(2, dtype=torch.complex64))
    model.register_buffer("scalar", torch.tensor(2.0))
    model.register_buffer("empty", torch.zeros(0))
    fps = take_snapshot(model).fingerprints()
    assert fps[("buffer", "flag")] == (1.0, 0.0)  # integer and bool tensors: sum, positional sum
    assert fps[("buffer", "f16")] == pytest.approx((3.0, 3**0.5))
    assert fps[("buffer", "cplx")] == pytest.approx((2.0, 2**0.5))
    assert fps[("buffer", "scalar")] == (2.0, 2.0)
    assert fps[("buffer", "empty")] == (0.0, 0.0)
    flipped = _diff(model, lambda m: m.flag.logical_not_())  # same count of True, moved: the sum alone misses it
    assert [(f.code, f.module, f.seen) for f in flipped] == [
        ("LV202", "flag", "changed (sum 1 -> 1, positional sum 0 -> 1)")]
    assert _codes(_diff(model, lambda m: m.cplx.mul_(-1))) == [("LV202", "cplx")]


# --------------------------------------------------------------------------------------------------------------
# Host-device synchronization


def test_take_snapshot_never_reads_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _net()
    model(torch.randn(4, 4)).sum().backward()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("take_snapshot read a value on the host")

    for method in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    snap = take_snapshot(model)
    monkeypatch.undo()
    assert len(snap.fingerprints()) == 6 + 3 + 6  # parameters, BatchNorm buffers, grads


def test_compare_copies_to_the_host_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _net()
    before = take_snapshot(model)
    model.backbone[0].weight.data.add_(1.0)
    after = take_snapshot(model)
    calls = []
    original = torch.Tensor.cpu

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(self.shape)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    assert _codes(compare(before, after, phase="validate")) == [("LV201", "backbone.0.weight")]
    assert len(calls) == 1, calls  # both snapshots' fingerprints in one copy
    compare(before, after, phase="validate")
    assert len(calls) == 1  # already on the host: no further copy


# --------------------------------------------------------------------------------------------------------------
# Wrappers


def _assert_same_as_bare(wrapped: nn.Module, bare: nn.Module) -> None:
    assert unwrap(wrapped) is bare
    ws, bs = take_snapshot(wrapped), take_snapshot(bare)
    assert ws.modes == bs.modes and ws.requires_grad == bs.requires_grad
    assert ws.fingerprints() == bs.fingerprints()
    assert compare(bs, ws, phase="validate") == [] == compare(ws, bs, phase="validate")
    names = [*ws.modes, *ws.requires_grad, *(n for _, n in ws.fingerprints())]
    assert not [n for n in names if "_orig_mod" in n or n.startswith(("module.", "_forward_module"))]
    assert sorted(ModeIndex(wrapped).names) == sorted(bs.modes)


def test_torch_compile_is_looked_through() -> None:
    bare = _net()
    _assert_same_as_bare(torch.compile(bare, backend="eager"), bare)


def test_a_compiled_submodule_keeps_its_user_facing_name() -> None:
    model = _net()
    plain = take_snapshot(model)
    model.backbone = torch.compile(model.backbone, backend="eager")  # type: ignore[assignment]
    snap = take_snapshot(model)
    assert snap.modes == plain.modes
    assert snap.types["backbone"] == "Sequential"
    assert compare(plain, snap, phase="validate") == []
    model.backbone.eval()
    assert _codes(check_eval_state(model, phase="validate", boundary="start", allow_grad=True)) == [
        ("LV101", "<model>"), ("LV101", "head")]


def test_data_parallel_is_looked_through() -> None:
    bare = _net()
    _assert_same_as_bare(nn.DataParallel(bare), bare)


@pytest.fixture
def gloo_group() -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_is_looked_through(gloo_group: None) -> None:
    bare = _net()
    _assert_same_as_bare(nn.parallel.DistributedDataParallel(bare), bare)


def test_fabric_wrapper_is_looked_through() -> None:
    from lightning.fabric.strategies import SingleDeviceStrategy
    from lightning.fabric.wrappers import _FabricModule

    bare = _net()
    wrapped = _FabricModule(bare, SingleDeviceStrategy(device=torch.device("cpu")))
    _assert_same_as_bare(wrapped, bare)
    _assert_same_as_bare(torch.compile(wrapped, backend="eager"), bare)


def test_nested_wrappers_are_looked_through() -> None:
    bare = _net()
    _assert_same_as_bare(torch.compile(nn.DataParallel(bare), backend="eager"), bare)


# --------------------------------------------------------------------------------------------------------------
# Structure changes, lazy and meta modules


def test_modules_added_or_removed_are_reported_not_a_crash() -> None:
    model = _net()
    added = _diff(model, lambda m: m.head.append(nn.Sequential(nn.Linear(3, 3), nn.ReLU())))
    assert [(f.code, f.module, f.seen, f.detail) for f in added] == [
        ("LV206", "head.2", "added head.2 (Sequential)", "covers 3 submodules")]
    assert added[0].message == (
        "LV206 submodules added or removed by evaluation: `head.2` at validate/end: expected the same submodules, "
        "saw added head.2 (Sequential) (covers 3 submodules). Fix: do not add or remove submodules during "
        "evaluation; create them in `__init__` or `setup()`"
    )
    removed = _diff(model, lambda m: delattr(m, "backbone"))
    assert [(f.code, f.module, f.seen) for f in removed] == [("LV206", "backbone", "removed backbone (Sequential)")]
    replaced = _diff(model, lambda m: m.head.__setitem__(1, nn.Linear(8, 3)))
    assert _codes(replaced) == [("LV201", "head.1")]  # same name, same class and shape: new values
    other = _diff(model, lambda m: m.head.__setitem__(1, nn.Identity().eval()))
    assert [(f.code, f.module, f.seen) for f in other] == [("LV206", "head.1", "replaced head.1 (Linear) by Identity")]


def test_lazy_modules_and_meta_tensors_do_not_crash() -> None:
    lazy = nn.Sequential(nn.LazyLinear(3), nn.BatchNorm1d(3))
    before = take_snapshot(lazy)
    assert ("param", "0.weight") not in before.fingerprints()
    with torch.no_grad():
        lazy.eval()(torch.randn(2, 5))  # materializes the lazy parameters
    after = take_snapshot(lazy)
    assert ("param", "0.weight") in after.fingerprints()
    assert _codes(compare(before, after, phase="validate")) == [("LV205", "<model>")]

    meta = nn.Sequential(nn.Linear(2, 2, device="meta"), nn.BatchNorm1d(2, device="meta"))
    snap = take_snapshot(meta)
    assert snap.fingerprints() == {}
    assert compare(snap, take_snapshot(meta), phase="validate") == []


# --------------------------------------------------------------------------------------------------------------
# Modes: grouping, allowlists, train() overrides


def _backbone_of_bns(n: int = 12) -> nn.Module:
    model = nn.Module()
    model.backbone = nn.Sequential(*(nn.BatchNorm1d(4) for _ in range(n)))
    model.head = nn.Linear(4, 2)
    model.backbone.eval()  # frozen on purpose
    return model


def test_a_backbone_unfrozen_by_model_train_is_one_finding() -> None:
    findings = _diff(_backbone_of_bns(12), lambda m: m.train())
    assert [(f.code, f.module, f.detail) for f in findings] == [("LV205", "backbone", "covers 13 submodules")]
    assert findings[0].message == (
        "LV205 submodule mode not restored after evaluation: `backbone` at validate/end: expected eval mode as "
        "before evaluation, saw backbone (Sequential) in train mode (covers 13 submodules). Fix: restore each "
        "submodule's own mode instead of calling `model.train()`: `with lightning_validate.evaluating(model): ...`, "
        "or in Lightning remove the `on_validation_model_train` override (Lightning >= 2.2 restores every "
        "submodule's mode itself)"
    )


def test_a_model_left_in_eval_mode_is_reported() -> None:
    findings = _diff(_net(), lambda m: m.eval())
    assert [(f.code, f.module, f.seen) for f in findings] == [("LV205", "<model>", "<model> (Module) in eval mode")]
    assert findings[0].fix == (
        "put the submodule back in train mode after evaluation: remove the `on_validation_model_train` override "
        "that does nothing, or call `model.train()` at the end of evaluation"
    )


def test_one_layer_unfrozen_is_named_by_itself() -> None:
    findings = _diff(_backbone_of_bns(3), lambda m: m.backbone[1].train())
    assert [(f.code, f.module, f.seen, f.detail) for f in findings] == [
        ("LV205", "backbone.1", "backbone.1 (BatchNorm1d) in train mode", "")]


def test_allowlisted_modes_may_change_with_globs() -> None:
    def head_dropout(m: nn.Module) -> None:
        m.head[0].train()

    assert _diff(_net().eval(), head_dropout, allow_train_mode=["head.0"]) == []
    assert _diff(_net().eval(), head_dropout, allow_train_mode=["*.0"]) == []
    assert _diff(_net().eval(), lambda m: m.head.train(), allow_train_mode=["head"]) == []  # descendants covered
    assert _codes(_diff(_net().eval(), lambda m: m.head.train(), allow_train_mode=["head.0"])) == [
        ("LV205", "head"), ("LV205", "head.1")]


def test_pattern_arguments_must_be_lists() -> None:
    snap = take_snapshot(_net())
    with pytest.raises(TypeError, match=r"Expected `allow_train_mode` to be a list of names or glob patterns but got "
                                        r"the string 'head.0': write `allow_train_mode=\['head.0'\]`."):
        compare(snap, snap, phase="validate", allow_train_mode="head.0")
    with pytest.raises(TypeError, match=r"Expected `allow_train_mode` to be a list of names or glob patterns \(str\) "
                                        r"but got \[1\]"):
        ModeIndex(_net(), allow_train_mode=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"Expected `allow_eval_mode` to be a list of names or glob patterns"):
        check_train_state(_net().eval(), boundary="start", allow_eval_mode="backbone")


def test_matches_any_and_display_name() -> None:
    assert matches_any("head.drop.inner", ["head.drop"])
    assert matches_any("head.drop", ["head.*"])
    assert not matches_any("head.fc", ["*.drop*"])
    assert not matches_any("", ["*"])  # the root is never allowlisted by a pattern
    assert not matches_any("head", [])
    assert display_name("") == "<model>" and display_name("a.b") == "a.b"


# --------------------------------------------------------------------------------------------------------------
# check_eval_state / ModeIndex


def test_check_eval_state_reports_train_mode_and_grad() -> None:
    model = _net()
    findings = check_eval_state(model, phase="validate", boundary="on_validation_batch_start")
    assert [(f.code, f.module, f.detail) for f in findings] == [("LV101", "<model>", "covers 8 submodules"),
                                                               ("LV102", "grad mode", "")]
    assert findings[0].message == (
        "LV101 submodule in train mode during evaluation: `<model>` at validate/on_validation_batch_start: "
        "expected eval mode, saw <model> (Module) in train mode (covers 8 submodules). Fix: call `model.eval()` "
        "before evaluating (Lightning does it unless `on_validation_model_eval` is overridden); if `<model>` must "
        "stay in train mode on purpose, allow it: `allow_train_mode=['<model>']`"
    )
    assert findings[1].message == (
        "LV102 grad enabled during evaluation: `grad mode` at validate/on_validation_batch_start: expected grad "
        "disabled (`torch.no_grad()` or `torch.inference_mode()`), saw grad enabled. Fix: remove "
        "`torch.set_grad_enabled(True)` from evaluation code; for input gradients use a local "
        "`with torch.enable_grad():` block inside the step"
    )
    model.eval()
    with torch.no_grad():
        assert check_eval_state(model, phase="validate", boundary="start") == []
    assert check_eval_state(model, phase="validate", boundary="start", allow_grad=True) == []


def test_check_eval_state_with_an_index_and_an_allowlist() -> None:
    model = _net().eval()
    index = ModeIndex(model, allow_train_mode=["head.0"])
    assert index.num_modules == 8 and not index.any_in_train_mode()
    model.head[0].train()  # MC dropout kept on purpose
    assert not index.any_in_train_mode() and index.in_train_mode() == []
    model.backbone[1].train()
    assert index.any_in_train_mode() and index.in_train_mode() == ["backbone.1"]
    findings = check_eval_state(index, phase="validate", boundary="start", allow_grad=True)
    assert [(f.code, f.module, f.seen) for f in findings] == [
        ("LV101", "backbone.1", "backbone.1 (BatchNorm1d) in train mode")]
    assert findings[0].fix.endswith("allow it: `allow_train_mode=['backbone.1']`")


class _Stubborn(nn.Module):
    """A module whose `train(mode)` override ignores `mode` (bug class 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout()

    def train(self, mode: bool = True) -> _Stubborn:
        return super().train(True)


def test_a_train_override_that_ignores_mode_is_pointed_out() -> None:
    model = nn.Sequential(nn.Linear(2, 2), _Stubborn()).eval()
    assert model[1].training
    findings = check_eval_state(model, phase="validate", boundary="start", allow_grad=True)
    assert [(f.code, f.module) for f in findings] == [("LV101", "1")]
    assert findings[0].seen == (
        "1 (_Stubborn) in train mode (its class overrides `train()`: check that it honors `mode`)")


# --------------------------------------------------------------------------------------------------------------
# check_train_state


def test_check_train_state_grad_off_is_reported() -> None:
    with torch.no_grad():
        findings = check_train_state(_net(), boundary="on_train_batch_start")
    assert findings[0].message == (
        "LV301 grad disabled during training: `grad mode` at train/on_train_batch_start: expected grad enabled, saw "
        "grad disabled. Fix: do not call `torch.set_grad_enabled(False)` outside a `with` block; wrap evaluation in "
        "`torch.no_grad()` or `lightning_validate.evaluating(model)` so grad comes back"
    )


def test_a_frozen_backbone_is_not_reported_during_training() -> None:
    model = _net()
    model.backbone.eval().requires_grad_(False)
    assert check_train_state(model, boundary="on_train_batch_start") == []
    assert check_train_state(ModeIndex(model), boundary="on_train_batch_start") == []


def test_a_pretrained_backbone_in_eval_with_trainable_params_is_reported() -> None:
    model = _net()
    model.backbone.eval()  # loaded in eval mode, like HF `from_pretrained`, but still trainable
    index = ModeIndex(model)
    findings = check_train_state(index, boundary="on_train_batch_start")
    # Counted among the submodules that hold trainable parameters (the ReLU holds none).
    assert [(f.code, f.module, f.detail) for f in findings] == [("LV302", "backbone", "covers 3 submodules")]
    assert findings[0].message == (
        "LV302 trainable submodule in eval mode during training: `backbone` at train/on_train_batch_start: expected "
        "train mode (it has trainable parameters), saw backbone (Sequential) in eval mode (covers 3 submodules). "
        "Fix: call `self.backbone.train()` in `on_train_start` (a pretrained model loaded in eval mode stays there: "
        "Lightning >= 2.2 no longer calls `.train()`), or freeze it with `requires_grad_(False)` if it should not learn"
    )
    # Frozen later (BackboneFinetuning's freeze): the cached index reads the flags anew.
    model.backbone.requires_grad_(False)
    assert check_train_state(index, boundary="on_train_batch_start") == []
    model.backbone.requires_grad_(True)
    assert check_train_state(model, boundary="x", allow_eval_mode=["back*"]) == []


def test_a_parameterless_module_in_eval_is_not_reported() -> None:
    model = _net()
    model.head[0].eval()  # dropout without parameters: nothing trains through it (the user's choice)
    assert check_train_state(model, boundary="on_train_batch_start") == []
