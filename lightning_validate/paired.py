r"""``python -m lightning_validate.paired``: compare two checkpoints (or two saved records) on the same samples.

Two saved sample records (``SampleRecord.save``, from ``record_samples`` or ``ValidationMixin.sample_record``)::

    python -m lightning_validate.paired runs/a.pt runs/b.pt

Two checkpoints of a ``ValidationMixin`` LightningModule, each validated here (one device) on a datamodule's
validation (or test) loader, with per-sample records, then compared::

    python -m lightning_validate.paired A.ckpt B.ckpt --model examples.digits:DigitsClassifier \\
        --data examples.digits:DigitsDataModule [--stage test] [--confidence 0.95] [--replicates 1000]

Prints the table of ``PairedReport`` (B - A per value, its interval, p-values Holm-adjusted over the values);
``--json PATH`` also writes it as JSON, ``--save-records DIR`` keeps the two records.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_validate.metrics.intervals import Intervals
from lightning_validate.metrics.paired import PairedReport, compare_records
from lightning_validate.metrics.records import SampleRecord

__all__ = ["main"]


def _load_class(spec: str, what: str) -> Any:
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise SystemExit(f"Expected {what} as `package.module:Class` but got {spec!r}.")
    sys.path.insert(0, str(Path.cwd()))  # `examples.digits` from a checkout, as `python -m` would find it
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"Cannot load {what} {spec!r}: {err}") from err


def _record_of_checkpoint(path: str, model_cls: Any, data: Any, stage: str, spec: Intervals,
                          accelerator: str) -> SampleRecord:
    import lightning.pytorch as pl

    # Lightning's notices (tips, accelerators found) are not about the comparison; its warnings still show.
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about the user's model.
            warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
            return _validated(path, model_cls, data, stage, spec, accelerator, pl)
    finally:
        notices.setLevel(level)


def _validated(path: str, model_cls: Any, data: Any, stage: str, spec: Intervals, accelerator: str,
               pl: Any) -> SampleRecord:
    model = model_cls.load_from_checkpoint(path, map_location="cpu")
    if not hasattr(model, "sample_record"):
        raise SystemExit(f"Expected a ValidationMixin LightningModule but {model_cls.__name__} has no `sample_record`.")
    model.confidence = spec
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    run = trainer.validate if stage == "val" else trainer.test
    run(model, datamodule=data, verbose=False)
    record: SampleRecord = model.sample_record(stage)
    return record


def main(argv: Sequence[str] | None = None) -> PairedReport:
    """Run the command line; return the report it printed."""
    parser = argparse.ArgumentParser(prog="python -m lightning_validate.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the baseline: a checkpoint (.ckpt) or a saved sample record")
    parser.add_argument("b", help="the candidate, compared as B - A")
    parser.add_argument("--model", help="the LightningModule class of the checkpoints, `package.module:Class`")
    parser.add_argument("--data", help="the LightningDataModule class, `package.module:Class` (built with no argument)")
    parser.add_argument("--stage", choices=["val", "test"], default="val", help="which loader (default: val)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator for checkpoints (default: cpu)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--save-records", type=Path, help="keep the two records in this folder (a.pt, b.pt)")
    args = parser.parse_args(argv)
    spec = Intervals(confidence=args.confidence, replicates=args.replicates, seed=args.seed, record=True)
    checkpoints = [p.endswith(".ckpt") for p in (args.a, args.b)]
    if any(checkpoints):
        if not (args.model and args.data):
            parser.error("checkpoints need --model and --data (the LightningModule and LightningDataModule classes)")
        model_cls = _load_class(args.model, "--model")
        data = _load_class(args.data, "--data")()
        records = [_record_of_checkpoint(p, model_cls, data, args.stage, spec, args.accelerator)
                   for p in (args.a, args.b)]
    else:
        records = [SampleRecord.load(p) for p in (args.a, args.b)]
    if args.save_records is not None:
        args.save_records.mkdir(parents=True, exist_ok=True)
        for record, name in zip(records, ("a", "b"), strict=True):
            record.save(args.save_records / f"{name}.pt")
    report = compare_records(records[0], records[1], args.confidence)
    print(report)
    if args.json is not None:
        clean = {k: {f: (None if isinstance(v, float) and math.isnan(v) else v) for f, v in row.items()}
                 for k, row in report.to_dict().items()}
        args.json.write_text(json.dumps({"samples": report.samples, "confidence": report.confidence,
                                         "values": clean}, indent=2))
    return report


if __name__ == "__main__":
    main()
