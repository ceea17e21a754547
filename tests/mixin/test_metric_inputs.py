"""``ValidationMixin.metric_inputs``: tuple outputs, weighted targets and one metric per head, against sklearn."""

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from host_sync import no_host_sync
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_validate import ValidationMixin

BATCH = 64  # 1797 % 64 == 5: the last batch is short


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    w = torch.linspace(0.5, 2.0, len(y))  # per-sample weights, all different
    return x, y, w


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, enable_progress_bar=False)
    return pl.Trainer(**{**defaults, **kwargs})


class AuxNet(ValidationMixin, pl.LightningModule):
    """A forward that returns ``(logits, aux)`` and batches ``x, (y, w)`` whose weights the loss uses."""

    def __init__(self, metrics=True):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.aux = nn.Linear(32, 3)
        self._with_metrics = metrics

    def forward(self, x):
        h = self.body(x)
        return self.head(h), self.aux(h)

    def unpack_batch(self, batch):
        x, y, w = batch
        return x, (y, w)

    def compute_loss(self, outputs, target):
        (logits, _), (y, w) = outputs, target
        return F.cross_entropy(logits, y, reduction="none") * w  # per sample: exact under any batching

    def configure_metrics(self):
        if not self._with_metrics:
            return super().configure_metrics()
        return {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AuxNetWithHook(AuxNet):
    def metric_inputs(self, outputs, target):
        return outputs[0], target[0]


def loader(x, y, w, batch_size=BATCH):
    return DataLoader(TensorDataset(x, y, w), batch_size=batch_size)


def reference(model, x, y, w):
    """Float64 full-data values: the weighted per-sample loss mean, and sklearn's accuracy and macro F1."""
    model.eval()
    with torch.no_grad():
        logits = model(x)[0].double()
    loss = (F.cross_entropy(logits, y, reduction="none") * w.double()).mean().item()
    pred = logits.argmax(1).numpy()
    return {"loss": loss, "acc": accuracy_score(y.numpy(), pred), "f1": f1_score(y.numpy(), pred, average="macro")}


def test_tuple_outputs_and_weighted_targets_in_every_stage(digits):
    x, y, w = digits
    model = AuxNetWithHook()
    t = trainer(limit_train_batches=5)
    t.fit(model, loader(x, y, w), loader(x, y, w))
    ref = reference(model, x, y, w)
    (val,) = t.validate(model, loader(x, y, w), verbose=False)
    (test,) = t.test(model, loader(x, y, w, batch_size=100), verbose=False)  # 1797 % 100 == 97
    for name in ("loss", "acc", "f1"):
        assert val[f"val/{name}"] == pytest.approx(ref[name], abs=1e-6)
        assert test[f"test/{name}"] == pytest.approx(ref[name], abs=1e-6)
    assert {"train/acc", "train/f1", "val/acc"} <= set(model.metrics_history[0])


def test_a_step_of_your_own_goes_through_the_hook(digits):
    x, y, w = digits

    class OwnStep(AuxNetWithHook):
        def validation_step(self, batch, batch_idx):
            inputs, target = self.unpack_batch(batch)
            return self.update_metrics("val", self(inputs), target)

    model = OwnStep()
    (val,) = trainer().validate(model, loader(x, y, w), verbose=False)
    ref = reference(model, x, y, w)
    assert val == pytest.approx({f"val/{k}": v for k, v in ref.items()}, abs=1e-6)


def test_a_metric_on_a_tuple_names_the_hook_and_the_code(digits):
    x, y, w = digits
    expected = (r"(?s)Metric `val/acc` \(MulticlassAccuracy\) failed on outputs a tuple of 2: "
                r"\(Tensor\(shape=\(64, 10\), dtype=float32\), Tensor\(shape=\(64, 3\), dtype=float32\)\) "
                r"and target a tuple of 2: .*"
                r"A metric takes tensors; .* override `metric_inputs` in your LightningModule.*\n\n"
                r"    def metric_inputs\(self, outputs, target\):\n        return outputs\[0\], target\[0\]\n")
    with pytest.raises(TypeError, match=expected):
        trainer().validate(AuxNet(), loader(x, y, w), verbose=False)

    class Default(AuxNet):  # the default accuracy (from num_classes) says the same before torchmetrics runs
        num_classes = 10

    expected = (r"(?s)The default metric `MulticlassAccuracy\(num_classes=10\)` expects .* but got outputs a tuple of 2"
                r".*override `metric_inputs`.*return outputs\[0\], target\[0\]")
    with pytest.raises(ValueError, match=expected):
        trainer().validate(Default(metrics=False), loader(x, y, w), verbose=False)

    class DefaultWithHook(Default, AuxNetWithHook):
        pass

    model = DefaultWithHook(metrics=False)
    (val,) = trainer().validate(model, loader(x, y, w), verbose=False)
    assert val["val/acc"] == pytest.approx(reference(model, x, y, w)["acc"], abs=1e-6)


def _example(name):
    """A module of ``examples/``, imported from its file: the docs show its code, these tests run it."""
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TwoHeads(_example("two_heads").TwoHeads):  # the docs' example (docs/metrics.md)
    def __init__(self):
        torch.manual_seed(0)
        super().__init__()


def test_two_heads_get_one_metric_each(digits):
    x, y, _ = digits
    model = TwoHeads()
    t = trainer(limit_train_batches=5)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    (val,) = t.validate(model, DataLoader(TensorDataset(x, y), batch_size=BATCH), verbose=False)
    model.eval()
    with torch.no_grad():
        out = model(x)
    digit, parity = out["digit"].double(), out["parity"].double()
    loss = (F.cross_entropy(digit, y, reduction="none") + F.cross_entropy(parity, y % 2, reduction="none")).mean()
    assert val["val/loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert val["val/digit_acc"] == pytest.approx(accuracy_score(y.numpy(), digit.argmax(1).numpy()), abs=1e-6)
    assert val["val/digit_f1"] == pytest.approx(f1_score(y.numpy(), digit.argmax(1).numpy(), average="macro"), abs=1e-6)
    assert val["val/parity_acc"] == pytest.approx(accuracy_score((y % 2).numpy(), parity.argmax(1).numpy()), abs=1e-6)
    assert {"train/digit_acc", "train/parity_acc", "val/parity_acc"} <= set(model.metrics_history[0])


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        ({"digit_acc": (1, 2)}, ValueError, r"Expected `metric_inputs` to return the inputs of each metric by name, "
                                            r"\['digit_acc', 'digit_f1', 'parity_acc'\], but got missing "
                                            r"\['digit_f1', 'parity_acc'\]\. Return one `\(preds, target\)`"),
        ({"digit_acc": (1, 2), "digit_f1": (1, 2), "parity_acc": (1, 2), "extra": (1, 2)}, ValueError,
         r"but got unknown \['extra'\]\."),
        ({"digit_acc": 1, "digit_f1": (1, 2), "parity_acc": (1, 2)}, TypeError,
         r"Expected `metric_inputs` to map metric 'digit_acc' to a tuple `\(preds, target\)` but got an int\."),
        (torch.zeros(3), TypeError, r"Expected `metric_inputs` to return a tuple `\(preds, target\)` for every metric, "
                                    r"or a dict from metric name to its `\(preds, target\)`, but got Tensor"),
    ],
)
def test_a_bad_hook_result_says_what_was_expected(digits, result, error, match):
    x, y, _ = digits

    class Bad(TwoHeads):
        def metric_inputs(self, outputs, target):
            return result

    with pytest.raises(error, match=match):
        trainer().validate(Bad(), DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5), verbose=False)


