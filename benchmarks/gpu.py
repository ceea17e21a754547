"""The GPU claims, measured on a GPU: host-device syncs per batch, ms/batch ratios, two real architectures, FSDP1.

One script, about two minutes on one H200 (at most ~5), every number from one run:

1. **Syncs per batch**, counted with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call
   becomes a warning, which is counted (and its call site kept) instead of printed. Counted per batch window (from
   one batch's start to the next batch's start, or to the epoch end), for ``validate()``, the mixin's
   ``training_step``, ``validation_step`` and ``test_step``, ``ModeCheck``'s per-batch checks and, for reference,
   the usual hand-written loop and Lightning's ``self.log(name, metric)`` idiom. The claim is 0 for ours. The
   column is the mean over the batches between the first and the last of each epoch (the JSON has every window,
   the first and last ones, the syncs outside batch windows (per epoch) and the call sites).
2. **ms/batch ratios** at batch 64 and 4096 on the MLP of ``plain_loop.py`` / ``lightning_loop.py`` (their
   variants, imported): ``validate()`` vs the bare loop doing the same work; ``ValidationMixin`` vs a Lightning step
   doing the same work by hand on the device, vs the forward-only floor and vs the idiom. Interleaved rounds in a
   shuffled order; each ratio is the median over rounds of that round's ratio. The Lightning clock runs from
   ``on_validation_epoch_start`` to ``on_validation_end`` with the device drained at both ends (so it holds the
   batches and the epoch-end reads, not Trainer setup, and not ModeCheck's per-evaluation snapshot and comparison,
   which run just outside it and are timed in 3).
3. **resnet50 and ViT-B/16** (torchvision, random weights, nothing downloaded; a self-contained definition of the
   same architecture, labelled as such, when torchvision cannot be imported): the same Lightning ratios at batch
   64, the syncs, and ``take_snapshot`` / ``take_snapshot`` + ``compare`` (one evaluation's check by ModeCheck)
   against one forward pass of a batch of 64.
4. **FSDP1** (``strategy="fsdp"``, and with ``auto_wrap_policy={nn.Linear}``, one GPU): the mixin's ``val/loss`` and
   ``val/acc`` against a float64 reference over the whole data (a short last batch included), ``ModeCheck`` clean
   on ``fit`` and ``validate``, and two planted bugs it must catch (a parameter scaled in ``validation_step``:
   LV201; a BatchNorm switched to train mode there: LV101).

Prints one markdown table (for docs/benchmarks.md) and the goals, and writes everything to a JSON file.

    python benchmarks/gpu.py --out $OUT/gpu.json    # on a CUDA machine; docs/gpu-run.md has the exact command
    python benchmarks/gpu.py --dry-run              # every code path on the CPU, tiny sizes, no numbers worth reading

Without CUDA and without ``--dry-run`` it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

NO_CUDA_MESSAGE = (
    "benchmarks/gpu.py needs a CUDA GPU, but torch.cuda.is_available() is False (torch {torch}). Run it on the GPU "
    "machine (docs/gpu-run.md), or pass --dry-run to run every code path on the CPU with tiny sizes."
)

_SYNC_WARNING = "synchronizing CUDA operation"
_BATCH_LABELS = ("batch", "train", "val", "test")  # the marks that open a batch window
_HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    dry: bool
    device: torch.device
    accelerator: str
    batch_sizes: tuple[int, ...] = (64, 4096)
    batches: int = 200  # per timed epoch, MLP
    repeats: int = 7
    warmup: bool = True
    count_batches: int = 20  # per epoch in the sync-counting runs
    arch_batch: int = 64
    arch_image: int = 224
    arch_batches: int = 20
    arch_repeats: int = 5
    arch_count_batches: int = 6
    snapshot_rounds: int = 7
    snapshot_target_s: float = 0.2
    fsdp_samples: int = 1000  # 15 batches of 64 and one of 40
    fsdp_batch: int = 64

    @classmethod
    def make(cls, dry: bool) -> Config:
        if not dry:
            return cls(dry=False, device=torch.device("cuda"), accelerator="cuda")
        return cls(
            dry=True, device=torch.device("cpu"), accelerator="cpu", batch_sizes=(4, 16), batches=3, repeats=1,
            warmup=False, count_batches=4, arch_batch=2, arch_image=32, arch_batches=2, arch_repeats=1,
            arch_count_batches=3, snapshot_rounds=1, snapshot_target_s=0.002, fsdp_samples=40, fsdp_batch=16,
        )

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------
# Counting syncs


def _call_site() -> str:
    """Where a sync was asked for: the innermost frame outside torch, and the innermost one of ours if different."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/warnings.py" not in f.filename]  # not show, not here
    outside = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename]
    ours = [f for f in outside if "lightning_validate" in f.filename or str(_HERE) in f.filename]

    def name(f: traceback.FrameSummary) -> str:
        return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}"

    if not outside:
        return "?"
    site = name(outside[-1])
    if ours and ours[-1] is not outside[-1]:
        site += f" <- {name(ours[-1])}"
    return site


