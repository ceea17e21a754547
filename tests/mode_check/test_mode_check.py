"""Tests of the ModeCheck callback: one real tiny Trainer run per reportable bug class and per legitimate pattern."""

from __future__ import annotations

import json
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ModeCheck, ModeCheckError, ModeCheckWarning
from lightning_validate.mode_check import callback as mode_check_module

# Lightning warns once at train start when modules are in eval mode; frozen backbones do that on purpose.
EVAL_AT_START = "ignore:Found .* module\\(s\\) in eval mode:UserWarning"


def loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Net(pl.LightningModule):
    """Backbone (Linear, BatchNorm) under a head (Dropout, Linear)."""

    def __init__(self, frozen_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 3))
        if frozen_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def trainer(check: ModeCheck | None, *callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=[*([check] if check else []), *callbacks], **options)


def fit(model: pl.LightningModule, check: ModeCheck, *callbacks: pl.Callback, **kwargs: Any) -> ModeCheck:
    trainer(check, *callbacks, **kwargs).fit(model, loader(), loader(16, seed=1))
    return check


def raises(model: pl.LightningModule, match: str, *callbacks: pl.Callback, **kwargs: Any) -> ModeCheckError:
    check = ModeCheck(on_violation="raise", **kwargs.pop("check", {}))
    with pytest.raises(ModeCheckError, match=match) as info:
        fit(model, check, *callbacks, **kwargs)
    return info.value


# ----------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"on_violation": "warning"}, r"`ModeCheck\(on_violation='warning'\)` is not valid. Expected `on_violation` to be "
                                  r"'warn' or 'raise' but got 'warning'."),
    ({"allow_train_mode": "head.0"}, r"got the string 'head.0': write `allow_train_mode=\['head.0'\]`"),
    ({"allow_eval_mode": [1]}, r"Expected `allow_eval_mode` to be a list of names or glob patterns \(str\) but got "
                               r"\[1\]"),
    ({"ignore": ["LV999"]}, r"Unknown finding code\(s\) in `ignore`: 'LV999'. Valid codes: LV101, LV102"),
    ({"ignore": "LV101"}, r"write `ignore=\['LV101'\]`"),
    ({"probe": 1}, r"Expected `probe` to be True or False but got 1."),
    ({"report_path": 3}, r"Expected `report_path` to be a file path"),
])
def test_arguments_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModeCheck(**kwargs)


def test_all_argument_errors_in_one_message(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"`ModeCheck\(on_violation='x', ignore=\['LV0'\], report_path='.*'\)` is not "
                                         r"valid\. Expected `on_violation`.*Unknown finding.*is a directory"):
        ModeCheck(on_violation="x", ignore=["LV0"], report_path=str(tmp_path))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Clean runs: every stage, and the legitimate patterns


def test_clean_model_every_stage(caplog: pytest.LogCaptureFixture, tmp_path: Any) -> None:
    model, check = Net(), ModeCheck(on_violation="raise", probe=True, report_path=tmp_path / "r.json")
    t = trainer(check)
    t.fit(model, loader(), loader(16, seed=1))
    assert check.findings == []
    out = caplog.text
    assert "ModeCheck (fit):" in out and "boundaries checked, no findings." in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stage"] == "fit" and report["findings"] == [] and report["status"] == "finished"
    assert report["boundaries_checked"]["on_train_batch_start"] == 4
    assert report["boundaries_checked"]["on_validation_batch_start"] == 3  # 1 sanity + 2 validation batches
    assert report["total_boundaries"] == sum(report["boundaries_checked"].values())
    t.validate(model, loader(16, seed=1))
    t.test(model, loader(16, seed=1))
    t.predict(model, loader(16, seed=1))
    assert check.findings == []
    assert caplog.text.count("no findings.") == 4
    assert "on_validation_model_eval" not in model.__dict__  # the wrappers are gone after each run


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_frozen_pretrained_batchnorm_backbone_is_clean() -> None:
    model = Net(frozen_backbone=True)
    assert fit(model, ModeCheck(on_violation="raise"), max_epochs=2).findings == []
    assert not model.backbone.training and model.head.training


