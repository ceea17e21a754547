"""Fault injection: an exception at each hook and step of fit, validate, test and predict, then a clean rerun.

For each point, a model with the mixin and a frozen backbone (eval mode and ``requires_grad=False`` on purpose) runs
with ``ModeCheck(on_violation="raise")`` attached, and the hook raises once. Then:

1. the user's exception propagates unchanged, and the model is as it was before the run: each submodule's own mode,
   the ``requires_grad`` flags and the grad mode (ModeCheck gives the model back when an evaluation was
   interrupted; Lightning restores modes only when an evaluation ends normally);
2. ``fit`` and ``validate`` run again on the same object with fresh Trainers, cleanly: no finding, no warning of
   ours, and exact values against a plain float64 loop over the whole validation set.
"""

from __future__ import annotations

import copy
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_validate import ModeCheck, ModeCheckWarning, ValidationMixin

POINTS = {
    "fit": [
        "on_fit_start", "on_train_start", "on_train_epoch_start", "training_step", "on_train_batch_end",
        "on_validation_start", "on_validation_epoch_start", "validation_step", "on_validation_batch_end",
        "on_validation_epoch_end", "on_validation_end", "on_validation_model_train", "on_train_epoch_end",
    ],
    "validate": ["on_validation_start", "validation_step", "on_validation_epoch_end", "on_validation_model_train"],
    "test": ["on_test_start", "test_step", "on_test_epoch_end", "on_test_end", "on_test_model_train"],
    "predict": ["on_predict_start", "predict_step", "on_predict_epoch_end"],
}
CASES = [(fn, point) for fn, points in POINTS.items() for point in points]


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


TRAIN, VAL = data(24, 0), data(20, 1)


class Model(ValidationMixin, pl.LightningModule):
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.backbone.requires_grad_(False)
        self.backbone.eval()  # frozen on purpose: it must come back in eval mode
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3))
        self.criterion = nn.CrossEntropyLoss()
        self.fault: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.05)

    def _fail(self, point: str) -> None:
        if self.fault == "interrupt":
            raise KeyboardInterrupt
        if self.fault == point:
            raise RuntimeError(f"injected at {point}")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def _hook(name: str) -> Any:
    def hook(self: Model, *args: Any, **kwargs: Any) -> Any:
        self._fail(name)
        if name.endswith("_model_train"):
            self.train()  # a correct restore override: everything back in train mode but the frozen backbone
            self.backbone.eval()
            return None
        if name == "predict_step":
            return self(args[0][0])
        return getattr(super(type(self), self), name)(*args, **kwargs)

    hook.__name__ = name
    return hook


def faulty(point: str) -> Model:
    """A model whose ``point`` hook raises while ``model.fault`` names it (only that hook is overridden)."""
    name = "validation_step" if point == "interrupt" else point
    model: Model = type(f"FailsIn_{name}", (Model,), {name: _hook(name)})()
    return model


def run(fn: str, model: Model, check: ModeCheck | None) -> Any:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        callbacks=[check] if check is not None else [],
    )
    train, val = DataLoader(TRAIN, batch_size=8), DataLoader(VAL, batch_size=8)
    if fn == "fit":
        return trainer.fit(model, train, val)
    if fn == "predict":
        return trainer.predict(model, val)
    return getattr(trainer, fn)(model, val, verbose=False)


def state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool], bool]:
    """Each submodule's own mode, each parameter's flag, and grad mode (the mixin's metric clones, created in
    ``setup``, aside: they are not the user's)."""
    return ({n: m.training for n, m in model.named_modules() if not n.startswith("lv_metrics")},
            {n: p.requires_grad for n, p in model.named_parameters()}, torch.is_grad_enabled())


def reference(model: Model) -> tuple[float, float]:
    """The float64 loss and accuracy over the whole validation set, by a plain loop over a copy in eval mode."""
    copy_ = copy.deepcopy(model).double().eval()
    x, y = VAL.tensors
    with torch.no_grad():
        logits = copy_(x.double())
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