class SyncCounter:
    """Count host-device synchronizations: ``set_sync_debug_mode("warn")`` makes each one a warning, counted here.

    ``mark(label)`` records the count so far; the windows between marks give syncs per batch. With
    ``enabled=False`` (no CUDA) the marks are still kept, so a dry run goes through the same bookkeeping, and every
    count reads None. Syncs made inside autograd's backward threads reach C++'s warning handler, not Python's, and
    are not counted (the steps' own code runs in the main thread).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.count = 0
        self.marks: list[tuple[str, int]] = []
        self.sites: Counter[tuple[str, str]] = Counter()  # (label of the window it fell in, call site)
        self._saved: contextlib.ExitStack | None = None

    def __enter__(self) -> SyncCounter:
        if self.enabled:
            torch.cuda.synchronize()  # work queued before is not ours to count
            stack = contextlib.ExitStack()
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("always", message=f".*{_SYNC_WARNING}.*")
            forward = warnings.showwarning

            def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
                if _SYNC_WARNING in str(message):
                    self.count += 1
                    self.sites[(self.marks[-1][0] if self.marks else "before", _call_site())] += 1
                else:
                    forward(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            self._saved = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            assert self._saved is not None
            self._saved.close()

    def mark(self, label: str) -> None:
        self.marks.append((label, self.count))

    def windows(self, label: str) -> list[int]:
        """Syncs in each window that starts at a mark ``label`` and ends at the next mark (or at the end)."""
        out = []
        for i, (name, start) in enumerate(self.marks):
            if name == label:
                end = self.marks[i + 1][1] if i + 1 < len(self.marks) else self.count
                out.append(end - start)
        return out

    def summary(self, label: str) -> dict[str, Any]:
        """Per-batch statistics of the windows of ``label``; the counts are None without CUDA."""
        windows = self.windows(label)
        if not windows:
            raise RuntimeError(f"no batch window labelled {label!r} was marked: the marks are {self.marks[:6]}...")
        interior = windows[1:-1] if len(windows) > 2 else windows
        in_batches = sum(sum(self.windows(name)) for name in _BATCH_LABELS)
        if not self.enabled:
            return {"batches": len(windows), "per_batch": None, "note": "n/a on CPU"}
        outside: Counter[str] = Counter()
        for (where, site), n in self.sites.items():
            if where not in _BATCH_LABELS:
                outside[site] += n
        return {
            "batches": len(windows),
            "per_batch": sum(interior) / len(interior),
            "first_batch": windows[0],
            "last_batch": windows[-1],
            "windows": windows,
            "outside_batch_windows": self.count - in_batches,
            "total": self.count,
            "sites": {site: n for (where, site), n in self.sites.most_common() if where == label},
            "sites_outside_batch_windows": dict(outside.most_common(8)),
        }


class Marked:
    """An iterable of batches that marks each batch's start and the end of the epoch on a SyncCounter."""

    def __init__(self, batches: Sequence[Any], counter: SyncCounter) -> None:
        self.batches = batches
        self.counter = counter

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.counter.mark("batch")
            yield batch
        self.counter.mark("epoch_end")


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    section: str
    path: str
    batch: int | None = None
    ms: float | None = None  # ms per batch; ms per call in the snapshot rows
    x_floor: float | None = None
    x_same: float | None = None
    x_idiom: float | None = None
    syncs: dict[str, Any] | None = None
    check: str = ""


@dataclass
class Goal:
    goal: str
    value: str
    met: bool | None  # None: not measured (dry run, or the section failed)


@dataclass
class Results:
    env: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    # The paths claimed to make 0 syncs per batch: their counts and the counts of the floor they run on (the syncs
    # that Lightning, the model or the data make without our code), or None for plain loops.
    claimed: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = field(default_factory=dict)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _syncs(s: dict[str, Any] | None) -> str:
    if s is None:
        return ""
    if s.get("per_batch") is None:
        return s.get("note", "")
    value = s["per_batch"]
    return "0" if value == 0 else f"{value:.2f}"