def test_allowlisted_mc_dropout_is_clean_and_reported_when_not_allowed() -> None:
    class MCDropout(Net):
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()
            self.head[0].train()  # MC dropout: kept random on purpose

    check = fit(MCDropout(), ModeCheck(on_violation="raise", allow_train_mode=["head.0"], probe=True))
    assert check.findings == []
    raises(MCDropout(), r"LV101 submodule in train mode during evaluation: `head.0` at sanity_check/"
                        r"on_validation_batch_start.*allow_train_mode=\['head.0'\]")


def test_local_enable_grad_for_input_gradients_is_clean() -> None:
    class Saliency(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(self(x), y), x)
            self.log("saliency", grad.abs().mean())

    assert fit(Saliency(), ModeCheck(on_violation="raise")).findings == []


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_backbone_finetuning_is_clean() -> None:
    class Finetune(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)

    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    check = fit(Finetune(), ModeCheck(on_violation="raise"), finetuning, max_epochs=3)
    assert check.findings == []


def test_stochastic_weight_averaging_is_clean() -> None:
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    assert fit(Net(), ModeCheck(on_violation="raise"), swa, max_epochs=3).findings == []


# Lightning 2.6 added EMAWeightAveraging; the package supports older releases, whose suites skip this test.
EMAWeightAveraging = getattr(pl_callbacks, "EMAWeightAveraging", None)


@pytest.mark.skipif(EMAWeightAveraging is None, reason="this Lightning has no EMAWeightAveraging")
def test_ema_weight_averaging_is_clean() -> None:
    assert EMAWeightAveraging is not None
    check = ModeCheck(on_violation="raise")
    # EMA listed after and before the check: the swap at validation epoch start and back at its end is not a change.
    assert fit(Net(), check, EMAWeightAveraging(decay=0.5), max_epochs=2).findings == []
    t = trainer(None, EMAWeightAveraging(decay=0.5), ModeCheck(on_violation="raise"), max_epochs=2)
    t.fit(Net(), loader(), loader(16, seed=1))


def test_model_pruning_in_validation_epoch_end_is_clean() -> None:
    from lightning.pytorch.callbacks import ModelPruning

    pruning = ModelPruning("l1_unstructured", amount=0.2, prune_on_train_epoch_end=False, verbose=0)
    assert fit(Net(), ModeCheck(on_violation="raise"), pruning, max_epochs=2).findings == []