@pytest.fixture
def sigint() -> Iterator[None]:
    """Lightning ignores SIGINT after a KeyboardInterrupt (graceful shutdown): put the handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def ours(record: list[warnings.WarningMessage]) -> list[str]:
    """The warnings this package emits (Lightning's own advice about workers and eval-mode modules aside)."""
    return [str(w.message) for w in record if issubclass(w.category, ModeCheckWarning)
            or "lightning_validate" in w.filename or "ValidationMixin" in str(w.message)]


def crash_then_rerun(fn: str, point: str, with_check: bool) -> Model:
    model = faulty(point)
    before = state(model)
    model.fault = point
    check = ModeCheck(on_violation="raise", verbose=False) if with_check else None
    if point == "interrupt":
        with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into a graceful exit
            run(fn, model, check)
    else:
        with pytest.raises(RuntimeError, match=f"^injected at {point}$"):
            run(fn, model, check)
    model.fault = None
    if with_check:
        assert state(model) == before, f"not given back after an exception in {point}"
        assert check is not None and check._run.status == "interrupted"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rerun = ModeCheck(on_violation="raise", verbose=False)
        run("fit", model, rerun)
        assert state(model) == before
        expected = reference(model)
        (results,) = run("validate", model, ModeCheck(on_violation="raise", verbose=False))
    assert ours(record) == []
    assert rerun.findings == []
    assert results["val/loss"] == pytest.approx(expected[0], abs=1e-6)
    assert results["val/acc"] == pytest.approx(expected[1], abs=1e-6)
    assert state(model) == before
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("fn", "point"), CASES, ids=[f"{fn}-{p}" for fn, p in CASES])
def test_exception_then_clean_rerun(fn: str, point: str) -> None:
    crash_then_rerun(fn, point, with_check=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_keyboard_interrupt_in_validation(fn: str, sigint: None) -> None:
    crash_then_rerun(fn, "interrupt", with_check=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_summary_and_report_say_interrupted_and_what_was_given_back(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    import json

    model = faulty("validation_step")
    model.fault = "validation_step"
    check = ModeCheck(report_path=tmp_path / "report.json")
    with pytest.raises(RuntimeError, match=r"^injected at validation_step$") as info:
        run("validate", model, check)
    assert info.value.__traceback__ is not None and "_fail" in str(info.traceback[-1].name)  # the user's traceback
    assert "ModeCheck (validate, interrupted by RuntimeError): " in caplog.text
    # Everything that was in train mode (the metric clones the mixin registered too); the frozen backbone stays.
    assert "gave back the modes of 8 submodules (`<root>`, `head`, `head.0`, ...) as they were before the " \
           "evaluation." in caplog.text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "interrupted" and report["interrupted_by"] == "RuntimeError"
    back = report["given_back"]
    assert back["requires_grad"] == [] and back["grad_enabled"] is None
    assert back["modes"][:5] == ["", "head", "head.0", "head.1", "criterion"]
    assert not any(name.startswith("backbone") for name in back["modes"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verbose_false_is_silent(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    model = faulty("validation_step")
    model.fault = "validation_step"
    with pytest.raises(RuntimeError, match=r"^injected at validation_step$"):
        run("validate", model, ModeCheck(verbose=False))
    model.fault = None
    run("fit", model, ModeCheck(verbose=False))
    assert "ModeCheck" not in caplog.text
    assert "ModeCheck" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_summary_never_goes_to_stdout(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A correct program's stdout is the same with ModeCheck attached: the summary goes through logging."""
    run("fit", Model(), None)
    without = capsys.readouterr().out
    run("fit", Model(), ModeCheck())
    assert capsys.readouterr().out == without
    assert "ModeCheck (fit): " in caplog.text


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("probe", [False, True], ids=["default", "probe"])
def test_attaching_modecheck_changes_no_logged_value(probe: bool) -> None:
    """A correct program logs the same values, bit for bit, with ModeCheck attached (the probe restores the RNG)."""
    logged = []
    for check in (None, ModeCheck(on_violation="raise", probe=probe, verbose=False)):
        torch.manual_seed(0)
        model = Model()
        run("fit", model, check)
        (results,) = run("validate", model, None)
        logged.append(({k: v.item() for k, v in model.trainer.callback_metrics.items()}, results,
                       [dict(r) for r in model.metrics_history], copy.deepcopy(model.state_dict())))
    (metrics_a, results_a, history_a, state_a), (metrics_b, results_b, history_b, state_b) = logged
    assert results_a == results_b and history_a == history_b and metrics_a == metrics_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