def markdown(results: Results) -> str:
    lines = [
        "| model / section | path | batch | ms | x floor | x same work | x idiom | syncs/batch | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        ms = "" if r.ms is None else f"{r.ms:.3f}"
        lines.append(
            f"| {r.section} | {r.path} | {'' if r.batch is None else r.batch} | {ms} | {_fmt(r.x_floor)} | "
            f"{_fmt(r.x_same)} | {_fmt(r.x_idiom)} | {_syncs(r.syncs)} | {r.check} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def _paired(times: dict[str, list[float]], name: str, base: str | None) -> float | None:
    """Median over rounds of each round's ratio ``name / base``: slow drifts of the machine cancel."""
    if base is None or base not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def interleaved(variants: dict[str, Callable[[], float]], cfg: Config, repeats: int) -> dict[str, list[float]]:
    """Each variant returns the seconds it measured; one warm-up round, then ``repeats`` rounds in shuffled order."""
    if cfg.warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)  # a variant's place in a round changes its time: vary it
        for name in order:
            gc.collect()
            times[name].append(variants[name]())
    return times


class _Batches(torch.utils.data.Dataset[Any]):
    """Batches made up front (on the device): ``DataLoader(_Batches(...), batch_size=None)`` yields them as they are."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


def loader_of(batches: Sequence[Any]) -> torch.utils.data.DataLoader[Any]:
    return torch.utils.data.DataLoader(_Batches(batches), batch_size=None)


# --------------------------------------------------------------------------------------------------------------
# The models: the MLP of the CPU benchmarks, resnet50 and ViT-B/16


class _Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def local_resnet50(num_classes: int = 1000, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> nn.Module:
    """ResNet-50 as torchvision defines it (same modules, 25,557,032 parameters), for machines without torchvision.

    ``blocks`` and ``width`` make the dry run's tiny version of the same code.
    """
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, width, 7, 2, 3, bias=False)), ("bn1", nn.BatchNorm2d(width)),
        ("relu", nn.ReLU(inplace=True)), ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    inplanes = width
    for i, (n_blocks, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True)):
        planes = width * 2**i
        stage: list[nn.Module] = []
        for b in range(n_blocks):
            s = stride if b == 0 else 1
            down = None
            if b == 0 and (s != 1 or inplanes != planes * 4):
                down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, s, bias=False), nn.BatchNorm2d(planes * 4))
            stage.append(_Bottleneck(inplanes, planes, s, down))
            inplanes = planes * 4
        layers.append((f"layer{i + 1}", nn.Sequential(*stage)))
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(inplanes, num_classes))]
    model = nn.Sequential(OrderedDict(layers))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class _EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, hidden),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class LocalViT(nn.Module):
    """A Vision Transformer as torchvision defines it (ViT-B/16 by default: 86,567,656 parameters)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, num_layers: int = 12, num_heads: int = 12,
                 hidden_dim: int = 768, mlp_dim: int = 3072, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, (image_size // patch_size) ** 2 + 1, hidden_dim).normal_(
            std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*(_EncoderBlock(num_heads, hidden_dim, mlp_dim) for _ in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.heads = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(self.dropout(x + self.pos_embedding)))
        return self.heads(x[:, 0])


def _torchvision() -> tuple[Any, str]:
    """torchvision's models module and its version, or None and why it cannot be used."""
    try:
        import torchvision  # type: ignore[import-untyped]
        from torchvision import models
    except Exception as err:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return models, str(torchvision.__version__)


TINY_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def make_arch(name: str, cfg: Config, num_classes: int = 1000) -> tuple[nn.Module, str]:
    """resnet50 or ViT-B/16 with random weights, from torchvision when it imports; says which definition was used.

    The dry run builds tiny versions of the self-contained definitions: the point there is the code path.
    """
    if cfg.dry:
        if name == "resnet50":
            return local_resnet50(num_classes, blocks=(1, 1, 1, 1), width=8), "dry run: tiny self-contained ResNet"
        return LocalViT(num_classes=num_classes, **TINY_VIT), "dry run: tiny self-contained ViT"
    models, version = _torchvision()
    if models is not None:
        if name == "resnet50":
            return models.resnet50(weights=None, num_classes=num_classes), f"torchvision {version} `resnet50`"
        return models.vit_b_16(weights=None, num_classes=num_classes), f"torchvision {version} `vit_b_16`"
    label = "ResNet-50" if name == "resnet50" else "ViT-B/16"
    return (LocalViT(num_classes=num_classes) if name == "vit_b_16" else local_resnet50(num_classes),
            f"self-contained {label}: torchvision is not usable here")


# --------------------------------------------------------------------------------------------------------------
# Lightning modules (the variants of lightning_loop.py, plus what training and the FSDP check need)


def lightning_classes() -> dict[str, Any]:
    """Import Lightning and the variants late: the no-CUDA exit must not pay for them."""
    import lightning.pytorch as pl
    from lightning_loop import Base, Floor, Idiom, LoopTimer, Mixin, SameWork, make_net

    class FitFloor(Floor):
        """Lightning's own syncs in fit and test: the least training step, forward-only evaluation steps."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(self(batch[0]), batch[1])

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class TrainableMixin(Mixin):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class ParamBug(TrainableMixin):
        """Scales the head in place during validation: ModeCheck must report LV201."""

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            with torch.no_grad():
                for p in self.net[-1].parameters():
                    p.mul_(0.999)
            return super().validation_step(batch, batch_idx, dataloader_idx)

    class ModeBug(TrainableMixin):
        """Switches a BatchNorm back to train mode during validation: ModeCheck must report LV101."""

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            self.net[1].train()
            return super().validation_step(batch, batch_idx, dataloader_idx)

    class DeviceLoopTimer(LoopTimer):
        """Wall seconds from the validation epoch start to the end of validation, the device drained at both ends."""

        def __init__(self, sync: Callable[[], None]) -> None:
            super().__init__()
            self.sync = sync

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.sync()
            self.start = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self.sync()
            self.elapsed = time.perf_counter() - self.start

    class BatchMarks(pl.Callback):
        """Marks each batch's start and each epoch's start and end on a SyncCounter (put it first in the list)."""

        def __init__(self, counter: SyncCounter) -> None:
            self.counter = counter

        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("train")

        def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("val")

        def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("test")

        def on_train_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("epoch_end")

        def on_validation_epoch_start(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("epoch_start")

        def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("epoch_end")

        def on_test_epoch_start(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("epoch_start")

        def on_test_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            self.counter.mark("epoch_end")

    return {
        "pl": pl, "Base": Base, "Floor": Floor, "Idiom": Idiom, "Mixin": Mixin, "SameWork": SameWork,
        "make_net": make_net, "FitFloor": FitFloor, "TrainableMixin": TrainableMixin, "ParamBug": ParamBug,
        "ModeBug": ModeBug, "DeviceLoopTimer": DeviceLoopTimer, "BatchMarks": BatchMarks,
    }


def trainer(cfg: Config, callbacks: Sequence[Any] = (), strategy: Any = "auto", **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator=cfg.accelerator, devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, callbacks=list(callbacks), **kwargs,
    )


FLOOR = "Lightning: forward-only `validation_step` (floor)"
SAME = "Lightning: same work by hand (loss and correct-count sums on the device, one read per epoch)"
IDIOM = "Lightning: `self.log(name, metric)` idiom (`MeanMetric` + `MulticlassAccuracy`)"
MIXIN = "`ValidationMixin` `validation_step`"
MIXIN_MC = "`ValidationMixin` + `ModeCheck()`"


def lightning_variants(lc: dict[str, Any], net: nn.Module, num_classes: int) -> dict[str, tuple[Any, list[Any]]]:
    from lightning_validate import ModeCheck

    return {
        FLOOR: (lc["Floor"](net, num_classes), []),
        SAME: (lc["SameWork"](net, num_classes), []),
        IDIOM: (lc["Idiom"](net, num_classes), []),
        MIXIN: (lc["Mixin"](net, num_classes), []),
        MIXIN_MC: (lc["Mixin"](net, num_classes), [ModeCheck(verbose=False)]),
    }


def time_lightning(lc: dict[str, Any], cfg: Config, variants: dict[str, tuple[Any, list[Any]]],
                   loader: Any, repeats: int) -> dict[str, list[float]]:
    def run(module: Any, callbacks: list[Any]) -> Callable[[], float]:
        def go() -> float:
            timer = lc["DeviceLoopTimer"](cfg.sync)
            trainer(cfg, [timer, *callbacks]).validate(module, loader, verbose=False)
            return float(timer.elapsed)
        return go

    return interleaved({name: run(m, cbs) for name, (m, cbs) in variants.items()}, cfg, repeats)


def lightning_rows(section: str, times: dict[str, list[float]], batches: int, batch: int,
                   syncs: dict[str, dict[str, Any]]) -> list[Row]:
    rows = []
    for name in times:
        ms = statistics.median(times[name]) / batches * 1e3
        rows.append(Row(
            section, name, batch, ms,
            x_floor=_paired(times, name, FLOOR),
            x_same=_paired(times, name, SAME) if name in (MIXIN, MIXIN_MC) else None,
            x_idiom=_paired(times, name, IDIOM) if name in (MIXIN, MIXIN_MC) else None,
            syncs=syncs.get(name),
        ))
    return rows


# --------------------------------------------------------------------------------------------------------------
# 1. Syncs per batch


def count_syncs(cfg: Config, results: Results) -> dict[str, dict[str, Any]]:
    """Syncs per batch of every path on the MLP at batch 64; returns {path: summary} for the tables below."""
    from plain_loop import FEATURES, bare, make_model, usual_loop
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_validate import ModeCheck, validate

    lc = lightning_classes()
    classes = 10
    torch.manual_seed(0)
    bs = cfg.batch_sizes[0]
    batches = [(torch.randn(bs, FEATURES, device=cfg.device), torch.randint(0, classes, (bs,), device=cfg.device))
               for _ in range(cfg.count_batches)]
    model = make_model().to(cfg.device)
    criterion = nn.CrossEntropyLoss()
    counted: dict[str, dict[str, Any]] = {}

    def plain(name: str, fn: Callable[[Marked], object]) -> None:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), SyncCounter(cfg.cuda) as counter:
            fn(Marked(batches, counter))
        counted[name] = counter.summary("batch")

    def acc(**kwargs: Any) -> Any:
        return MulticlassAccuracy(num_classes=classes, average="micro", **kwargs).to(cfg.device)

    plain(PLAIN_FLOOR, lambda b: bare(model, b, criterion))
    plain(PLAIN_USUAL, lambda b: usual_loop(model, b, criterion))
    plain(VALIDATE_LOSS, lambda b: validate(model, b, criterion=criterion, progress=False))
    plain(VALIDATE_ACC, lambda b: validate(model, b, criterion=criterion, metrics={"acc": acc()}, progress=False))
    plain(VALIDATE_ACC_NOCHECK, lambda b: validate(
        model, b, criterion=criterion, metrics={"acc": acc(validate_args=False)}, progress=False))
    plain(VALIDATE_BAR, lambda b: validate(model, b, criterion=criterion, metrics={"acc": acc(validate_args=False)}))

    loader = loader_of(batches)
    net = lc["make_net"]()
    for name, (module, callbacks) in lightning_variants(lc, net, classes).items():
        with SyncCounter(cfg.cuda) as counter:
            trainer(cfg, [lc["BatchMarks"](counter), *callbacks]).validate(module, loader, verbose=False)
        counted[name] = counter.summary("val")
    with SyncCounter(cfg.cuda) as counter:
        trainer(cfg, [lc["BatchMarks"](counter), ModeCheck(verbose=False)]).validate(
            lc["Floor"](net, classes), loader, verbose=False)
    counted[FLOOR_MC] = counter.summary("val")

    # fit (training and validation steps) then test, on a fresh copy of the net: Lightning's floor, the mixin, and
    # the mixin with ModeCheck
    fit_runs = (("Lightning floor: least `training_step`, forward-only evaluation", "FitFloor", []),
                ("`ValidationMixin`", "TrainableMixin", []),
                ("`ValidationMixin` + `ModeCheck()`", "TrainableMixin", [ModeCheck(verbose=False)]))
    stages = (("train", "training_step"), ("val", "validation_step"), ("test", "test_step"))
    for label, kind, callbacks in fit_runs:
        module = lc[kind](lc["make_net"](), classes)
        with SyncCounter(cfg.cuda) as counter:
            t = trainer(cfg, [lc["BatchMarks"](counter), *callbacks], max_epochs=1, num_sanity_val_steps=0)
            t.fit(module, loader, loader)
            t.test(module, loader, verbose=False)
        for stage, step in stages:
            counted[f"{label}: `{step}` (fit, test)"] = counter.summary(stage)
    results.raw["syncs"] = counted

    # What is claimed to be 0, each against the floor it runs on. Left out: the bar (it reads the running values
    # at most 4 times a second: per time, not per batch), the reference loops, and torchmetrics' own input checks.
    plain_paths = (VALIDATE_LOSS, VALIDATE_ACC_NOCHECK)
    for name in plain_paths:
        results.claimed[name] = (counted[name], None)
    for name in (MIXIN, MIXIN_MC, FLOOR_MC):
        results.claimed[name] = (counted[name], counted[FLOOR])
    for label, _, _ in fit_runs[1:]:
        for _, step in stages:
            floor = counted[f"{fit_runs[0][0]}: `{step}` (fit, test)"]
            results.claimed[f"{label}: `{step}` (fit, test)"] = (counted[f"{label}: `{step}` (fit, test)"], floor)
    return counted


PLAIN_FLOOR = "bare loop: `inference_mode`, loss and correct-count sums on the device (floor)"
PLAIN_SAME = "bare loop, loss sum and the same `MulticlassAccuracy` (torchmetrics defaults) per batch"
PLAIN_USUAL = "the usual hand-written loop: `.item()` x2 per batch, tqdm postfix per batch"
VALIDATE_LOSS = "`validate(criterion=...)`, `progress=False`"
VALIDATE_ACC = "`validate(criterion=..., metrics={'acc': acc})`, `progress=False` (acc: torchmetrics defaults)"
VALIDATE_ACC_NOCHECK = "`validate(criterion=..., metrics={'acc': acc})`, `progress=False`, acc `validate_args=False`"
VALIDATE_BAR = ("`validate(criterion=..., metrics={'acc': acc})`, bar on (reads at most 4x a second), acc "
                "`validate_args=False`")
FLOOR_MC = "Lightning: forward-only step + `ModeCheck()` (its per-batch checks)"


# --------------------------------------------------------------------------------------------------------------
# 2. The MLP at batch 64 and 4096


def plain_variants(cfg: Config, model: nn.Module, batches: list[Any], criterion: nn.Module,
                   acc: Any) -> dict[str, Callable[[], float]]:
    """The loops of plain_loop.py and ``validate()``, each returning its seconds with the device drained."""
    from plain_loop import bare, usual_loop

    from lightning_validate import validate

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def go() -> float:
            cfg.sync()
            start = time.perf_counter()
            fn()
            cfg.sync()
            return time.perf_counter() - start
        return go

    return {
        PLAIN_FLOOR: timed(lambda: bare(model, batches, criterion)),
        PLAIN_SAME: timed(lambda: bare(model, batches, criterion, acc)),
        PLAIN_USUAL: timed(lambda: usual_loop(model, batches, criterion)),
        VALIDATE_ACC: timed(lambda: validate(model, batches, criterion=criterion, metrics={"acc": acc},
                                             progress=False)),
        "`validate(criterion=..., metrics={'acc': acc})`, bar on (acc: torchmetrics defaults)": timed(
            lambda: validate(model, batches, criterion=criterion, metrics={"acc": acc})),
    }


def mlp_section(cfg: Config, results: Results, syncs: dict[str, dict[str, Any]]) -> None:
    from plain_loop import CLASSES, FEATURES, make_model
    from torchmetrics.classification import MulticlassAccuracy

    lc = lightning_classes()
    results.raw.setdefault("mlp", {})
    for bs in cfg.batch_sizes:
        torch.manual_seed(0)
        batches = [(torch.randn(bs, FEATURES, device=cfg.device),
                    torch.randint(0, CLASSES, (bs,), device=cfg.device)) for _ in range(cfg.batches)]
        model = make_model().to(cfg.device)
        criterion = nn.CrossEntropyLoss()
        acc = MulticlassAccuracy(num_classes=CLASSES, average="micro").to(cfg.device)

        plain = plain_variants(cfg, model, batches, criterion, acc)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # bars: time the loop, not I/O
            times = interleaved(plain, cfg, cfg.repeats)
        for name in plain:
            validate_row = name.startswith("`validate")
            results.rows.append(Row(
                "MLP, plain PyTorch", name, bs, statistics.median(times[name]) / cfg.batches * 1e3,
                x_floor=_paired(times, name, PLAIN_FLOOR),
                x_same=_paired(times, name, PLAIN_SAME) if validate_row else None,
                syncs=syncs.get(name) if bs == cfg.batch_sizes[0] else None,
            ))
        results.raw["mlp"][f"plain_{bs}"] = times

        net = lc["make_net"]()
        variants = lightning_variants(lc, net, CLASSES)
        ltimes = time_lightning(lc, cfg, variants, loader_of(batches), cfg.repeats)
        rows = lightning_rows("MLP, Lightning", ltimes, cfg.batches, bs,
                              syncs if bs == cfg.batch_sizes[0] else {})
        results.rows += rows
        results.raw["mlp"][f"lightning_{bs}"] = ltimes
        mixin = next(r for r in rows if r.path == MIXIN)
        if bs == cfg.batch_sizes[0]:
            assert mixin.x_same is not None
            met = None if cfg.dry else mixin.x_same <= 1.10
            mixin.check = f"goal <= 1.10x same work: {'met' if met else 'not met' if met is False else 'dry run'}"
            results.goals.append(Goal(f"mixin <= 1.10x the same-work floor at batch {bs} (MLP)",
                                      f"{mixin.x_same:.2f}x", met))
    # the sync-only rows (the train and test steps, and ModeCheck on the floor)
    for name, summary in syncs.items():
        if "(fit, test)" in name or name in (FLOOR_MC, VALIDATE_LOSS, VALIDATE_ACC_NOCHECK, VALIDATE_BAR):
            results.rows.append(Row("MLP, syncs only", name, cfg.batch_sizes[0], syncs=summary))


# --------------------------------------------------------------------------------------------------------------
# 3. resnet50 and ViT-B/16


def arch_section(name: str, cfg: Config, results: Results) -> None:
    from snapshot import measure

    from lightning_validate import ModeCheck, compare, take_snapshot

    lc = lightning_classes()
    classes = 1000
    torch.manual_seed(0)
    net, source = make_arch(name, cfg, classes)
    section = f"{name}, {source}"
    results.raw.setdefault("archs", {})[name] = raw = {"source": source,
                                                      "parameters": sum(p.numel() for p in net.parameters())}
    x = torch.randn(cfg.arch_batch, 3, cfg.arch_image, cfg.arch_image, device=cfg.device)
    y = torch.randint(0, classes, (cfg.arch_batch,), device=cfg.device)

    variants = lightning_variants(lc, net, classes)
    times = time_lightning(lc, cfg, variants, loader_of([(x, y)] * cfg.arch_batches), cfg.arch_repeats)
    syncs: dict[str, dict[str, Any]] = {}
    count_loader = loader_of([(x, y)] * cfg.arch_count_batches)
    for variant in (FLOOR, MIXIN, MIXIN_MC):
        module = lc["Floor" if variant == FLOOR else "Mixin"](net, classes)
        callbacks = [ModeCheck(verbose=False)] if variant == MIXIN_MC else []
        with SyncCounter(cfg.cuda) as counter:
            trainer(cfg, [lc["BatchMarks"](counter), *callbacks]).validate(module, count_loader, verbose=False)
        syncs[variant] = counter.summary("val")
        if variant != FLOOR:
            results.claimed[f"{name}: {variant}"] = (syncs[variant], syncs[FLOOR])
    rows = lightning_rows(section, times, cfg.arch_batches, cfg.arch_batch, syncs)
    results.rows += rows
    raw["lightning"] = times
    raw["syncs"] = syncs

    # ModeCheck's per-evaluation work against one forward pass; each call ends with the device drained
    net.to(cfg.device).eval()
    before = take_snapshot(net)

    def drained(fn: Callable[[], object]) -> Callable[[], object]:
        def go() -> object:
            out = fn()
            cfg.sync()
            return out
        return go

    def forward() -> object:
        with torch.no_grad():
            return net(x)

    forward_name = f"one forward pass, batch {cfg.arch_batch}, eval, `no_grad` (floor)"
    ms = measure({
        forward_name: drained(forward),
        "ModeCheck's snapshot: `take_snapshot(model)`": drained(lambda: take_snapshot(net)),
        "ModeCheck's check of one evaluation: `take_snapshot` + `compare`": drained(
            lambda: compare(before, take_snapshot(net), phase="validation")),
    }, cfg.snapshot_rounds, cfg.snapshot_target_s)
    net.train()
    raw["snapshot_ms"] = ms
    for label, value in ms.items():
        row = Row(section, label, cfg.arch_batch if label == forward_name else None, value,
                  x_floor=value / ms[forward_name])
        if label.startswith("ModeCheck's snapshot") and name == "resnet50":
            met = None if cfg.dry else value <= ms[forward_name]
            row.check = f"goal <= one forward pass: {'met' if met else 'not met' if met is False else 'dry run'}"
            results.goals.append(Goal("ModeCheck's resnet50 snapshot within one forward pass of a batch of 64",
                                      f"{value / ms[forward_name]:.2f}x", met))
        results.rows.append(row)
    mixin = next(r for r in rows if r.path == MIXIN)
    results.goals.append(Goal(f"{name}: mixin vs the same-work floor at batch {cfg.arch_batch} (reported)",
                              f"{mixin.x_same:.2f}x", None))


# --------------------------------------------------------------------------------------------------------------
# 4. FSDP1


def fsdp_section(cfg: Config, results: Results) -> None:
    from lightning_loop import CLASSES, FEATURES

    from lightning_validate import ModeCheck

    lc = lightning_classes()
    torch.manual_seed(0)
    n = cfg.fsdp_samples
    data = torch.utils.data.TensorDataset(torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.fsdp_batch)  # a short last batch
    net = lc["make_net"]()

    # the reference: the same weights, unwrapped, per-sample losses summed in float64 over the whole data
    ref = copy.deepcopy(net).to(cfg.device).eval()
    loss_sum, correct, batch_means = 0.0, 0, []
    with torch.no_grad():
        for xb, yb in loader:
            out = ref(xb.to(cfg.device))
            yb = yb.to(cfg.device)
            loss_sum += torch.nn.functional.cross_entropy(out.double(), yb, reduction="sum").item()
            correct += int((out.argmax(1) == yb).sum().item())
            batch_means.append(torch.nn.functional.cross_entropy(out, yb).item())
    reference = {"val/loss": loss_sum / n, "val/acc": correct / n,
                 "mean of batch means (the usual loop's loss)": statistics.mean(batch_means)}

    if cfg.cuda:
        from lightning.pytorch.strategies import FSDPStrategy

        configs: list[tuple[str, Callable[[], Any]]] = [
            ("FSDP1 `strategy='fsdp'`", lambda: "fsdp"),
            ("FSDP1 `auto_wrap_policy={nn.Linear}`", lambda: FSDPStrategy(auto_wrap_policy={nn.Linear})),
        ]
    else:
        configs = [("dry run: `strategy='auto'` on the CPU (FSDP needs CUDA)", lambda: "auto")]

    raw: dict[str, Any] = {"reference": reference}
    results.raw["fsdp"] = raw

    def run(kind: str, make_strategy: Callable[[], Any], fit: bool) -> tuple[dict[str, float], list[Any]]:
        """One Trainer call on a fresh copy of the net: ``validate`` on all the data, or a short ``fit``."""
        module = lc[kind](copy.deepcopy(net), CLASSES)
        check = ModeCheck(verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ModeCheck's warnings: its findings are read below
            if fit:  # the sanity check, 4 training batches and a validation of 4 batches
                trainer(cfg, [check], strategy=make_strategy(), max_epochs=1, limit_train_batches=4,
                        limit_val_batches=4).fit(module, loader, loader)
                return {}, check.findings
            out = trainer(cfg, [check], strategy=make_strategy()).validate(module, loader, verbose=False)[0]
        return out, check.findings

    for label, make_strategy in configs:
        entry: dict[str, Any] = {}
        raw[label] = entry
        try:
            out, findings = run("TrainableMixin", make_strategy, fit=False)
            d_loss = abs(out["val/loss"] - reference["val/loss"])
            d_acc = abs(out["val/acc"] - reference["val/acc"])
            exact = d_loss <= 1e-5 * abs(reference["val/loss"]) and d_acc <= 1e-6
            entry["exact"] = {"mixin": out, "d_loss": d_loss, "d_acc": d_acc, "exact": exact,
                              "findings": [_finding(f) for f in findings]}
            naive = abs(reference["mean of batch means (the usual loop's loss)"] - reference["val/loss"])
            results.rows.append(Row(label, "mixin `val/loss`, `val/acc` vs a float64 reference over all samples",
                                    cfg.fsdp_batch, check=f"loss off by {d_loss:.1e}, acc off by {d_acc:.1e} (the "
                                    f"mean of batch means: off by {naive:.1e}): {'exact' if exact else 'NOT exact'}"))
            _, fit_findings = run("TrainableMixin", make_strategy, fit=True)
            clean = not findings and not fit_findings
            entry["clean"] = {"validate": [_finding(f) for f in findings],
                              "fit + validate": [_finding(f) for f in fit_findings]}
            results.rows.append(Row(label, "`ModeCheck()` on `fit` (with sanity check) and `validate`, clean model",
                                    cfg.fsdp_batch, check="no findings" if clean else
                                    "FINDINGS: " + ", ".join(f"{f.code} {f.module}" for f in findings + fit_findings)))
            met = None if cfg.dry else exact and clean
            results.goals.append(Goal(f"{label}: mixin exact and ModeCheck clean", f"exact={exact}, clean={clean}",
                                      met))
            for kind, code, what in (("ParamBug", "LV201", "head scaled in place in `validation_step`"),
                                     ("ModeBug", "LV101", "BatchNorm set to train mode in `validation_step`")):
                _, bug_findings = run(kind, make_strategy, fit=False)
                hits = [f for f in bug_findings if f.code == code]
                entry[kind] = [_finding(f) for f in bug_findings]
                seen = ", ".join(sorted({f"{f.code} `{f.module}`" for f in bug_findings})) or "nothing"
                results.rows.append(Row(label, f"`ModeCheck()` with a planted bug: {what}", cfg.fsdp_batch,
                                        check=f"{'caught' if hits else 'MISSED'} ({code} expected; seen: {seen})"))
        except Exception as err:  # one configuration failing must not hide the other's results
            entry["error"] = traceback.format_exc()
            results.errors[label] = f"{type(err).__name__}: {err}"
            results.rows.append(Row(label, "FSDP check", check=f"FAILED: {type(err).__name__}: {err}"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the FSDP runs' group (world size 1)


def _finding(f: Any) -> dict[str, str]:
    return {"code": f.code, "module": f.module, "phase": f.phase, "boundary": f.boundary}


# --------------------------------------------------------------------------------------------------------------
# Main


def environment(cfg: Config) -> dict[str, Any]:
    import lightning
    import torchmetrics

    models, tv = _torchvision()
    env: dict[str, Any] = {
        "dry_run": cfg.dry, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__, "torchvision": tv if models is not None else f"not usable ({tv})",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if cfg.cuda:
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def sync_goal(claimed: dict[str, tuple[dict[str, Any], dict[str, Any] | None]]) -> Goal:
    """0 syncs per batch on every claimed path, beyond what its floor (Lightning, the model) makes by itself."""
    if all(s.get("per_batch") is None for s, _ in claimed.values()):
        return Goal(SYNC_GOAL, "n/a on CPU", None)
    over: list[str] = []
    floors: list[str] = []
    for name, (s, floor) in claimed.items():
        base = 0.0 if floor is None else floor["per_batch"]
        if base:
            floors.append(f"{name}: its floor makes {base:.2f}")
        if s["per_batch"] - base > 0:
            over.append(f"{name}: {s['per_batch']:.2f} (floor {base:.2f})")
    value = "all 0" if not over else "non-zero: " + "; ".join(over)
    if floors:
        value += " [syncs that are not ours: " + "; ".join(floors) + "]"
    return Goal(SYNC_GOAL, value, not over)


SYNC_GOAL = "0 syncs per batch in every evaluation path of ours (validate(), the mixin's steps, ModeCheck)"
SECTIONS = ("syncs", "mlp", "archs", "fsdp")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every code path on the CPU, tiny sizes, syncs 'n/a on CPU' (what CI runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file (default: $OUT/gpu.json when OUT is set, else ./gpu-benchmark.json)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (to re-run one that failed)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds for the MLP (default 7)")
    args = parser.parse_args(argv)

    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(torch=torch.__version__), file=sys.stderr)
        return 2
    cfg = Config.make(args.dry_run)
    if args.repeats is not None:
        cfg.repeats = args.repeats
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu-benchmark.json"))

    sys.path.insert(0, str(_HERE))  # the variants of plain_loop.py, lightning_loop.py and snapshot.py
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: import it before quieting them)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning_validate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Lightning's advice for real data loading and its hints about tiny epochs: these loaders are in memory on
    # purpose. Everything else is still shown.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*is switching to use `NO_SHARD`.*")

    started = time.perf_counter()
    results = Results(env=environment(cfg))
    print(" | ".join(f"{k} {v}" for k, v in results.env.items()), flush=True)
    syncs: dict[str, dict[str, Any]] = {}
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        ("syncs", "syncs", lambda: syncs.update(count_syncs(cfg, results))),
        ("mlp", "mlp", lambda: mlp_section(cfg, results, syncs)),
        ("archs", "resnet50", lambda: arch_section("resnet50", cfg, results)),
        ("archs", "vit_b_16", lambda: arch_section("vit_b_16", cfg, results)),
        ("fsdp", "fsdp", lambda: fsdp_section(cfg, results)),  # last: it leaves a process group and its variables
    ]
    for section, label, step in steps:
        if section not in args.sections:
            continue
        t0 = time.perf_counter()
        try:
            step()
        except Exception:  # keep what the other sections measured: the GPU run happens once
            results.errors[label] = traceback.format_exc()
            print(f"section {label} FAILED:\n{results.errors[label]}", file=sys.stderr, flush=True)
        print(f"[{label}: {time.perf_counter() - t0:.1f} s]", flush=True)
        write_json(out, results, time.perf_counter() - started)  # so far: a run stopped by its timeout keeps it

    if results.claimed:
        results.goals.insert(0, sync_goal(results.claimed))

    table = markdown(results)
    print()
    print(table)
    print()
    for g in results.goals:
        verdict = "met" if g.met else "NOT met" if g.met is False else "not evaluated"
        print(f"- goal: {g.goal}: {g.value} ({verdict})")
    for name, summary in {**syncs, **{k: v for k, (v, _) in results.claimed.items()}}.items():
        if summary.get("per_batch"):  # where the syncs inside batch windows came from (all of them: in the JSON)
            print(f"- syncs in batch windows, {name}: {summary['sites']}")
    for section, error in results.errors.items():
        print(f"- ERROR in {section}: {error.strip().splitlines()[-1]}")
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s in all", flush=True)

    write_json(out, results, elapsed)
    print(f"wrote {out}")
    return 1 if results.errors else 0


def write_json(out: Path, results: Results, elapsed: float) -> None:
    payload = {"env": results.env, "elapsed_s": elapsed, "markdown": markdown(results),
               "rows": [asdict(r) for r in results.rows], "goals": [asdict(g) for g in results.goals],
               "errors": results.errors, "raw": results.raw}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
