"""Running values on Lightning's TQDM and Rich validation and test bars, read from the rendered frames."""

import io
import re

import lightning.pytorch as pl
import pytest
import rich
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import lightning_validate.mixin.epoch as epoch_module
from lightning_validate import ValidationMixin
from lightning_validate.mixin.bars import running_bar

BATCH = 64
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A Rich row: description, bar, "done/total", times, speed, then our values ("loss: 2.068 acc: 0.500").
RICH_ROW = re.compile(
    r"^(?P<desc>Validation|Testing|Sanity Checking|Epoch \S+)\s.*?(?P<done>\d+)/(?P<total>\d+) .*?it/s(?P<values>.*)$"
)
RICH_VALUE = re.compile(r"(\S+): (\S+)")
TQDM_VALUE = re.compile(r"(\w+)=([-\d.]+|nan)")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.fixture
def screen():
    """A forced terminal for Rich; Lightning reconfigures Rich's global console, so it is put back afterwards."""
    console = rich.get_console()
    saved = console.__dict__
    yield io.StringIO()
    console.__dict__ = saved


@pytest.fixture
def reads(monkeypatch):
    """Count the read-backs of the running values (each one a host-device sync on a GPU)."""
    calls = []
    original = epoch_module._show_running

    def counting(bar, loader_state):
        calls.append(1)
        original(bar, loader_state)

    monkeypatch.setattr(epoch_module, "_show_running", counting)
    return calls


class Lit(ValidationMixin, pl.LightningModule):
    num_classes = 10
    progress_interval = 0.0  # every batch: each frame can be checked against the values of the batches so far

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def configure_metrics(self):
        return {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Rarely(Lit):
    progress_interval = 3600.0  # one read: the first batch


class FrameBar(RichProgressBar):
    """Lightning's Rich bar, drawing one frame at each of its refreshes (in a terminal it redraws on a timer)."""

    def __init__(self, screen, **kwargs):
        console = dict(force_terminal=True, file=screen, width=220, color_system=None)
        super().__init__(console_kwargs=console, **kwargs)

    def refresh(self, *args, **kwargs):
        if self.progress is not None:
            self.progress.refresh()


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def rich_rows(screen):
    """Every row of every frame written to ``screen``: (description, done, total, {name: shown value}).

    A row drawn twice in a row is kept once (Lightning 2.2 draws each batch twice).
    """
    rows = []
    for line in re.split(r"[\r\n]", ANSI.sub("", screen.getvalue())):
        match = RICH_ROW.match(line.strip())
        if match:
            values = {k: float(v) for k, v in RICH_VALUE.findall(match["values"])}
            row = (match["desc"], int(match["done"]), int(match["total"]), values)
            if not rows or rows[-1] != row:
                rows.append(row)
    return rows


def reference(model, x, y):
    """Float64 full-data values of the model in eval mode: cross-entropy by torch, accuracy and F1 by sklearn."""
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    pred = logits.argmax(1).numpy()
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "acc": accuracy_score(y.numpy(), pred),
        "f1": f1_score(y.numpy(), pred, average="macro"),  # classes never seen nor predicted left out, as torchmetrics
    }


def check_running(rows, desc, total, model, x, y):
    """Each frame of the ``desc`` bar with ``total`` batches shows the values of the batches done so far."""
    seen = set()
    for d, done, t, values in rows:
        if d != desc or t != total or done == 0:
            continue
        expected = reference(model, x[: done * BATCH], y[: done * BATCH])
        assert values == pytest.approx(expected, abs=5e-4 + 1e-9), (desc, done)  # shown with 3 decimals
        seen.add(done)
    assert seen == set(range(1, total + 1))


def test_rich_validation_bars_show_running_values_then_the_exact_ones(digits, screen, reads):
    x, y = digits
    parts = [(x[:300], y[:300]), (x[300:], y[300:])]  # 5 and 24 batches; each dataloader has its own Rich task
    model = Lit()
    (first, second) = trainer(callbacks=[FrameBar(screen)]).validate(model, [loader(*p) for p in parts], verbose=False)
    rows = rich_rows(screen)
    check_running(rows, "Validation", 5, model, *parts[0])
    check_running(rows, "Validation", 24, model, *parts[1])
    assert len(reads) == 5 + 24
    # the logged values are exact, and the bar ends on them (the last dataloader's)
    for logged, part, idx in ((first, parts[0], 0), (second, parts[1], 1)):
        ref = reference(model, *part)
        for name in ("loss", "acc", "f1"):
            assert logged[f"val/{name}/dataloader_idx_{idx}"] == pytest.approx(ref[name], abs=1e-6)
    assert rows[-1][:3] == ("Validation", 24, 24)
    assert rows[-1][3] == {name: round(second[f"val/{name}/dataloader_idx_1"], 3) for name in ("loss", "acc", "f1")}


