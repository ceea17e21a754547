"""Tests of engine/buffers.py: which buffer changes are not state, and the fix each kind of buffer gets.

Every quiet case stands beside a true find in the same model that is still reported: a rule that lets a cache grow
must not hide a BatchNorm, a parameter or a statistic.
"""

from __future__ import annotations

import torch
import torch.ao.quantization as tq
from cache_modules import SeqNet, qat_net, tokens
from torch import nn

from lightning_validate.engine import compare, initialised_buffers, not_state, take_snapshot
from lightning_validate.engine.buffers import record_buffers
from lightning_validate.findings import Finding


def _diff(model: nn.Module, change: object) -> tuple[list[Finding], list[tuple[str, str]]]:
    """The findings of a change, and what ``not_state`` says of the buffers that changed quietly."""
    before = take_snapshot(model)
    with torch.no_grad():
        change(model)  # type: ignore[operator]
    after = take_snapshot(model)
    return (compare(before, after, phase="evaluating"),
            [(n.name, n.describe()) for n in not_state(before, after)])


# --------------------------------------------------------------------------------------------------------------
# Caches: non-persistent buffers rebuilt with another shape


def test_caches_rebuilt_for_a_longer_sequence_are_not_state() -> None:
    model = SeqNet()
    model(tokens(4, 6))  # training-length sequences
    findings, quiet = _diff(model.eval(), lambda m: m(tokens(4, 12)))  # validation sequences are longer
    assert findings == []
    assert quiet == [
        ("rot.cos_cached", "was rebuilt with another shape ((6, 8) -> (12, 8)): a non-persistent cache"),
        ("rot.sin_cached", "was rebuilt with another shape ((6, 8) -> (12, 8)): a non-persistent cache"),
        ("attn.mask", "was rebuilt with another shape ((6, 6) -> (12, 12)): a non-persistent cache"),
        ("attn.alibi", "was rebuilt with another shape ((2, 6, 6) -> (2, 12, 12)): a non-persistent cache"),
    ]
    assert model.rot.cos_cached.shape == (12, 8)


def test_a_statistic_beside_the_caches_is_still_reported() -> None:
    model = SeqNet()
    model(tokens(4, 6))
    model.eval()
    model.norm.train()  # updates its running statistics with evaluation data
    findings, quiet = _diff(model, lambda m: m(tokens(4, 12)))
    assert [(f.code, f.module, f.seen) for f in findings] == [("LV202", "norm", "3 buffers changed")]
    assert findings[0].fix == (
        "a submodule ran in train mode during evaluation and updated its buffers (BatchNorm running statistics): keep "
        "it in eval mode (`model.norm.eval()`), or restore the buffers after computing the loss")
    assert [n for n, _ in quiet] == ["rot.cos_cached", "rot.sin_cached", "attn.mask", "attn.alibi"]


def test_a_parameter_written_beside_a_cache_is_still_reported() -> None:
    model = SeqNet().eval()

    def change(m: nn.Module) -> None:
        m(tokens(4, 12))
        m.head.bias.add_(1.0)

    findings, _ = _diff(model, change)
    assert [(f.code, f.module) for f in findings] == [("LV201", "head.bias")]


def test_a_persistent_buffer_rebuilt_with_another_shape_is_reported_with_the_general_fix() -> None:
    """Only a non-persistent buffer is a cache: a persistent one is in every checkpoint, so it is state."""
    model = nn.Module()
    model.register_buffer("table", torch.arange(4.0))
    findings, quiet = _diff(model, lambda m: setattr(m, "table", torch.arange(8.0)))
    assert quiet == []
    assert [(f.code, f.module) for f in findings] == [("LV202", "table")]
    assert findings[0].fix == (
        "find what writes the buffer during evaluation and make it follow the mode (`if self.training:` around the "
        "update) or restore it afterwards; if a submodule in train mode updates it (BatchNorm running statistics), "
        "keep it in eval mode (`model.eval()`); a cache computed from the input's shape is not state: register it "
        "with `persistent=False`, then rebuilding it with another shape is not reported")


