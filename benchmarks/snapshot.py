"""Cost of the check engine: take_snapshot, compare, and the per-batch mode check.

Run: ``python benchmarks/snapshot.py``. Prints markdown tables (milliseconds per call, median of interleaved
rounds) for a small CNN and for a model of 1,001 submodules (250 x [Linear, BatchNorm1d, ReLU, Dropout]), and the
per-call cost of ``ModeIndex.any_in_train_mode()`` against walking ``named_modules()``.

Reference rows put the numbers in context: one forward pass of a batch of 64 in eval mode without grad, and the
fingerprint computed the straightforward way (one float64 sum per tensor plus ``torch._foreach_norm``, over
``named_parameters()`` and ``named_buffers()``), which is what the engine did before it stacked equal-shape tensors
on the CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_validate.engine import ModeIndex, compare, take_snapshot


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10),
    )
    return model, torch.randn(64, 3, 32, 32)


def thousand_modules() -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(250):
        layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers), torch.randn(64, 64)


def per_tensor_fingerprint(model: nn.Module) -> torch.Tensor:
    """The straightforward fingerprint: one reduction per tensor, norms through `_foreach_norm`."""
    with torch.no_grad():
        tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
        sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors])
        floats = [t for t in tensors if t.is_floating_point()]
        norms = torch.stack(list(torch._foreach_norm(floats, 2, dtype=torch.float64)))
        return torch.cat([sums, norms])


def measure(variants: dict[str, Callable[[], object]], rounds: int, target_s: float) -> dict[str, float]:
    """Milliseconds per call: the median over ``rounds`` interleaved rounds of enough calls for ``target_s``."""
    counts = {}
    for name, fn in variants.items():  # warm up, and size each round
        fn()
        start = time.perf_counter()
        fn()
        counts[name] = max(1, int(target_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            n = counts[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def engine_table(title: str, model: nn.Module, batch: torch.Tensor, rounds: int, target_s: float) -> str:
    model.eval()
    before = take_snapshot(model)

    def forward() -> object:
        with torch.no_grad():
            return model(batch)

    def snapshot_and_compare() -> object:
        return compare(before, take_snapshot(model), phase="validation")

    variants: dict[str, Callable[[], object]] = {
        "forward pass, batch 64 (reference)": forward,
        "per-tensor fingerprint (reference)": lambda: per_tensor_fingerprint(model),
        "`take_snapshot(model)`": lambda: take_snapshot(model),
        "`take_snapshot(model, content=False)`": lambda: take_snapshot(model, content=False),
        "`take_snapshot` + `compare` (one evaluation's check)": snapshot_and_compare,
    }
    ms = measure(variants, rounds, target_s)
    n_modules = sum(1 for _ in model.modules())
    n_tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    n_elements = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    ref = ms["forward pass, batch 64 (reference)"]
    lines = [f"**{title}**: {n_modules} submodules, {n_tensors} tensors, {n_elements:,} elements", "",
             "| variant | ms per call | ratio to one forward pass |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {value / ref:.2f} |" for name, value in ms.items()]
    return "\n".join(lines)


def mode_check_table(model: nn.Module, rounds: int, target_s: float) -> str:
    model.eval()
    index = ModeIndex(model)

    variants: dict[str, Callable[[], object]] = {
        "`any(m.training for _, m in model.named_modules())`": lambda: any(
            m.training for _, m in model.named_modules()),
        "`any(m.training for m in model.modules())`": lambda: any(m.training for m in model.modules()),
        "`ModeIndex(model)` (built once per evaluation)": lambda: ModeIndex(model),
        "`index.any_in_train_mode()` (per batch)": index.any_in_train_mode,
    }
    ms = measure(variants, rounds, target_s)
    ref = ms["`any(m.training for _, m in model.named_modules())`"]
    lines = ["**Per-batch mode check** on the 1,001-submodule model, all in eval mode (the full scan)", "",
             "| variant | ms per call | ratio to the `named_modules()` walk |", "|---|---|---|"]
    lines += [f"| {name} | {value:.4f} | {value / ref:.3f} |" for name, value in ms.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--target", type=float, default=0.05, help="seconds of calls per variant per round")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 gives stable figures on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds\n")
    cnn, cnn_batch = small_cnn()
    big, big_batch = thousand_modules()
    print(engine_table("Small CNN", cnn, cnn_batch, args.rounds, args.target), end="\n\n")
    print(engine_table("250 x [Linear(64, 64), BatchNorm1d, ReLU, Dropout]", big, big_batch, args.rounds,
                       args.target), end="\n\n")
    print(mode_check_table(big, args.rounds, args.target))


if __name__ == "__main__":
    main()