def test_rich_test_bar_is_throttled_and_ends_on_the_exact_values(digits, screen, reads):
    x, y = digits
    model = Rarely()
    (logged,) = trainer(callbacks=[FrameBar(screen)]).test(model, loader(x, y), verbose=False)
    assert len(reads) == 1  # the first batch; then the interval has not passed
    rows = [r for r in rich_rows(screen) if r[0] == "Testing" and r[1] > 0]
    first = {k: round(v, 3) for k, v in reference(model, x[:BATCH], y[:BATCH]).items()}
    running, end = rows[:29], rows[29:]  # a frame per batch, then the frames drawn at the epoch's end
    assert [done for _, done, _, _ in running] == list(range(1, 29 + 1))
    assert all(values == pytest.approx(first, abs=5e-4 + 1e-9) for _, _, _, values in running)
    ref = reference(model, x, y)
    assert end and all(done == 29 for _, done, _, _ in end)
    for _, _, _, values in end:
        assert values == pytest.approx(ref, abs=5e-4 + 1e-9)
        assert values == {name: round(logged[f"test/{name}"], 3) for name in ("loss", "acc", "f1")}
        assert values != pytest.approx(first, abs=1e-3)  # the end really shows other values than the first batch's
    assert logged == pytest.approx({f"test/{k}": v for k, v in ref.items()}, abs=1e-6)


def test_rich_fit_shows_running_values_and_keeps_the_training_bar_metrics(digits, screen):
    x, y = digits
    vx, vy = x[:300], y[:300]
    model = Lit()
    trainer(callbacks=[FrameBar(screen)], limit_train_batches=2, num_sanity_val_steps=2).fit(
        model, loader(x, y), loader(vx, vy)
    )
    rows = rich_rows(screen)
    # the sanity check ran the weights the model started with
    sanity = [r for r in rows if r[0] == "Sanity Checking" and r[1] > 0]
    assert [r[1] for r in sanity][:2] == [1, 2]
    for _, done, _, values in sanity:
        assert values == pytest.approx(reference(Lit(), vx[: done * BATCH], vy[: done * BATCH]), abs=5e-4 + 1e-9)
    check_running(rows, "Validation", 5, model, vx, vy)
    # Lightning's own metrics column still draws the training bar: the epoch values logged with prog_bar=True
    ref = reference(model, vx, vy)
    training = [values for desc, _, _, values in rows if desc.startswith("Epoch")]
    assert training[-1] == pytest.approx({f"val/{k}": v for k, v in ref.items()}, abs=5e-4 + 1e-9)


def test_rich_values_follow_the_theme(digits, screen):
    x, y = digits
    x, y = x[:300], y[:300]
    model = Lit()
    theme = RichProgressBarTheme(metrics_format=".5f", metrics_text_delimiter=" | ")
    (logged,) = trainer(callbacks=[FrameBar(screen, theme=theme)]).validate(model, loader(x, y), verbose=False)
    assert re.search(r"loss: \d\.\d{5} \| acc: \d\.\d{5} \| f1: \d\.\d{5}", screen.getvalue())
    *_, (_, done, _, values) = rich_rows(screen)
    assert done == 5
    assert values == {name: round(logged[f"val/{name}"], 5) for name in ("loss", "acc", "f1")}
    assert values == pytest.approx(reference(model, x, y), abs=5e-6 + 1e-12)


def test_tqdm_bars_unchanged(digits, capsys, reads):
    x, y = digits
    model = Rarely()
    (logged,) = trainer(callbacks=[TQDMProgressBar()]).validate(model, loader(x, y), verbose=False)
    assert len(reads) == 1
    frames = [dict(TQDM_VALUE.findall(f)) for f in capsys.readouterr().out.split("\r") if "Validation" in f]
    shown = [{k: float(v) for k, v in f.items()} for f in frames if f]
    first = reference(model, x[:BATCH], y[:BATCH])
    assert shown[0] == pytest.approx(first, abs=5e-4 + 1e-9)
    assert shown[-1] == {name: round(logged[f"val/{name}"], 3) for name in ("loss", "acc", "f1")}
    assert shown[-1] == pytest.approx(reference(model, x, y), abs=5e-4 + 1e-9)


class SilentBar(ProgressBar):
    """A progress bar that is neither Lightning's TQDM nor its Rich bar: the mixin leaves it alone."""

    def disable(self):
        pass


@pytest.mark.parametrize(
    "callbacks, enable",
    [([], False), ([SilentBar()], True), ([RichProgressBar(refresh_rate=0)], True), ([TQDMProgressBar(0)], True)],
    ids=["no bar", "other bar", "rich disabled", "tqdm disabled"],
)
def test_quiet_without_a_bar_to_draw_on(digits, reads, screen, callbacks, enable):
    x, y = digits
    t = trainer(callbacks=callbacks, enable_progress_bar=enable)
    assert running_bar(t, "val") is None
    model = Lit()
    (logged,) = t.validate(model, loader(x, y), verbose=False)
    assert reads == []  # nothing read back for a bar
    assert logged["val/acc"] == pytest.approx(reference(model, x, y)["acc"], abs=1e-6)


def test_running_bar_stages_and_before_the_run(screen):
    t = trainer(callbacks=[FrameBar(screen)])
    assert running_bar(t, "train") is None  # the training bar shows Lightning's own metrics
    bar = running_bar(t, "test")
    assert bar is not None
    bar.show({"loss": 1.0})  # no Rich display yet: nothing to draw on, nothing raised
    bar.finish({"loss": 1.0})
    assert screen.getvalue() == ""
    assert running_bar(trainer(callbacks=[TQDMProgressBar()]), "val") is None  # TQDM creates its bars at the run