def test_a_cache_written_in_place_is_reported_with_the_cache_fix() -> None:
    """Same shape, new values: nothing shows that the values come from the shape alone (a KV cache does not)."""
    model = SeqNet().eval()
    findings, quiet = _diff(model, lambda m: m.rot.cos_cached.mul_(2))
    assert quiet == []
    assert [(f.code, f.module) for f in findings] == [("LV202", "rot.cos_cached")]
    assert findings[0].fix == (
        "`rot.cos_cached` is a non-persistent buffer (a cache) that evaluation rewrote in place, with the same shape: "
        "if it holds values computed from the input's shape alone (a rotary table, a mask), allow its module, "
        "`allow_train_mode=['rot']`; if it keeps something between calls (a KV cache, a counter), reset it at the "
        "end of evaluation")


def test_limit_a_non_persistent_buffer_grown_with_the_data_is_not_reported() -> None:
    """The documented limit (docs/codes.md, LV202): a memory of inputs kept in a non-persistent buffer goes unseen."""
    model = nn.Module()
    model.register_buffer("memory", torch.randn(4, 3), persistent=False)
    findings, quiet = _diff(model, lambda m: setattr(m, "memory", torch.cat([m.memory, torch.randn(2, 3)])))
    assert findings == []
    assert quiet == [("memory", "was rebuilt with another shape ((4, 3) -> (6, 3)): a non-persistent cache")]


def test_a_mixed_group_gets_the_general_fix() -> None:
    """A block whose BatchNorm and own counter both changed: one finding, a fix that names both kinds."""
    model = nn.Module()
    model.block = nn.Sequential(nn.BatchNorm1d(2))
    model.block.register_buffer("calls", torch.zeros(()))

    def change(m: nn.Module) -> None:
        m.block(torch.randn(4, 2))  # train mode: the statistics move
        m.block.calls += 1

    findings, _ = _diff(model, change)
    assert [(f.code, f.module, f.seen) for f in findings] == [("LV202", "block", "4 buffers changed")]
    assert findings[0].fix.startswith("find what writes the buffer during evaluation")
    assert "BatchNorm" in findings[0].fix and "persistent=False" in findings[0].fix


# --------------------------------------------------------------------------------------------------------------
# Placeholders filled in on the first forward


def test_a_one_element_placeholder_resized_is_initialisation() -> None:
    model = nn.Module()
    model.register_buffer("scale", torch.tensor([1.0]))  # persistent, resized per channel on first use
    before = take_snapshot(model)
    model.scale.resize_(3).fill_(0.5)
    after = take_snapshot(model)
    assert compare(before, after, phase="evaluating") == []
    assert initialised_buffers(before, after) == [("scale", (1,), (3,))]
    # The same buffer given a new value in place, with its shape, is a change.
    with torch.no_grad():
        model.scale.mul_(2)
    assert [f.module for f in compare(after, take_snapshot(model), phase="evaluating")] == ["scale"]


def test_a_statistic_that_keeps_its_shape_is_reported_even_from_its_initial_value() -> None:
    """A counter starting at zero and a running maximum starting at one element both keep their shapes."""
    model = nn.Module()
    model.register_buffer("count", torch.zeros(()))
    model.register_buffer("peak", torch.tensor([1.0]), persistent=False)

    def change(m: nn.Module) -> None:
        m.count += 4
        m.peak.fill_(3.0)

    findings, quiet = _diff(model, change)
    assert quiet == []
    assert [f.module for f in findings] == ["count", "peak"]


# --------------------------------------------------------------------------------------------------------------
# Quantization-aware training: observers, fake-quantization parameters and their switches


