"""Tests of ``evaluating()``: eval mode and grad off inside, the model given back exactly as it came."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_validate import ModeCheckError, ModeCheckWarning, evaluating


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _frozen_bn_net() -> _Net:
    model = _Net()
    model.backbone[1].eval()  # frozen BatchNorm, on purpose
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def test_eval_mode_and_no_grad_inside_and_everything_restored() -> None:
    model = _frozen_bn_net()
    before = _modes(model)
    with evaluating(model) as m:
        assert m is model
        assert not any(_modes(model).values())
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        out = model(torch.randn(5, 4))
        assert not out.requires_grad
    assert _modes(model) == before
    assert torch.is_grad_enabled()


def test_inference_mode() -> None:
    model = _Net()
    with evaluating(model, inference_mode=True):
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        assert model(torch.randn(2, 4)).is_inference()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_the_usual_eval_then_train_unfreezes_a_frozen_batchnorm_and_evaluating_does_not() -> None:
    usual = _frozen_bn_net()
    usual.eval()
    with torch.no_grad():
        usual(torch.randn(5, 4))
    usual.train()  # the usual hand-written loop ends like this
    assert usual.backbone[1].training, "the usual pattern no longer un-freezes: this regression test is moot"

    model = _frozen_bn_net()
    stats = model.backbone[1].running_mean.clone()
    with evaluating(model):
        model(torch.randn(5, 4))
    assert not model.backbone[1].training
    model(torch.randn(5, 4))  # a training step afterwards: the frozen BatchNorm keeps its statistics
    assert torch.equal(model.backbone[1].running_mean, stats)


def test_restored_when_the_body_raises_and_the_exception_propagates_unchanged() -> None:
    model = _frozen_bn_net()
    before = _modes(model)
    error = ValueError("bad batch")
    with pytest.raises(ValueError, match="bad batch") as info, evaluating(model, check=True):
        model(torch.randn(2, 4))
        raise error
    assert info.value is error
    assert _modes(model) == before and torch.is_grad_enabled()


def test_restored_when_the_body_raises_inside_inference_mode() -> None:
    model = _Net()
    with pytest.raises(RuntimeError, match="boom"), evaluating(model, inference_mode=True):
        raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_nesting_restores_the_outer_state() -> None:
    model = _frozen_bn_net()
    before = _modes(model)
    with evaluating(model):
        with evaluating(model, inference_mode=True):
            assert torch.is_inference_mode_enabled()
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        assert not any(_modes(model).values())
        with evaluating(model.head):
            pass
        assert not model.head.training
    assert _modes(model) == before and torch.is_grad_enabled()


def test_grad_mode_stays_off_when_it_was_off() -> None:
    model = _Net()
    with torch.no_grad():
        with evaluating(model):
            pass
        assert not torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        with evaluating(model, inference_mode=True):
            pass
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_a_model_in_eval_mode_stays_in_eval_mode() -> None:
    model = _Net().eval()
    with evaluating(model):
        pass
    assert not any(_modes(model).values())


# --------------------------------------------------------------------------------------------------------------
# check=True / "raise"


def _warned(body: object, model: nn.Module | None = None, **kwargs: object) -> list[str]:
    model = model if model is not None else _Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with evaluating(model, check=True, **kwargs):  # type: ignore[arg-type]
            body(model)  # type: ignore[operator]
    assert all(w.category is ModeCheckWarning for w in caught), [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught), "the warning should point at the user's `with` line"
    return [str(w.message) for w in caught]


def test_check_is_silent_for_a_clean_body() -> None:
    x = torch.randn(3, 4, requires_grad=True)

    def body(model: nn.Module) -> None:
        model(torch.randn(3, 4))
        with torch.enable_grad():  # local input gradients are legitimate
            torch.autograd.grad(model(x).sum(), x)

    assert _warned(body) == []
    assert _warned(body, _frozen_bn_net()) == []


def test_check_warns_on_a_parameter_write() -> None:
    messages = _warned(lambda m: m.head[1].weight.data.clamp_(-0.01, 0.01))
    assert len(messages) == 1
    assert messages[0].startswith("LV201 parameter changed by evaluation: `head.1.weight` at evaluating/end: "
                                  "expected unchanged values, saw changed (sum ")
    with pytest.warns(ModeCheckWarning, match=r"LV201 parameter changed by evaluation: `head.1.weight`"), \
            evaluating(model := _Net(), check=True):
        model.head[1].weight.data.mul_(-1)


def test_check_warns_on_batchnorm_stats_updated_by_a_submodule_put_in_train() -> None:
    def body(model: nn.Module) -> None:
        model.backbone.train()  # torchvision detection models do this to get a loss
        model(torch.randn(8, 4))

    messages = _warned(body)
    assert [m.split(":")[0] for m in messages] == ["LV101 submodule in train mode during evaluation",
                                                   "LV202 buffer changed by evaluation"]
    assert "`backbone` at evaluating/end: expected eval mode, saw backbone (Sequential) in train mode" in messages[0]
    assert "`backbone.1` at evaluating/end: expected unchanged values, saw 3 buffers changed" in messages[1]


def test_check_warns_on_requires_grad_and_grad_changes() -> None:
    def unfreeze(model: nn.Module) -> None:
        model.backbone.requires_grad_(False)

    assert _warned(unfreeze) == [
        "LV203 requires_grad changed by evaluation: `backbone` at evaluating/end: expected requires_grad unchanged, "
        "saw requires_grad changed on 4 parameters. Fix: do not freeze or unfreeze during evaluation; save and "
        "restore the flags: `flags = {n: p.requires_grad for n, p in model.named_parameters()}` ... "
        "`for n, p in model.named_parameters(): p.requires_grad_(flags[n])`"
    ]

    def backward(model: nn.Module) -> None:
        with torch.enable_grad():
            model(torch.randn(4, 4)).sum().backward()

    messages = _warned(backward)
    assert [m.split(":")[0] for m in messages] == ["LV204 .grad changed by evaluation"] * 2
    assert "`backbone` at evaluating/end: expected .grad unchanged, saw .grad changed on 4 parameters" in messages[0]
    assert "`head.1` at evaluating/end" in messages[1]


def test_check_warns_when_the_body_leaves_a_submodule_in_train_mode() -> None:
    messages = _warned(lambda m: m.head[0].train())
    assert messages == [
        "LV101 submodule in train mode during evaluation: `head.0` at evaluating/end: expected eval mode, saw head.0 "
        "(Dropout) in train mode. Fix: call `model.eval()` before evaluating; if `head.0` must stay in train mode "
        "on purpose, allow it: `allow_train_mode=['head.0']`"
    ]
    assert _warned(lambda m: m.head[0].train(), allow_train_mode=["head.*"]) == []  # MC dropout on purpose


def test_check_raise_raises_and_the_model_is_restored() -> None:
    model = _frozen_bn_net()
    before = _modes(model)
    match = r"evaluating\(\) found that the block broke a rule of evaluation:\n  LV201 parameter changed by evaluation"
    with pytest.raises(ModeCheckError, match=match) as info, evaluating(model, check="raise"):
        model.head[1].bias.data.add_(1.0)
    assert [(f.code, f.module) for f in info.value.findings] == [("LV201", "head.1.bias")]
    assert _modes(model) == before and torch.is_grad_enabled()


def test_check_warn_is_the_same_as_true() -> None:
    with pytest.warns(ModeCheckWarning, match=r"LV201 .*`head.1.bias`"), evaluating(model := _Net(), check="warn"):
        model.head[1].bias.data.add_(1.0)


# --------------------------------------------------------------------------------------------------------------
# A train() override that ignores mode


class _Stubborn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout()

    def train(self, mode: bool = True) -> _Stubborn:
        return super().train(True)  # ignores `mode` (bug class 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


def test_a_train_override_that_ignores_mode_is_put_in_eval_anyway() -> None:
    model = nn.Sequential(nn.Linear(2, 2), _Stubborn())
    with evaluating(model):
        assert not any(_modes(model).values())
        x = torch.ones(1, 2)
        assert torch.equal(model(x), model(x))  # dropout off
    assert all(_modes(model).values())


def test_a_train_override_that_ignores_mode_is_reported_with_check() -> None:
    messages = _warned(lambda m: None, nn.Sequential(nn.Linear(2, 2), _Stubborn()))
    assert len(messages) == 1
    assert messages[0].startswith(
        "LV101 submodule in train mode during evaluation: `1` at evaluating/start: expected eval mode, saw 1 "
        "(_Stubborn) in train mode (its class overrides `train()`: check that it honors `mode`) (covers 2 submodules)"
    )
    model = nn.Sequential(nn.Linear(2, 2), _Stubborn())
    assert _warned(lambda m: None, model, allow_train_mode=["1"]) == []
    with evaluating(model, allow_train_mode=["1"]):
        assert model[1].training and not model[0].training  # allowlisted: left as its override put it


# --------------------------------------------------------------------------------------------------------------
# Wrappers


def test_torch_compile() -> None:
    model = _frozen_bn_net()
    compiled = torch.compile(model, backend="eager")
    before = _modes(model)
    with evaluating(compiled, check="raise"):
        assert not compiled.training and not any(_modes(model).values())
        compiled(torch.randn(3, 4))
    assert _modes(model) == before and compiled.training


def test_data_parallel_wrapper_flag_restored() -> None:
    model = _frozen_bn_net()
    wrapped = nn.DataParallel(model)
    with evaluating(wrapped, check="raise"):
        assert not wrapped.training and not model.training
    assert wrapped.training and model.training and not model.backbone[1].training


# --------------------------------------------------------------------------------------------------------------
# Bad arguments change nothing


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, r"`evaluating\(model\)` expected a torch.nn.Module but got str. Pass the model "
                                      r"itself: `with evaluating\(model\): ...`."),
        ({"check": "loud"}, ValueError, r"`evaluating\(check='loud'\)` is not valid. Expected False, True, 'warn' or "
                                        r"'raise'."),
        ({"check": 1}, ValueError, r"`evaluating\(check=1\)` is not valid"),
        ({"inference_mode": "yes"}, TypeError, r"`evaluating\(inference_mode='yes'\)` is not valid. Expected True or "
                                               r"False."),
        ({"allow_train_mode": "head.0"}, TypeError, r"Expected `allow_train_mode` to be a list of names or glob "
                                                    r"patterns but got the string 'head.0': write "
                                                    r"`allow_train_mode=\['head.0'\]`."),
    ],
)
def test_bad_arguments_raise_and_change_nothing(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = _frozen_bn_net()
    before = _modes(model)
    args = {"model": model, **kwargs}
    target = args.pop("model")
    with pytest.raises(error, match=match), evaluating(target, **args):  # type: ignore[arg-type]
        pytest.fail("the body must not run")
    assert _modes(model) == before and torch.is_grad_enabled()


def test_buffer_filled_in_on_the_first_forward_is_initialisation(caplog: pytest.LogCaptureFixture) -> None:
    """A placeholder buffer replaced on the first forward (timm's ConViT) is not a change evaluation made."""

    class PositionTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.rel_indices.shape[1] != x.shape[1]:
                self.rel_indices = torch.ones(1, x.shape[1], x.shape[1], 3)
            return x

    model = nn.Sequential(nn.Linear(4, 4), PositionTable())
    with caplog.at_level("INFO", logger="lightning_validate"), evaluating(model, check="raise"):
        model(torch.randn(2, 4))
    assert model[1].rel_indices.shape == (1, 4, 4, 3)
    assert ("evaluating(): buffer `1.rel_indices` was filled in on the first forward (shape (1, 1, 1, 3) -> "
            "(1, 4, 4, 3)): initialisation, not reported") in caplog.text
    with pytest.raises(ModeCheckError, match=r"LV202 .*`1.rel_indices`"), evaluating(model, check="raise"):
        model[1].rel_indices.mul_(2)  # a change of the filled-in table is a change