def test_gradient_accumulation_spanning_validation_is_clean() -> None:
    class Spy(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.seen.append(any(p.grad is not None for p in pl_module.parameters()))

    spy = Spy()
    # Validation after 3 of 4 batches with accumulation over 2: the second window is half-accumulated.
    check = fit(Net(), ModeCheck(on_violation="raise"), spy, accumulate_grad_batches=2, val_check_interval=3)
    assert check.findings == [] and spy.seen == [True]


def test_torch_compile_is_clean() -> None:
    model = torch.compile(Net(), backend="eager")
    assert fit(model, ModeCheck(on_violation="raise")).findings == []  # type: ignore[arg-type]


def test_validate_then_fit_is_clean() -> None:
    model, check = Net(), ModeCheck(on_violation="raise")
    t = trainer(check)
    t.validate(model, loader(16, seed=1))
    t.fit(model, loader(), loader(16, seed=1))
    assert check.findings == []


def test_metric_objects_logged_the_documented_ways_are_clean() -> None:
    class WithMetrics(Net):
        def __init__(self) -> None:
            super().__init__()
            self.train_acc = MulticlassAccuracy(num_classes=3)
            self.val_acc = MulticlassAccuracy(num_classes=3)
            self.test_acc = MulticlassAccuracy(num_classes=3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            self.train_acc(logits, y)
            self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
            return F.cross_entropy(logits, y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.val_acc.update(self(x), y)

        def on_validation_epoch_end(self) -> None:
            self.log("val_acc", self.val_acc.compute())
            self.val_acc.reset()

        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.test_acc(self(x), y)
            self.log("test_acc", self.test_acc)

    model, check = WithMetrics(), ModeCheck(on_violation="raise")
    t = trainer(check, max_epochs=3)
    t.fit(model, loader(), loader(16, seed=1))
    t.test(model, loader(16, seed=1))
    t.test(model, loader(16, seed=1))
    assert check.findings == []


# ----------------------------------------------------------------------------------------------------------------
# Bug classes users hit: each reported with the module's name and the fix


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_restore_override_calling_train_unfreezes_frozen_batchnorm() -> None:
    class Buggy(Net):
        def on_validation_model_train(self) -> None:
            self.train()

    err = raises(Buggy(frozen_backbone=True), r"LV205 submodule mode not restored after evaluation: `backbone` at "
                                              r"sanity_check/on_validation_model_train: expected eval mode as before "
                                              r"evaluation, saw backbone \(Sequential\) in train mode.*made by "
                                              r"`Buggy.on_validation_model_train`.*"
                                              r"Fix: restore each submodule's own mode")
    assert err.findings[0].module == "backbone"


def test_restore_override_doing_nothing_leaves_training_in_eval() -> None:
    class Buggy(Net):
        def on_validation_model_train(self) -> None:
            pass

    raises(Buggy(), r"LV205 .*`<model>` at sanity_check/on_validation_model_train: expected train mode as before "
                    r"evaluation.*Fix: put the submodule back in train mode")


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_pretrained_backbone_loaded_in_eval_mode() -> None:
    model = Net()
    model.backbone.eval()  # from_pretrained() returns modules in eval mode; nothing calls .train() since Lightning 2.2
    raises(model, r"LV302 trainable submodule in eval mode during training: `backbone` at train/on_train_batch_start.*"
                  r"Fix: call `self.backbone.train\(\)`", num_sanity_val_steps=0)
    check = fit(model, ModeCheck(on_violation="raise", allow_eval_mode=["backbone"]), num_sanity_val_steps=0)
    assert check.findings == []


def test_validation_step_switching_batchnorm_to_train_updates_its_statistics() -> None:
    class Buggy(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.backbone.train()  # "to get a loss", as torchvision detection models require
            super().validation_step(batch, batch_idx)
            self.backbone.eval()

    raises(Buggy(), r"LV202 buffer changed by evaluation: `backbone.1` at sanity_check/on_validation_end: .*changed in "
                    r"validation_step or a batch hook.*Fix: a submodule ran in train mode")


def test_eval_hook_that_does_not_switch_to_eval() -> None:
    class Buggy(Net):
        def on_validation_model_eval(self) -> None:
            pass

    raises(Buggy(), r"LV101 .*`<model>` at sanity_check/on_validation_batch_start.*"
                    r"unless `on_validation_model_eval` is overridden")


def test_backward_during_validation_changes_grad() -> None:
    class Buggy(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            with torch.enable_grad():
                F.cross_entropy(self(x), y).backward()

    raises(Buggy(), r"LV204 .grad changed by evaluation: .* at sanity_check/on_validation_end.*"
                    r"Fix: do not call `loss.backward\(\)` during evaluation")


def test_grad_left_enabled_in_validation_step() -> None:
    class Buggy(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            torch.set_grad_enabled(True)
            super().validation_step(batch, batch_idx)

    raises(Buggy(), r"LV102 grad enabled during evaluation: `grad mode` at sanity_check/on_validation_batch_end")


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_unfreeze_after_validation_unfreezes_frozen_layers() -> None:
    class Buggy(Net):
        def on_validation_start(self) -> None:
            self.freeze()

        def on_validation_end(self) -> None:
            self.unfreeze()  # also un-freezes the backbone that was frozen on purpose

    raises(Buggy(frozen_backbone=True), r"LV203 requires_grad changed by evaluation: `backbone` at "
                                        r"sanity_check/on_validation_end: expected requires_grad unchanged")


def test_train_override_ignoring_mode() -> None:
    class Stubborn(nn.Dropout):
        def train(self, mode: bool = True) -> Stubborn:
            return super().train(True)

    model = Net()
    model.head[0] = Stubborn(0.2)
    raises(model, r"LV101 .*`head.0` at sanity_check/on_validation_batch_start.*its class overrides `train\(\)`")


def test_parameters_changed_through_data_in_validation_step() -> None:
    class Buggy(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            super().validation_step(batch, batch_idx)
            self.head[1].weight.data.clamp_(-0.01, 0.01)

    raises(Buggy(), r"LV201 parameter changed by evaluation: `head.1.weight` at sanity_check/on_validation_end.*"
                    r"changed in validation_step or a batch hook")


def test_parameter_update_in_a_validation_hook_is_attributed_to_the_hook() -> None:
    class Buggy(Net):
        def on_validation_epoch_end(self) -> None:
            with torch.no_grad():
                self.head[1].bias.mul_(0.9)  # an "EMA update" in a validation hook

    raises(Buggy(), r"LV201 .*`head.1.bias`.*changed in `Buggy.on_validation_epoch_end`")


def test_metric_shared_by_train_and_validation() -> None:
    class Buggy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.acc = MulticlassAccuracy(num_classes=3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            self.acc(logits, y)
            self.log("train_acc", self.acc)
            return F.cross_entropy(logits, y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.acc(self(x), y)
            self.log("val_acc", self.acc)

    raises(Buggy(), r"LV401 metric object updated in two stages: `acc` at validate/end of validation: .*updated in "
                    r"train and validation.*Fix: use one instance per stage", num_sanity_val_steps=0)


def test_metric_never_reset() -> None:
    class Buggy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.val_acc = MulticlassAccuracy(num_classes=3)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.val_acc.update(self(x), y)

        def on_validation_epoch_end(self) -> None:
            self.log("val_acc", self.val_acc.compute())  # never reset: each epoch also counts the earlier ones

    raises(Buggy(), r"LV402 metric object not reset between epochs: `val_acc` at validate/end of validation: "
                    r".*saw `compute\(\)` read 4 updates, 2 of them carried over from the previous epoch.*"
                    r"Fix: call `self.val_acc.reset\(\)`",
           num_sanity_val_steps=0, max_epochs=2)


def test_metric_forward_value_logged_per_step_is_not_lv402() -> None:
    """The per-step value of `metric(preds, y)` never reads the accumulated (never reset) state: nothing is wrong."""

    class PerStep(Net):
        def __init__(self) -> None:
            super().__init__()
            self.train_acc = MulticlassAccuracy(num_classes=3)
            self.val_acc = MulticlassAccuracy(num_classes=3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            self.log("train_acc", self.train_acc(logits, y))  # the pattern of Lightning's own tests
            return F.cross_entropy(logits, y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_acc", self.val_acc(self(x), y))

    model = PerStep()
    check = fit(model, ModeCheck(on_violation="raise"), max_epochs=3)
    assert check.findings == []
    assert model.train_acc.update_count == 12 and model.val_acc.update_count == 7  # never reset, never read


def test_probe_finds_hard_coded_dropout() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.dropout(x, 0.5, training=True))

    model = Net()
    model.head = Block()
    assert fit(model, ModeCheck(on_violation="raise")).findings == []  # invisible without the probe
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    err = raises(model, r"LV103 non-deterministic forward in eval mode: `head` at sanity_check/on_validation_batch_end "
                        r"\(probe\).*outputs differ.*training=self.training", check={"probe": True})
    assert [f.module for f in err.findings] == ["head"]
    # Allowing the module silences it; the probe leaves the run's random numbers as they were.
    torch.manual_seed(0)
    check = ModeCheck(on_violation="raise", probe=True, allow_train_mode=["head"])
    trainer(check, limit_train_batches=0, num_sanity_val_steps=0).validate(model, loader(16, seed=1))
    assert check.findings == []
    assert not torch.equal(torch.rand(3), expected)  # validation consumed randomness (the dropout), probe did not add
    torch.manual_seed(0)
    trainer(None, limit_train_batches=0, num_sanity_val_steps=0).validate(model, loader(16, seed=1))
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    trainer(ModeCheck(probe=True, allow_train_mode=["head"], verbose=False), num_sanity_val_steps=0).validate(
        model, loader(16, seed=1))
    assert torch.equal(torch.rand(3), after_plain)


# ----------------------------------------------------------------------------------------------------------------
# Warn mode, reports, internal errors, hooks called directly


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_warn_mode_warns_once_per_distinct_finding(caplog: pytest.LogCaptureFixture, tmp_path: Any) -> None:
    class Buggy(Net):
        def on_validation_model_train(self) -> None:
            self.train()

    check = ModeCheck(report_path=tmp_path / "sub" / "report.json")
    with pytest.warns(ModeCheckWarning, match=r"LV205 .*`backbone`") as record:
        fit(Buggy(frozen_backbone=True), check, max_epochs=2)
    assert len([w for w in record if issubclass(w.category, ModeCheckWarning)]) == 1
    assert [f.code for f in check.findings] == ["LV205"]
    out = caplog.text
    assert "ModeCheck (fit):" in out and "1 distinct finding:" in out
    # Seen once: from then on the backbone is in train mode before each validation too (the damage is done).
    assert "LV205  submodule mode not restored after evaluation     1  backbone" in out
    report = json.loads((tmp_path / "sub" / "report.json").read_text())
    assert report["version"] == 2 and report["stage"] == "fit" and report["world_size"] == 1
    assert report["status"] == "finished" and report["interrupted_by"] is None and report["given_back"] is None
    (finding,) = report["findings"]
    assert finding["code"] == "LV205" and finding["module"] == "backbone" and finding["count"] == 1
    assert finding["message"] == check.findings[0].message


@pytest.mark.filterwarnings(EVAL_AT_START)
def test_ignore_silences_a_code() -> None:
    class Buggy(Net):
        def on_validation_model_train(self) -> None:
            pass

    check = fit(Buggy(), ModeCheck(on_violation="raise", ignore=["LV205", "LV302"]))
    assert check.findings == []


def test_raise_writes_the_report_and_removes_the_wrappers(tmp_path: Any) -> None:
    class Buggy(Net):
        def on_validation_model_train(self) -> None:
            pass

    model = Buggy()
    with pytest.raises(ModeCheckError, match="LV205"):
        fit(model, ModeCheck(on_violation="raise", report_path=tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "interrupted" and report["findings"][0]["code"] == "LV205"
    assert not any(k.startswith("on_") for k in model.__dict__)


def test_internal_error_disables_the_check_and_leaves_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("snapshot failed")

    monkeypatch.setattr(mode_check_module, "take_snapshot", broken)
    model = Net(frozen_backbone=False)
    model.head[0].eval()  # a mode the user chose: must survive
    check = ModeCheck(on_violation="raise")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Found .* module", UserWarning)
        with pytest.warns(ModeCheckWarning, match=r"ModeCheck internal error in `on_validation_model_eval` "
                                                  r"\(RuntimeError: snapshot failed\); ModeCheck is disabled"):
            fit(model, check, max_epochs=2)
    assert check.findings == [] and not model.head[0].training and model.head[1].training
    assert not any(k.startswith("on_") for k in model.__dict__)
    assert torch.is_grad_enabled()


def test_hooks_called_directly() -> None:
    model, check = Net(), ModeCheck(on_violation="raise")
    t = trainer(check)
    check.setup(t, model, "fit")
    assert model.on_validation_model_eval.__wrapped__ is not None  # type: ignore[attr-defined]
    check.on_train_epoch_start(t, model)
    check.on_train_batch_start(t, model, None, 0)  # clean: train mode, grad on
    with torch.no_grad(), pytest.raises(ModeCheckError, match=r"LV301 grad disabled during training: `grad mode` at "
                                                              r"train/on_train_batch_start"):
        check.on_train_batch_start(t, model, None, 1)
    check.teardown(t, model, "fit")
    assert "on_validation_model_eval" not in model.__dict__
    # validation hooks without a baseline fall back to on_validation_start
    check.setup(t, model, "validate")
    model.eval()
    check.on_validation_start(t, model)
    with torch.no_grad():
        check.on_validation_batch_start(t, model, None, 0)
        model.head[0].train()
        with pytest.raises(ModeCheckError, match=r"LV101 .*`head.0` at validate/on_validation_batch_end"):
            check.on_validation_batch_end(t, model, None, None, 0)
    check.on_exception(t, model, RuntimeError())
    assert check.summary().startswith("ModeCheck (validate, interrupted by RuntimeError): 4 boundaries checked, "
                                      "1 distinct finding:")


def test_user_error_during_validation_passes_through_untouched() -> None:
    class Failing(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.head[1].weight.data.zero_()  # would be LV201 at the end of validation, which never comes
            raise KeyError("user bug")

    model = Failing()
    with pytest.raises(KeyError, match="user bug"):
        fit(model, ModeCheck(on_violation="raise"))
    assert not any(k.startswith("on_") for k in model.__dict__)


class ClampsInValidation(Net):
    """Writes parameters through `.data` at the end of each validation epoch (an EMA or clipping in the wrong hook)."""

    def on_validation_epoch_end(self) -> None:
        for p in self.parameters():
            p.data.clamp_(-0.01, 0.01)


def test_findings_accumulate_across_runs(caplog: pytest.LogCaptureFixture) -> None:
    model, check = ClampsInValidation(), ModeCheck()
    t = trainer(check)
    with pytest.warns(ModeCheckWarning, match=r"LV201 parameter changed by evaluation: `.*` at "
                                              r"(sanity_check|validate)/on_validation_end: .*Fix: do not write "
                                              r"parameters during evaluation"):
        t.fit(model, loader(), loader(16, seed=1))
    after_fit = list(check.findings)
    assert {f.code for f in after_fit} == {"LV201"}
    with torch.no_grad():  # put the weights outside the clamp range again, so validate() changes them once more
        for p in model.parameters():
            p.fill_(0.5)
    with pytest.warns(ModeCheckWarning, match=r"LV201"):
        t.validate(model, loader(16, seed=1), verbose=False)
    assert check.findings[: len(after_fit)] == after_fit  # fit's findings are kept after validate()
    assert len(check.findings) > len(after_fit)
    assert "LV201" in caplog.text.split("ModeCheck (validate):")[1]  # the summary covers the latest run


# ----------------------------------------------------------------------------------------------------------------
# Allowlists and buffers filled in on the first forward (no false alarms)


@pytest.mark.parametrize("pattern", ["backbone.1", "backbone.?", "backbone"], ids=["exact", "glob", "parent"])
def test_allow_train_mode_silences_lv202_of_the_module_it_names(pattern: str) -> None:
    """A BatchNorm kept in train mode on purpose updates its statistics: neither LV101 nor LV202 for it."""

    class KeptInTrain(Net):
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()
            self.backbone[1].train()  # on purpose (allowlisted)

    check = fit(KeptInTrain(), ModeCheck(on_violation="raise", allow_train_mode=[pattern]))
    assert check.findings == []
    # Without the allowlist both are reported, on the BatchNorm itself.
    err = raises(KeptInTrain(), r"LV101 .*`backbone.1`")
    assert [f.module for f in err.findings] == ["backbone.1"]


class PositionTable(nn.Module):
    """Like timm's ConViT GPSA: a placeholder buffer replaced by a fixed table of positions on the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.rel_indices.shape[1] != n:
            idx = torch.arange(n, dtype=x.dtype)
            table = torch.stack(torch.broadcast_tensors(idx[:, None], idx[None, :], (idx[:, None] - idx[None, :])), -1)
            self.rel_indices = table[None]  # mode, weights and data play no part: initialisation
        return x + self.rel_indices[..., 2].sum() * 0


def test_buffer_filled_in_on_the_first_forward_is_not_lv202(caplog: pytest.LogCaptureFixture) -> None:
    model = Net()
    model.backbone.append(PositionTable())
    check = fit(model, ModeCheck(on_violation="raise"))
    assert check.findings == []
    assert model.backbone[3].rel_indices.shape == (1, 16, 16, 3)
    assert ("ModeCheck: buffer `backbone.3.rel_indices` was filled in on the first forward (shape (1, 1, 1, 3) -> "
            "(1, 16, 16, 3)): initialisation, not reported") in caplog.text
    # A real change of the same buffer later is still reported.

    class Overwrites(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            super().validation_step(batch, batch_idx)
            self.backbone[3].rel_indices.add_(1)

    buggy = Overwrites()
    buggy.backbone.append(PositionTable())
    raises(buggy, r"LV202 .*`backbone.3.rel_indices`")


def test_lv205_fix_names_the_test_hook_at_the_test_stage() -> None:
    class Buggy(Net):
        def on_test_model_train(self) -> None:
            pass  # forgets to restore

    check = ModeCheck(on_violation="raise")
    with pytest.raises(ModeCheckError, match=r"LV205 .* at test/on_test_model_train: .*remove the "
                                             r"`on_test_model_train` override") as info:
        trainer(check).test(Buggy(), loader(16, seed=1), verbose=False)
    assert "on_validation" not in str(info.value)
