"""After an exception anywhere in a run, the next run on the same ``ValidationMixin`` model is clean.

Each case raises once at one point of ``fit``, ``validate``, ``test`` or ``predict``; then a fresh Trainer fits and
validates the same object. The rerun must give exact values, train its first batch in the modes the model had
before the crash, and warn only to say that modes were given back (when the crash left the model in eval mode).
The suite turns every other warning into an error (pyproject's ``filterwarnings``).
"""

import signal
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, log_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ValidationMixin

RESTORED = (r"The previous `trainer\.(fit|validate|test|predict)\(\)` on this model raised during "
            r"(validation|test|predict), and Lightning puts each submodule's mode back only when an evaluation ends "
            r"normally: \d+ submodules were still in eval mode \(.*\)\. ValidationMixin gave them back the modes they "
            r"had before that evaluation")


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:600] / 16.0, dtype=torch.float32), torch.tensor(y[:600])


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=64)  # 600 % 64 == 24: a short last batch


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, enable_progress_bar=False, limit_train_batches=4,
                    num_sanity_val_steps=2)
    return pl.Trainer(**{**defaults, **kwargs})


class Fragile(ValidationMixin, pl.LightningModule):
    """Raises ``Boom`` once, at the hook named by ``fail_at``; records the modes of each training batch."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()
        self.fail_at = None
        self.error = Boom
        self.train_modes = []
        self.step_losses = []

    def _maybe_fail(self, point):
        if self.fail_at == point:
            self.fail_at = None
            raise self.error(point)

    def forward(self, x):
        return self.net(x)

    def configure_metrics(self):
        return {"acc": MulticlassAccuracy(10, average="micro")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        self.train_modes.append({name: m.training for name, m in self.named_modules()})
        self._maybe_fail("training_step")
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append((loss.item(), len(batch[1])))
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._maybe_fail("validation_step")
        return super().validation_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._maybe_fail("test_step")
        return super().test_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self._maybe_fail("predict_step")
        return self(batch[0])

    def on_validation_start(self):
        self._maybe_fail("on_validation_start")

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._maybe_fail("on_validation_epoch_start")  # after super(): the epoch is open

    def on_test_start(self):
        self._maybe_fail("on_test_start")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._maybe_fail("on_train_epoch_start")

    def on_validation_epoch_end(self):
        self._maybe_fail("on_validation_epoch_end")  # before super(): the epoch stays open
        super().on_validation_epoch_end()

    def on_validation_end(self):
        self._maybe_fail("on_validation_end")

    def on_test_epoch_end(self):
        self._maybe_fail("on_test_epoch_end")
        super().on_test_epoch_end()

    def on_train_epoch_end(self):
        self._maybe_fail("on_train_epoch_end")
        super().on_train_epoch_end()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._maybe_fail("on_train_batch_end")


class FragileRestore(Fragile):
    """Overrides ``on_validation_model_train``: Lightning then calls it instead of putting the modes back itself."""

    def on_validation_model_train(self):
        self._maybe_fail("on_validation_model_train")
        super().on_validation_model_train()


def reference(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    model.train()
    prob = logits.softmax(1).numpy()
    return {"loss": log_loss(y.numpy(), prob / prob.sum(1, keepdims=True), labels=list(range(10))),
            "acc": accuracy_score(y.numpy(), logits.argmax(1).numpy())}


# (point, how the first run starts, whether the crash leaves the model in eval mode)
CASES = [
    ("validation_step", "fit", True),  # in the sanity check
    ("validation_step", "validate", True),
    ("on_validation_start", "fit", True),
    ("on_validation_start", "validate", True),
    ("on_validation_epoch_end", "fit", True),
    ("on_validation_epoch_end", "validate", True),
    ("on_validation_epoch_start", "fit", True),
    ("on_validation_end", "validate", True),
    ("on_validation_model_train", "validate", True),
    ("on_test_start", "test", True),
    ("test_step", "test", True),
    ("on_test_epoch_end", "test", True),
    ("predict_step", "predict", True),
    ("training_step", "fit", False),
    ("on_train_batch_end", "fit", False),
    ("on_train_epoch_start", "fit", False),
    ("on_train_epoch_end", "fit", False),  # the epoch-end validation ran and gave the modes back
]


def first_run(model, how, x, y):
    t = trainer(num_sanity_val_steps=2 if model.fail_at == "validation_step" else 0)
    with pytest.raises(Boom, match=model.fail_at):
        if how == "fit":
            t.fit(model, loader(x, y), loader(x, y))
        elif how == "validate":
            t.validate(model, loader(x, y), verbose=False)
        elif how == "test":
            t.test(model, loader(x, y), verbose=False)
        else:
            t.predict(model, loader(x, y))


def rerun_is_clean(model, x, y):
    """Fit one short epoch and validate with fresh Trainers: exact values, training modes, a clean epoch."""
    model.train_modes.clear()
    model.step_losses.clear()
    history_before = len(model.metrics_history)
    t = trainer()
    t.fit(model, loader(x, y), loader(x, y))
    assert model.train_modes[0] == {name: True for name, _ in model.named_modules()}  # no batch trains in eval mode
    assert len(model.metrics_history) == history_before + 1
    record = model.metrics_history[-1]
    losses, sizes = zip(*model.step_losses, strict=True)
    assert len(losses) == 4  # only this run's batches
    assert record["train/loss"] == pytest.approx(np.average(losses, weights=sizes), abs=1e-6)
    ref = reference(model, x, y)
    assert record["val/loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert record["val/acc"] == pytest.approx(ref["acc"], abs=1e-6)
    (val,) = trainer().validate(model, loader(x, y), verbose=False)
    assert val == pytest.approx({"val/loss": ref["loss"], "val/acc": ref["acc"]}, abs=1e-6)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(("point", "how", "left_in_eval"), CASES, ids=[f"{how}-{p}" for p, how, _ in CASES])
def test_the_next_run_is_clean(digits, point, how, left_in_eval):
    x, y = digits
    model = FragileRestore() if point == "on_validation_model_train" else Fragile()
    model.fail_at = point
    first_run(model, how, x, y)
    assert any(not m.training for m in model.modules()) == left_in_eval
    if left_in_eval:
        with pytest.warns(UserWarning, match=RESTORED) as caught:
            rerun_is_clean(model, x, y)
        assert len([w for w in caught if "gave them back" in str(w.message)]) == 1  # said once
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to say: no warning at all
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            rerun_is_clean(model, x, y)


def test_keyboard_interrupt_in_validation(digits):
    x, y = digits
    model = Fragile()
    model.fail_at, model.error = "validation_step", KeyboardInterrupt
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit
            trainer().validate(model, loader(x, y), verbose=False)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    with pytest.warns(UserWarning, match=r"The previous `trainer\.validate\(\)` on this model raised during valid"):
        rerun_is_clean(model, x, y)


def test_the_next_run_is_clean_for_mode_check(digits):
    """No finding in the next run caused by the crash: the modes are given back before ModeCheck looks."""
    from lightning_validate import ModeCheck

    x, y = digits
    model = Fragile()
    model.fail_at = "validation_step"
    first_run(model, "fit", x, y)
    check = ModeCheck(on_violation="raise", verbose=False)
    with pytest.warns(UserWarning, match=RESTORED):
        trainer(callbacks=[check]).fit(model, loader(x, y), loader(x, y))
    assert model.train_modes[-1] == {name: True for name, _ in model.named_modules()}


def test_given_back_exactly_frozen_submodules_stay_frozen(digits):
    x, y = digits
    model = Fragile()
    model.net[1].eval()  # frozen on purpose
    model.fail_at = "validation_step"
    first_run(model, "validate", x, y)
    # counted: the model, net, 4 of its layers, the criterion, 3 in lv_metrics; the metric clones are not shown
    with pytest.warns(UserWarning, match=r"10 submodules were still in eval mode \(`<model>`, `net`, `net\.0`, "
                                         r"`net\.2`, `net\.3`, \.\.\.\)\."):
        (val,) = trainer().validate(model, loader(x, y), verbose=False)
    assert [m.training for m in model.net] == [True, False, True, True, True]
    ref = reference(model, x, y)
    model.net[1].eval()
    assert val == pytest.approx({"val/loss": ref["loss"], "val/acc": ref["acc"]}, abs=1e-6)


def test_nothing_is_given_back_when_something_else_did(digits):
    """Modes given back by hand (or by ModeCheck) or changed since: the mixin leaves them and says nothing."""
    x, y = digits
    model = Fragile()
    model.fail_at = "validation_step"
    first_run(model, "validate", x, y)
    model.train()
    model.net[3].eval()  # the user's choice after the crash
    (val,) = trainer().validate(model, loader(x, y), verbose=False)
    assert [m.training for m in model.net] == [True, True, True, False, True]
    assert val["val/acc"] == pytest.approx(reference(model, x, y)["acc"], abs=1e-6)


def test_a_missing_super_is_still_reported_in_one_run(digits):
    x, y = digits

    class NoSuperAtEnd(Fragile):
        def on_validation_epoch_end(self):
            pass

    model = NoSuperAtEnd()
    with pytest.warns(UserWarning, match=r"The last validation epoch was never logged: if you override "
                                         r"`on_validation_epoch_end`, call `super\(\).on_validation_epoch_end\(\)`"):
        assert trainer().validate(model, loader(x, y), verbose=False) == [{}]
    with pytest.warns(UserWarning, match=r"The previous validation epoch was never logged") as caught:
        trainer(max_epochs=2).fit(model, loader(x, y), loader(x, y))
    assert len([w for w in caught if "never logged" in str(w.message)]) == 1  # once per run