FORBIDDEN = {(torch.Tensor, n) for n in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                                          "nonzero")}
FORBIDDEN |= {(torch, n) for n in ("unique", "nonzero", "bincount", "masked_select")}  # output sizes from values


def test_the_hook_path_makes_no_sync_forcing_call(digits, monkeypatch):
    x, y, _ = digits
    steps = []

    class Guarded(TwoHeads):
        def configure_metrics(self):
            return {
                "digit_acc": MulticlassAccuracy(10, average="micro", validate_args=False),
                "digit_f1": MulticlassF1Score(10, average="micro", validate_args=False),
                "parity_acc": MulticlassAccuracy(2, average="micro", validate_args=False),
            }

        def training_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().training_step(batch, batch_idx)
            steps.append("train")
            return out

        def validation_step(self, batch, batch_idx):
            with no_host_sync(monkeypatch, FORBIDDEN):
                out = super().validation_step(batch, batch_idx)
            steps.append("val")
            return out

    model = Guarded()
    dl = DataLoader(TensorDataset(x[:320], y[:320]), batch_size=BATCH)
    trainer(limit_train_batches=3).fit(model, dl, dl)
    assert steps.count("train") == 3 and steps.count("val") == 5 + 2  # the sanity check's 2 batches, then 5
    with no_host_sync(monkeypatch, FORBIDDEN), pytest.raises(AssertionError, match="host-device sync: item"):
        torch.ones(1).item()
    assert np.isfinite(model.metrics_history[0]["val/parity_acc"])
