"""Scenarios for ``test_fsdp2.py``, run as a standalone script: sharded strategies re-run the command per rank.

``PYTHONPATH=tests python sharded_scenarios.py OUT_DIR {fsdp2,fsdp1}`` (``tests/`` holds ``distributed_exit.py``)
runs, in one launch, each scenario as its own ``trainer.fit`` and writes ``OUT_DIR/<scenario>-<rank>.json`` per rank
(findings, error, logged values, and the logits of the whole data under the weights gathered after the run, for
references computed by the test). ``fsdp2``: ``ModelParallelStrategy`` with ``fully_shard`` on 2 CPU processes
(gloo); ``fsdp1``: ``FSDPStrategy`` on CUDA. Every rank destroys its process group before it exits.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from distributed_exit import ended_process_group
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_validate import ModeCheck, ModeCheckError, ValidationMixin

N_SAMPLES = 35  # odd: on 2 ranks the sampler repeats one sample, and cuts rank 1's last batch (4 x 4 + 2) to 1
BATCH = 4


class Net(ValidationMixin, pl.LightningModule):
    """Blocks sharded one by one; ``norm`` and ``scale`` stay in the root's group (unsharded after a forward).

    ``norm`` is a frozen BatchNorm (eval mode, no grad): FSDP does not synchronize buffers, so a BatchNorm trained
    on each rank's share would make the ranks' models differ, and the values have no single-process reference.
    """

    num_classes = 3

    def __init__(self, bug: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bug = bug
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16).requires_grad_(False).eval()
        self.head = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.criterion = nn.CrossEntropyLoss()

    def configure_model(self) -> None:
        if os.environ.get("LV_SCENARIO_STRATEGY") != "fsdp2":
            return  # FSDPStrategy wraps the model itself
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # called again by a later fit: already sharded
            return
        mesh = self.device_mesh["data_parallel"]
        for block in (self.backbone[0], self.backbone[2], self.head):
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(x))) * self.scale

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        if self.bug == "bn_train":
            self.norm.train()  # the bug: BatchNorm left in train mode during validation

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        out = super().validation_step(batch, batch_idx, dataloader_idx)
        if self.bug == "scale_head" or (self.bug == "scale_head_rank1" and self.global_rank == 1):
            with torch.no_grad():
                for p in self.head.parameters():
                    p.mul_(0.999)  # the bug: a write to the (sharded) parameters during evaluation
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SampleCount(Metric):
    """How many samples the metric was given, summed over the ranks it syncs with: each sample counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("n", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor, target: torch.Tensor) -> None:
        self.n += target.numel()

    def compute(self) -> torch.Tensor:
        return self.n


class CountingNet(Net):
    def configure_metrics(self) -> dict[str, Metric]:
        return {"acc": MulticlassAccuracy(3, average="micro"), "n": SampleCount()}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N_SAMPLES, 8, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g))


def strategy(kind: str) -> tuple[Any, str, int]:
    if kind in ("fsdp2", "tp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = (2, 1) if kind == "fsdp2" else (1, 2)  # tp2: both ranks in one tensor-parallel group, same samples
        return (ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp, process_group_backend="gloo"),
                "cpu", 2)
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy={nn.Linear}), "cuda", min(2, torch.cuda.device_count())


def full_logits(trainer: pl.Trainer, model: Net) -> list[list[float]]:
    """The logits of the whole data, from the full weights gathered from every rank's shards, in one process."""
    if os.environ.get("LV_SCENARIO_STRATEGY") == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Inside `summon_full_params` the original parameters are whole; a state dict would summon them again.
        with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
            raw = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    else:  # FSDP2's state dict holds DTensors: `full_tensor()` gathers each (a collective, on every rank)
        raw = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    state = {".".join(p for p in k.split(".") if p != "_fsdp_wrapped_module"): v.detach().cpu()
             for k, v in raw.items()}
    plain = Net()
    missing, _ = plain.load_state_dict(state, strict=False)  # the metrics' states are not part of the reference
    assert not [k for k in missing if not k.startswith("lv_metrics")], missing
    plain.eval()
    with torch.no_grad():
        return plain(data().tensors[0]).double().tolist()


def run(kind: str, out: Path, scenario: str, bug: str, check: ModeCheck, sanity: int = 0, model: Net | None = None
        ) -> None:
    strat, accelerator, devices = strategy(kind)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strat, max_epochs=1, limit_train_batches=2,
        num_sanity_val_steps=sanity, callbacks=[check], logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(out),
    )
    model = model or Net(bug)
    error = ""
    try:
        trainer.fit(model, DataLoader(data(), batch_size=BATCH), DataLoader(data(), batch_size=BATCH))
    except ModeCheckError as err:
        error = str(err)
    result: dict[str, Any] = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "error": error,
        "findings": [[f.code, f.module] for f in check.findings],
        "messages": [f.message for f in check.findings],
        "logged": {k: v.item() for k, v in trainer.callback_metrics.items()},
    }
    if not error:
        result["logits"] = full_logits(trainer, model)
        result["targets"] = data().tensors[1].tolist()
    Path(out, f"{scenario}-{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2]
    os.environ["LV_SCENARIO_STRATEGY"] = kind  # inherited by the processes the launcher starts
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's advice on workers and logging intervals
    with ended_process_group():  # each rank, also on an error: no gloo thread left for interpreter shutdown
        run_all(kind, out)


def run_all(kind: str, out: Path) -> None:
    # Each scenario is a fit of its own. The clean one runs the sanity check too; the others validate right after
    # training, when FSDP2 has just resharded every parameter (the root's stay unsharded after the validation).
    run(kind, out, "clean", "", ModeCheck(on_violation="raise", verbose=False), sanity=1)
    run(kind, out, "bn_train", "bn_train", ModeCheck(on_violation="warn", verbose=False))
    if kind == "fsdp2":  # the same model, its blocks sharded over a data-parallel mesh of size 1
        run("tp2", out, "tp2", "", ModeCheck(on_violation="raise", verbose=False), model=CountingNet())
    run(kind, out, "scale_head_rank1_warn", "scale_head_rank1", ModeCheck(on_violation="warn", verbose=False))
    run(kind, out, "scale_head", "scale_head", ModeCheck(on_violation="raise", verbose=False))
    run(kind, out, "scale_head_rank1", "scale_head_rank1", ModeCheck(on_violation="raise", verbose=False))


if __name__ == "__main__":
    main()
