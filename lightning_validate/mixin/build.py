"""What the mixin builds from the LightningModule's attributes: its checked settings, metric clones, an epoch.

The class attributes (``criterion``, ``num_classes``, ``on_bad_values``, ``progress_interval``, the dataloader
names) are read and checked here, together and before any loop runs, so a mistake is reported at ``setup`` with
its fix rather than at some batch. The metric clones live in ``lv_metrics`` (one per stage and dataloader);
``open_epoch`` builds a stage's ``Epoch`` with one ``Loader`` per dataloader, each with the suffix its values are
logged under.

Example:
    >>> names_of(None, "val", 2)
    ['/dataloader_idx_0', '/dataloader_idx_1']
    >>> names_of(["clean", "noisy"], "val", 2)
    ['/clean', '/noisy']
    >>> names_of(None, "train", 1)
    ['']

"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import Metric

from lightning_validate.findings import Policy
from lightning_validate.metrics.accumulators import LossAccumulator, TargetRange
from lightning_validate.metrics.checks import check_metrics
from lightning_validate.metrics.intervals import Intervals, intervals_from
from lightning_validate.metrics.loss_terms import known
from lightning_validate.metrics.padding import PaddingFilter, real_samples, sampler_layout
from lightning_validate.metrics.perplexity import PPL
from lightning_validate.metrics.uncertainty import EvaluationIntervals
from lightning_validate.mixin import messages
from lightning_validate.mixin.bars import running_bar
from lightning_validate.mixin.epoch import Epoch, Loader, data_parallel_group
from lightning_validate.mixin.run import RunState
from lightning_validate.progress import Throttle
from lightning_validate.stages import TrainerFn

__all__ = [
    "DEFAULTS",
    "Stage",
    "check_perplexity",
    "prepare",
    "container",
    "dataloader_names",
    "eval_loaders",
    "names_of",
    "num_classes_of",
    "open_epoch",
    "register",
]

#: The stages whose values the mixin logs, named by their log prefix (Lightning's ``RunningStage.dataloader_prefix``).
Stage = Literal["train", "val", "test"]

#: The stages each trainer function runs, by log prefix: their metric clones are made in ``setup``.
_SETUP_STAGES: dict[str, tuple[Stage, ...]] = {
    TrainerFn.FITTING.value: ("train", "val"), TrainerFn.VALIDATING.value: ("val",), TrainerFn.TESTING.value: ("test",)
}

#: The metric objects made by the default ``configure_metrics`` (whose input shapes the mixin checks itself).
DEFAULTS: weakref.WeakSet[Metric] = weakref.WeakSet()

def num_classes_of(model: Any) -> int | None:
    """``num_classes`` from the attribute or ``hparams``, checked; ``None`` when neither has it."""
    value = getattr(model, "num_classes", None)
    where = "attribute `num_classes`"
    if value is None:
        hparams = getattr(model, "hparams", None)
        value = hparams.get("num_classes") if isinstance(hparams, Mapping) else None
        where = "`hparams.num_classes`"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"Expected {where} to be an int >= 2 but got {value!r}.")
    return value


def prepare(model: Any, state: RunState, default_loss: bool) -> None:
    """Check the class attributes and build the metric templates, once per model."""
    if state.templates is not None:
        return
    if default_loss:
        criterion = getattr(model, "criterion", None)
        if criterion is None:
            raise TypeError(messages.MISSING_CRITERION.format(name=type(model).__name__))
        if not callable(criterion):
            raise TypeError(
                f"Expected attribute `criterion` to be callable (e.g. `nn.CrossEntropyLoss()`) but got {criterion!r}."
            )
    if Policy.parse(model.on_bad_values) is None:
        raise ValueError(
            f"Expected attribute `on_bad_values` to be 'warn' or 'raise' but got {model.on_bad_values!r}."
        )
    Throttle(model.progress_interval)  # validates the interval now, not at the first batch
    intervals_from(model.confidence, "attribute `confidence`")
    state.num_classes = num_classes_of(model)
    with torch.inference_mode(False):  # states made under inference_mode could not be updated later
        templates = check_metrics(model.configure_metrics())
    check_perplexity(model, templates)
    state.templates = templates
    state.default_in_use = any(m in DEFAULTS for m in state.templates.values())


def check_perplexity(model: Any, templates: Mapping[str, Metric]) -> None:
    """``log_perplexity``: a bool; with it, a mean loss (``exp`` of a sum is no perplexity) and no metric ``ppl``."""
    flag = model.log_perplexity
    if not isinstance(flag, bool):
        raise TypeError(f"Expected attribute `log_perplexity` to be True or False but got {flag!r}.")
    if not flag:
        return
    if getattr(getattr(model, "criterion", None), "reduction", "mean") == "sum":
        raise ValueError(messages.PERPLEXITY_OF_SUM)
    if PPL in templates:
        raise ValueError(messages.PERPLEXITY_NAME)


def dataloader_names(model: Any, stage: Stage) -> Sequence[str] | None:
    """``{stage}_dataloader_names``, checked: a list of non-empty strings, or ``None``."""
    names = {"val": model.val_dataloader_names, "test": model.test_dataloader_names}.get(stage)
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) and n for n in names)):
        raise TypeError(
            f"Expected attribute `{stage}_dataloader_names` to be a list of non-empty strings but got {names!r}."
        )
    return names


def names_of(names: Sequence[str] | None, stage: Stage, count: int) -> list[str]:
    """The log suffix of each of ``count`` dataloaders: none for one, else the user's names or Lightning's."""
    if names is not None and len(names) != count:
        raise ValueError(messages.names_error(stage, names, count))
    if count == 1:
        return [""]
    return [f"/{name}" for name in names] if names else [f"/dataloader_idx_{i}" for i in range(count)]


def container(model: Any, state: RunState, stage: Stage, index: int, register: bool = True) -> nn.ModuleDict:
    """Return the metric clones of ``stage`` and dataloader ``index``, created on first use.

    Registered under ``model.lv_metrics[f"{stage}_{index}"]`` when made in ``setup`` (so they move with the
    model). A dataloader first seen inside an evaluation epoch gets clones kept aside until the next ``setup``
    registers them: adding submodules during evaluation would change the model evaluation runs on (``ModeCheck``
    reports that as LV206); meanwhile they follow the model's device at each epoch start.
    """
    key = f"{stage}_{index}"  # flat keys: a ModuleDict cannot hold a key named "train" (nn.Module.train)
    root = model._modules.get("lv_metrics")
    if isinstance(root, nn.ModuleDict) and key in root:
        found = root[key]
        assert isinstance(found, nn.ModuleDict)
        return found
    made = state.aside.pop(key, None)
    if made is None:
        with torch.inference_mode(False):
            made = nn.ModuleDict({name: m.clone() for name, m in (state.templates or {}).items()})
    made = made.to(model.device)
    if not register:
        state.aside[key] = made
        return made
    if not isinstance(root, nn.ModuleDict):
        root = nn.ModuleDict()
        model.lv_metrics = root
    root[key] = made.train(model.training)
    return made


def register(model: Any, state: RunState, fn: str) -> None:
    """Register the metric clones of the stages ``fn`` runs, and of dataloaders first seen in an earlier run."""
    for stage in _SETUP_STAGES.get(fn, ()):
        names = dataloader_names(model, stage)
        for i in range(max(1, len(names) if names else 1)):
            container(model, state, stage, i)
    for key in list(state.aside):
        stage_name, index = key.rsplit("_", 1)
        container(model, state, stage_name, int(index))  # type: ignore[arg-type]


def eval_loaders(trainer: Any, stage: Stage) -> list[object | None]:
    """The dataloaders of the evaluation loop running now (``None`` for each one that cannot be read)."""
    if stage == "test":
        count = len(trainer.num_test_batches)
    elif trainer.sanity_checking:
        count = len(trainer.num_sanity_val_batches)
    else:
        count = len(trainer.num_val_batches)
    # The processed loaders (with the DistributedSampler Lightning injected) of the loop running now; the
    # public `trainer.val_dataloaders` prefers fit's loaders even inside a later `trainer.validate()`.
    try:
        flattened = trainer._evaluation_loop._combined_loader.flattened
    except (AttributeError, RuntimeError):
        flattened = None
    if isinstance(flattened, list) and len(flattened) == count:
        return list(flattened)
    return [None] * max(count, 1)


def _tracker(spec: Intervals, metrics: list[tuple[str, Metric]], criterion: object, reduction: str, prefix: str,
             suffix: str, loader: object, trainer: Any) -> EvaluationIntervals:
    """One dataloader's intervals; sample ``k`` of this rank is at position ``rank + k * world`` of its sampler."""
    layout = sampler_layout(loader) or (trainer.global_rank, trainer.world_size)
    return EvaluationIntervals(
        spec, metrics, criterion=criterion if known(criterion) else None,
        loss="sum" if reduction == "sum" else True, label=lambda name: f"{prefix}{name}{suffix}",
        rank=layout[0], world=layout[1],
    )