def test_the_roles_of_buffer_owners_are_recorded() -> None:
    model = nn.Sequential(qat_net(), nn.BatchNorm1d(3))
    roles, non_persistent = record_buffers(dict(model.named_modules()))
    assert roles["0.1.weight_fake_quant"] == roles["0.1.activation_post_process"] == "fake_quant"
    assert roles["0.1.weight_fake_quant.activation_post_process"] == "observer"
    assert roles["1"] == "norm"
    assert "0.1" not in roles and non_persistent == frozenset()
    assert take_snapshot(model).roles == roles and take_snapshot(model, content=False).roles == {}


def test_observers_off_the_first_forward_only_fills_in_the_quantization_parameters() -> None:
    """Never trained, observers off: scales are resized per channel and set to their default from unset ranges."""
    model = qat_net().eval()
    model.apply(tq.disable_observer)
    findings, quiet = _diff(model, lambda m: m(torch.randn(4, 8)))
    assert findings == []
    assert ("1.weight_fake_quant.scale", "was filled in on the first forward (shape (1,) -> (16,)): initialisation"
            ) in quiet
    assert ("1.activation_post_process.scale",
            "was recomputed from its observer's unchanged statistics: fake-quantization parameters") in quiet


def test_observers_on_in_eval_mode_are_reported_with_the_observer_fix() -> None:
    model = qat_net()
    model(torch.randn(4, 8))  # trained once: every observer has ranges
    model.eval()  # observers keep observing in eval mode
    findings, _ = _diff(model, lambda m: m(torch.randn(4, 8) * 3))
    modules = {f.module for f in findings}
    assert {"0.activation_post_process.activation_post_process.min_val",
            "0.activation_post_process.activation_post_process.max_val",
            "0.activation_post_process.scale"} <= modules  # the ranges and the scale computed from them
    assert {f.code for f in findings} == {"LV202"}
    assert {f.fix for f in findings} == {
        "quantization observers keep updating in eval mode, so evaluation data moved the quantization ranges: turn "
        "them off around evaluation, `model.apply(torch.ao.quantization.disable_observer)` before it and "
        "`model.apply(torch.ao.quantization.enable_observer)` after it"}


def test_observers_switched_off_and_left_off_get_the_switch_fix() -> None:
    model = qat_net()
    model(torch.randn(4, 8))
    findings, _ = _diff(model.eval(), lambda m: (m.apply(tq.disable_observer), m(torch.randn(4, 8))))
    assert {f.module.rpartition(".")[2] for f in findings} == {"observer_enabled"}
    assert len(findings) == 5  # one per fake-quantization module: the flags of the others did not change
    assert findings[0].fix == (
        "evaluation switched observation or fake quantization off (or on) and did not switch it back: undo the "
        "switch after evaluating, `model.apply(torch.ao.quantization.enable_observer)` after a `disable_observer` "
        "(`enable_fake_quant` after `disable_fake_quant`)")


def test_a_learnable_fake_quantization_written_by_its_observer_is_lv201_with_the_observer_fix() -> None:
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    model = nn.Sequential(nn.Linear(3, 3), _LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0,
                                                                   quant_max=255))
    findings, _ = _diff(model.eval(), lambda m: m(torch.randn(4, 3)))
    lv201 = [f for f in findings if f.code == "LV201"]
    assert [(f.module, f.seen) for f in lv201] == [("1", "2 parameters changed")]  # its scale and zero point
    assert lv201[0].fix.startswith("quantization observers keep updating in eval mode")


def test_a_cache_of_the_root_module_gets_the_general_fix() -> None:
    """`allow_train_mode` cannot name the root module, so the cache fix (which allows the owner) does not apply."""
    model = nn.Module()
    model.register_buffer("table", torch.ones(3), persistent=False)
    findings, _ = _diff(model, lambda m: m.table.mul_(2))
    assert [f.module for f in findings] == ["table"]
    assert findings[0].fix.startswith("find what writes the buffer during evaluation")