def open_epoch(model: Any, state: RunState, stage: Stage, default_loss: bool) -> Epoch:
    """A new epoch of ``stage``: one ``Loader`` per dataloader, with fresh metric states.

    The dataloader names (and, for unnamed ones, the Lightning version) are checked before any metric is reset.
    """
    trainer = model.trainer
    loaders = [None] if stage == "train" else eval_loaders(trainer, stage)
    suffixes = names_of(dataloader_names(model, stage), stage, len(loaders))
    use_metrics = stage != "train" or model.log_train_metrics
    criterion = getattr(model, "criterion", None)
    reduction = "sum" if getattr(criterion, "reduction", "mean") == "sum" else "mean"
    ignore_index = getattr(criterion, "ignore_index", None)
    # CrossEntropyLoss and NLLLoss reject class indices out of range themselves (an error on the CPU, a
    # device-side assert on CUDA): counting them too would only cost time.
    count_targets = state.num_classes is not None and not (
        default_loss and type(criterion) in (nn.CrossEntropyLoss, nn.NLLLoss)
    )
    templates = state.templates or {}
    defaults = frozenset(n for n, m in templates.items() if m in DEFAULTS) if use_metrics else frozenset()
    group = data_parallel_group(trainer.strategy)
    # Intervals for evaluations only: training values come from a model that changes from batch to batch.
    spec = intervals_from(model.confidence, "attribute `confidence`") if stage != "train" else None
    epoch = Epoch(stage, perplexity=model.log_perplexity)
    for i, (dl, suffix) in enumerate(zip(loaders, suffixes, strict=True)):
        made = container(model, state, stage, i, register=False)
        with torch.inference_mode(False):  # fresh states that a later `fit` can update in place
            for metric in made.values():
                if isinstance(metric, Metric):
                    metric.reset()
                    if group is not None and metric.process_group is None:
                        metric.process_group = group  # a tensor-parallel group sees the same samples
        metrics = [(n, m) for n, m in made.items() if isinstance(m, Metric)] if use_metrics else []
        epoch.loaders.append(
            Loader(
                stage=stage,
                loss=LossAccumulator(reduction),
                targets=(
                    TargetRange(state.num_classes, ignore_index if isinstance(ignore_index, int) else None)
                    if count_targets and state.num_classes is not None
                    else None
                ),
                padding=PaddingFilter(None if dl is None else real_samples(dl)),
                metrics=metrics,
                suffix=suffix,
                throttle=Throttle(model.progress_interval),
                defaults=defaults,
                num_classes=state.num_classes,
                intervals=None if spec is None else _tracker(spec, metrics, criterion if default_loss else None,
                                                             reduction, f"{stage}/", suffix, dl, trainer),
            )
        )
    epoch.bar = running_bar(trainer, stage)
    return epoch
