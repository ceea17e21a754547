"""``ValidationMixin``: the validation and test steps users write by hand, exact and without a sync per batch.

The documented Lightning idiom logs a torchmetrics object from every step (``self.log("val/acc", self.acc)``).
It is correct on one process but costs a Python round trip through the logger per batch, reads the loss back
to the host when it is on the progress bar, counts the samples ``DistributedSampler`` repeats under DDP, and
shows nothing on the validation bar. The mixin accumulates on the device, reads back once per epoch (and a few
times per second for the bar), drops the repeated samples, and logs ``val/loss`` and ``val/<metric>`` once.

Example:
    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class LitClassifier(ValidationMixin, pl.LightningModule):
    ...     num_classes = 3
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(4, 3)
    ...         self.criterion = nn.CrossEntropyLoss()
    ...     def forward(self, x):
    ...         return self.net(x)
    >>> data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
    ...                      enable_model_summary=False)
    >>> results = trainer.validate(LitClassifier(), DataLoader(data, batch_size=4), verbose=False)
    >>> sorted(results[0])
    ['val/acc', 'val/loss']

"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_validate.findings import Policy
from lightning_validate.metrics.accumulators import LossAccumulator, TargetRange
from lightning_validate.metrics.batches import batch_size_of, describe, unpack_example
from lightning_validate.metrics.checks import check_metrics
from lightning_validate.metrics.fast_accuracy import default_metrics
from lightning_validate.metrics.inputs import fix_code, split_inputs, update_metric
from lightning_validate.metrics.loss_terms import BatchLoss, LossTerms, batch_loss, value_terms
from lightning_validate.metrics.padding import PaddingFilter, real_samples, take_first
from lightning_validate.metrics.states import local_value
from lightning_validate.mixin.bars import RunningBar, running_bar
from lightning_validate.mixin.recovery import OpenEvaluation, give_back, modes, restored_message
from lightning_validate.progress import DEFAULT_INTERVAL, Throttle
from lightning_validate.stages import TrainerFn, hook_word, log_stage

__all__ = ["ValidationMixin"]

#: The stages whose values the mixin logs, named by their log prefix (Lightning's ``RunningStage.dataloader_prefix``).
Stage = Literal["train", "val", "test"]

# The mixin sits before LightningModule in the user's bases. Type checkers see LightningModule's attributes
# (self.log, self.trainer, ...) through this base; at run time it is a plain object, so the mixin adds nothing
# to the MRO but its own methods.
if TYPE_CHECKING:
    _Base = pl.LightningModule
else:
    _Base = object

#: The metric objects made by the default ``configure_metrics`` (whose input shapes the mixin checks itself).
_DEFAULTS: weakref.WeakSet[Metric] = weakref.WeakSet()

_SETUP_STAGES: dict[str, tuple[Stage, ...]] = {
    TrainerFn.FITTING.value: ("train", "val"), TrainerFn.VALIDATING.value: ("val",), TrainerFn.TESTING.value: ("test",)
}


def _hook(stage: str) -> str:
    """The word of ``stage``'s hooks: ``"val"`` -> ``"validation"``."""
    running = log_stage(stage)
    return hook_word(running) if running is not None else stage


@dataclass
class _Loader:
    """Per-dataloader accumulators of one epoch."""

    loss: LossAccumulator
    targets: TargetRange | None
    padding: PaddingFilter
    metrics: list[tuple[str, Metric]]
    suffix: str
    throttle: Throttle
    unchecked: bool = True  # the default metric's shape contract is checked on the first batch


@dataclass
class _Epoch:
    """One open epoch of one stage."""

    loaders: list[_Loader]
    bar: RunningBar | None = None  # the TQDM or Rich bar showing running values
    check_default: bool = False


@dataclass
class _State:
    """The mixin's run-time state, kept in one plain attribute (not a submodule)."""

    templates: dict[str, Metric] | None = None
    aside: dict[str, nn.ModuleDict] = field(default_factory=dict)  # clones not registered yet (see _lv_container)
    num_classes: int | None = None
    default_in_use: bool = False
    epochs: dict[str, _Epoch] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=dict)
    # Crash recovery (see recovery.py): a run is open from `setup` to `teardown`, which Lightning skips when a run
    # raises; the last evaluation's modes; the stages already warned about in this run.
    running: bool = False
    evaluation: OpenEvaluation | None = None
    warned: set[str] = field(default_factory=set)
    # The training values of the epoch a checkpoint was written in before that epoch closed (at validation end).
    resumed: dict[str, float] | None = None


class ValidationMixin(_Base):
    """Exact, sync-free validation and test steps: ``class LitModel(ValidationMixin, pl.LightningModule)``.

    Contract. You write ``forward(inputs)`` and set ``self.criterion`` (or override ``compute_loss(outputs,
    target)``); optionally ``configure_metrics()`` (default: micro accuracy when ``num_classes`` is an attribute
    or in ``hparams``), ``unpack_batch(batch) -> (inputs, target)`` (default: a 2-tuple or 2-list) and
    ``metric_inputs(outputs, target)``, what the metrics take (default: ``(outputs, target)``; a dict gives each
    metric its own, e.g. one per head). The mixin supplies ``validation_step``, ``test_step``, a default
    ``training_step``, ``setup``, ``teardown``, the ``on_{train,validation,test}_epoch_{start,end}`` hooks,
    ``on_{validation,test,predict}_model_eval`` and ``on_{save,load}_checkpoint``. A method you define wins (your
    class comes first in the MRO). If you override a step, call
    ``return self.update_metrics("val", self(x), y, dataloader_idx)`` in it to keep the epoch metrics; if you
    override any of the hooks, call ``super()`` in it.

    What is logged, once per epoch: ``val/loss`` and ``val/<name>`` (``test/...``); with several dataloaders
    ``val/<name>/dataloader_idx_<i>`` (Lightning's convention) or ``val/<name>/<your name>`` from
    ``val_dataloader_names``. Training logs ``train/loss`` per step and, per epoch, ``train/loss_epoch`` and
    ``train/<name>``. The loss is the criterion applied once to the whole stage's data (``criterion(cat(outputs),
    cat(targets))``): exact for every ``torch.nn`` loss, also ``CrossEntropyLoss(weight=..., ignore_index=...)``;
    for your own ``compute_loss`` see its docstring. Under DDP the samples ``DistributedSampler`` repeats to pad
    the ranks are not counted. ``metrics_history`` keeps one record per training epoch of ``fit``
    (``{"epoch": 0, "train/loss": ..., "val/acc": ...}``), without the sanity check and without
    ``trainer.validate()``/``trainer.test()`` runs (those return their values); it is saved in checkpoints and
    restored from them, so a resumed run keeps the earlier epochs. The metric clones are registered as
    ``self.lv_metrics["val_0"]["acc"]`` (stage and dataloader index), created in ``setup``.

    After an exception. A run that raises leaves an unfinished epoch and, if it raised during an evaluation, the
    model in eval mode (Lightning gives the modes back only when an evaluation ends normally). The next run on the
    same model object drops the unfinished epoch, and gives each submodule back the mode it had before that
    evaluation if the model is still exactly as ``.eval()`` left it, with one warning saying so. Between the two
    runs the model stays in eval mode (``ModeCheck`` gives it back when the exception happens).

    Under DDP, FSDP and ``ModelParallelStrategy``, each rank counts only the samples its ``DistributedSampler`` does
    not repeat (the sampler Lightning injects, or your own); with any other sampler nothing is removed. With tensor
    parallelism the values are summed over the data-parallel replicas only. The running values on the bar are rank 0's
    own; the logged values cover all ranks. ``drop_last=True`` drops samples here as on one process.

    Class attributes you may set:
        on_bad_values: ``"warn"`` (default) or ``"raise"`` when an epoch had non-finite losses or targets
            outside ``[0, num_classes)`` (counted on the device, reported once per epoch).
        progress_interval: seconds between refreshes of the running values on Lightning's validation and test
            bars, TQDM or Rich (0.25). Each refresh reads the running values back from the device once.
        val_dataloader_names, test_dataloader_names: one name per dataloader, used instead of
            ``dataloader_idx_<i>``.
        log_train_metrics: update the metrics in the default ``training_step`` too (``True``).
    """

    on_bad_values: Literal["warn", "raise"] = "warn"
    progress_interval: float = DEFAULT_INTERVAL
    val_dataloader_names: Sequence[str] | None = None
    test_dataloader_names: Sequence[str] | None = None
    log_train_metrics: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(ValidationMixin):
            raise TypeError(
                f"`{cls.__name__}` lists `LightningModule` before `ValidationMixin`, so Lightning's empty steps "
                f"would hide the mixin's. Put the mixin first: `class {cls.__name__}(ValidationMixin, "
                "pl.LightningModule)`."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Hooks for the user

    def configure_metrics(self) -> Mapping[str, Metric] | Any:
        """Return the metrics for every stage: a dict ``{name: Metric}`` or a ``MetricCollection``.

        Called once; each stage (train, val, test) and each dataloader gets its own clone. Every metric must
        compute a scalar. Default: ``{"acc": MulticlassAccuracy(num_classes, average="micro")}`` when
        ``num_classes`` is known, else no metric (the loss is always logged).
        """
        metrics = default_metrics(self._lv_num_classes())
        _DEFAULTS.update(metrics.values())  # so that shapes are checked for them, also via super()
        return metrics

    def compute_loss(self, outputs: Any, target: Any) -> Tensor | LossTerms:
        """Return the loss of a batch. Default: ``self.criterion(outputs, target)``.

        With the default, a ``torch.nn`` loss module is exact as it is (the mixin reads its numerator and
        denominator, ``docs/losses.md``). An override is exact when it returns one value per sample (or per
        element; each counts once), or ``LossTerms(sum, weight)`` for a weighted mean. A 0-dim batch mean is
        weighted by the batch size: exact only when it is a mean over samples.
        """
        criterion = getattr(self, "criterion", None)
        if criterion is None:
            raise TypeError(_MISSING_CRITERION.format(name=type(self).__name__))
        loss: Tensor = criterion(outputs, target)
        return loss

    def unpack_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(inputs, target)``. Default: a tuple or list of two."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(_unpack_error(batch))

    def metric_inputs(self, outputs: Any, target: Any) -> Sequence[Any] | Mapping[str, Sequence[Any]]:
        """Return what the metrics take from a batch's ``outputs`` and ``target``; used in every stage.

        Default: ``(outputs, target)``, handed to every metric's ``update``. Override it when the model's outputs
        are not what a metric takes (the loss still gets them unchanged, through ``compute_loss``):

        - a tuple gives every metric the same arguments: ``return outputs[0], target[0]`` for a forward that
          returns ``(logits, aux)`` and a target ``(y, weight)``;
        - a dict from metric name (as in ``configure_metrics()``) to that metric's arguments gives each its own,
          one metric per head of a multi-head model: ``return {"acc_a": (outputs["a"], target["a"]),
          "acc_b": (outputs["b"], target["b"])}``.

        It runs on the device tensors of the batch; anything that reads a value back to the host (``.item()``,
        ``.cpu()``) would cost a synchronization per batch.
        """
        return outputs, target

    # ----------------------------------------------------------------------------------------------------------
    # Steps

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, loss, metrics; log ``train/loss`` per step (not on the bar: that would read it back per step)."""
        inputs, target = self.unpack_batch(batch)
        outputs = self(inputs)
        loss = self.update_metrics("train", outputs, target)
        assert loss is not None  # training batches are never cut: only evaluation removes DDP padding
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size_of(target))
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        """Forward, loss and metrics of one validation batch; returns its loss."""
        inputs, target = self.unpack_batch(batch)
        return self.update_metrics("val", self(inputs), target, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        """Forward, loss and metrics of one test batch; returns its loss."""
        inputs, target = self.unpack_batch(batch)
        return self.update_metrics("test", self(inputs), target, dataloader_idx)

    def update_metrics(self, stage: Stage, outputs: Any, target: Any, dataloader_idx: int = 0) -> Tensor | None:
        """Count one batch in ``stage``'s epoch values; return its loss (``None`` if it was all DDP padding).

        Call it from your own step to keep the mixin's epoch metrics. No host-device sync: the loss and the
        metrics accumulate on the device; the bar reads them back only when ``progress_interval`` has passed.
        """
        epoch = self._lv.epochs.get(stage)
        if epoch is None or dataloader_idx >= len(epoch.loaders):
            raise RuntimeError(_outside_epoch(stage, dataloader_idx, epoch is not None))
        loader = epoch.loaders[dataloader_idx]
        n = batch_size_of(target)
        if n is None:
            n = batch_size_of(outputs)
            if n is None:
                raise TypeError(f"Cannot tell the batch size: `target` is {describe(target)}. {_UNPACK_HINT}")
        keep = loader.padding.keep(n)
        if keep < n:  # only a rank's last batch can hold DDP padding; cut it with plain ints, no mask
            if keep == 0:
                return None
            outputs, target = take_first(outputs, n, keep), take_first(target, n, keep)
        if isinstance(outputs, Tensor) and isinstance(target, Tensor) and outputs.shape[:1] != target.shape[:1]:
            raise ValueError(_shape_error(outputs, target))
        inputs = self._lv_metric_inputs(loader, outputs, target)
        if epoch.check_default and loader.unchecked:
            self._lv_check_default(loader, inputs, outputs, target)
            loader.unchecked = False
        batch = self._lv_loss(outputs, target, keep, loader.loss.reduction == "sum")
        loader.loss.add(batch)
        if loader.targets is not None and isinstance(target, Tensor):
            loader.targets.update(target)
        for (name, metric), args in zip(loader.metrics, inputs, strict=True):
            update_metric(metric, args, key=f"{stage}/{name}{loader.suffix}", outputs=outputs, target=target,
                          fix=_hook_fix)
        if epoch.bar is not None and loader.throttle.due():
            _show_running(epoch.bar, loader)
        return batch.step_loss

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, stage: str) -> None:
        """Build the metrics before any loop runs, so they move with the model and exist before evaluation.

        Also clean up after an earlier run on this model that raised: its unfinished epochs are dropped, and the
        modes Lightning did not put back are given back (see ``_lv_recover``).
        """
        super().setup(stage)
        self._lv_recover()
        self._lv_configure()
        stages: tuple[Stage, ...] = _SETUP_STAGES.get(stage, ())
        for s in stages:
            names = self._lv_names(s)
            for i in range(max(1, len(names) if names else 1)):
                self._lv_container(s, i)
        for key in list(self._lv.aside):  # dataloaders first seen in an earlier run
            stage_name, index = key.rsplit("_", 1)
            self._lv_container(stage_name, int(index))  # type: ignore[arg-type]

    @override
    def teardown(self, stage: str) -> None:
        """Close the run: Lightning calls this only when the run ended normally."""
        super().teardown(stage)
        state = self._lv
        for name in list(state.epochs):
            if name not in state.warned:
                rank_zero_warn(_never_logged(name, "last"), category=UserWarning)
        state.epochs.clear()
        state.pending.clear()
        state.evaluation = None
        state.running = False

    @override
    def on_validation_model_eval(self) -> None:
        """Record each submodule's mode around Lightning's ``.eval()``, to give it back if validation raises."""
        self._lv_evaluation("validation", super().on_validation_model_eval)

    @override
    def on_test_model_eval(self) -> None:
        """Record each submodule's mode around Lightning's ``.eval()``, to give it back if testing raises."""
        self._lv_evaluation("test", super().on_test_model_eval)

    @override
    def on_predict_model_eval(self) -> None:
        """Record each submodule's mode around Lightning's ``.eval()``, to give it back if prediction raises."""
        self._lv_evaluation("predict", super().on_predict_model_eval)

    @override
    def on_train_epoch_start(self) -> None:
        """Reset the training accumulators."""
        super().on_train_epoch_start()
        self._lv_begin("train")

    @override
    def on_train_epoch_end(self) -> None:
        """Log ``train/loss_epoch`` and ``train/<name>``; append this epoch's record to ``metrics_history``."""
        super().on_train_epoch_end()
        values = self._lv_end("train")
        resumed, self._lv.resumed = self._lv.resumed, None
        if not values and resumed is not None and resumed["epoch"] == self.trainer.current_epoch:
            # Resumed from a checkpoint written at this epoch's validation end: its batches ran before the resume.
            values = {k: v for k, v in resumed.items() if k != "epoch"}
        record: dict[str, float] = {"epoch": float(self.trainer.current_epoch)}
        record.update(values)
        record.update(self._lv.pending)
        self._lv.pending.clear()
        if len(record) > 1:
            self._lv.history.append(record)

    @override
    def on_validation_epoch_start(self) -> None:
        """Reset the validation accumulators."""
        super().on_validation_epoch_start()
        self._lv_begin("val")

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss`` and ``val/<name>`` for each dataloader."""
        super().on_validation_epoch_end()
        values = self._lv_end("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._lv.pending.update(values)

    @override
    def on_test_epoch_start(self) -> None:
        """Reset the test accumulators."""
        super().on_test_epoch_start()
        self._lv_begin("test")

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test/loss`` and ``test/<name>`` for each dataloader."""
        super().on_test_epoch_end()
        self._lv_end("test")

    @property
    def metrics_history(self) -> list[dict[str, float]]:
        """One record per ``fit`` epoch: ``{"epoch": 0.0, "train/loss": ..., "train/acc": ..., "val/loss": ...}``.

        ``train/loss`` here is the epoch mean. With several validations per epoch, the last one is kept.
        Under ``strategy="ddp_spawn"`` the records stay in the worker processes (only weights come back).
        The history is saved in checkpoints and restored from them, so a run resumed with ``ckpt_path`` (or a
        model made by ``load_from_checkpoint``) keeps the records of the epochs before the checkpoint.
        """
        return self._lv.history

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save ``metrics_history`` (and the values of an epoch not closed yet) under ``"lightning_validate"``."""
        super().on_save_checkpoint(checkpoint)
        state = self._lv
        checkpoint[_CHECKPOINT_KEY] = {
            "metrics_history": [dict(record) for record in state.history],
            "pending": dict(state.pending),
            "open_epoch": self._lv_finished_train_epoch(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore ``metrics_history``; a checkpoint written without it (before 0.2) leaves the history empty."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if not isinstance(saved, Mapping):
            return
        state = self._lv
        state.history = [dict(record) for record in saved.get("metrics_history", [])]
        state.pending = dict(saved.get("pending", {}))
        open_epoch = saved.get("open_epoch")
        state.resumed = dict(open_epoch) if open_epoch else None

    # ----------------------------------------------------------------------------------------------------------
    # Internals

    @property
    def _lv(self) -> _State:
        state = self.__dict__.get("_lv_state")
        if state is None:
            state = _State()
            self.__dict__["_lv_state"] = state
        return state

    def _lv_finished_train_epoch(self) -> dict[str, float] | None:
        """The values of a training epoch whose batches have all run but that has not closed yet, else ``None``.

        A checkpoint written at the end-of-epoch validation (``ModelCheckpoint`` saves there unless it saves at
        the training epoch's end) comes before ``on_train_epoch_end``; a run resumed from it does not run that
        epoch's batches again, so their values travel in the checkpoint. Under DDP this reduces across processes,
        as Lightning runs ``on_save_checkpoint`` on every process. Nothing is logged and no state is reset.
        """
        epoch = self._lv.epochs.get("train")
        if epoch is None:  # no training epoch open (also: no trainer attached)
            return None
        trainer = self.trainer
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # a checkpoint inside the epoch
            return None
        device = self.device
        values: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        for ld in epoch.loaders:
            sums = ld.loss.summary(device).to(device)
            if trainer.world_size > 1:
                sums = trainer.strategy.reduce(sums, reduce_op="sum")
            total, count = sums[:2].tolist()
            if count == 0:
                continue
            values[f"train/loss{ld.suffix}"] = total / count
            for name, metric in ld.metrics:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    values[f"train/{name}{ld.suffix}"] = float(metric.compute())
        return values

    def _lv_recover(self) -> None:
        """Start a run clean, also after an earlier run on this model raised (Lightning then skips ``teardown``).

        The earlier run's unfinished epochs and pending values are dropped: they belong to no finished epoch and
        their bar is gone. If it raised during an evaluation, the model is still in the modes ``.eval()`` set
        (Lightning puts modes back only when an evaluation ends normally): they are given back, with one warning.
        """
        state = self._lv
        if state.running:
            state.epochs.clear()
            state.pending.clear()
            opened = state.evaluation
            if opened is not None:
                changed = give_back(self, opened)
                if changed:
                    message = restored_message(opened, changed, list(modes(self)), hide="lv_metrics")
                    rank_zero_warn(message, category=UserWarning)
        state.evaluation = None
        state.warned.clear()
        state.running = True

    def _lv_evaluation(self, hook: str, make_eval: Callable[[], None]) -> None:
        """Record the modes before and after ``make_eval`` (Lightning's ``.eval()``), for ``_lv_recover``."""
        fn = self.trainer.state.fn
        opened = OpenEvaluation(fn.value if fn is not None else "fit", hook, before=modes(self))
        self._lv.evaluation = opened
        make_eval()
        opened.after = modes(self)

    def _lv_num_classes(self) -> int | None:
        value = getattr(self, "num_classes", None)
        where = "attribute `num_classes`"
        if value is None:
            hparams = getattr(self, "hparams", None)
            value = hparams.get("num_classes") if isinstance(hparams, Mapping) else None
            where = "`hparams.num_classes`"
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"Expected {where} to be an int >= 2 but got {value!r}.")
        return value

    def _lv_configure(self) -> None:
        state = self._lv
        if state.templates is not None:
            return
        if type(self).compute_loss is ValidationMixin.compute_loss:
            criterion = getattr(self, "criterion", None)
            if criterion is None:
                raise TypeError(_MISSING_CRITERION.format(name=type(self).__name__))
            if not callable(criterion):
                raise TypeError(
                    f"Expected attribute `criterion` to be callable (e.g. `nn.CrossEntropyLoss()`) but got "
                    f"{criterion!r}."
                )
        if Policy.parse(self.on_bad_values) is None:
            raise ValueError(
                f"Expected attribute `on_bad_values` to be 'warn' or 'raise' but got {self.on_bad_values!r}."
            )
        Throttle(self.progress_interval)  # validates the interval now, not at the first batch
        state.num_classes = self._lv_num_classes()
        with torch.inference_mode(False):  # states made under inference_mode could not be updated later
            state.templates = check_metrics(self.configure_metrics())
        state.default_in_use = any(m in _DEFAULTS for m in state.templates.values())

    def _lv_names(self, stage: Stage) -> Sequence[str] | None:
        names = {"val": self.val_dataloader_names, "test": self.test_dataloader_names}.get(stage)
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) and n for n in names)):
            raise TypeError(
                f"Expected attribute `{stage}_dataloader_names` to be a list of non-empty strings but got {names!r}."
            )
        return names

    def _lv_container(self, stage: Stage, index: int, register: bool = True) -> nn.ModuleDict:
        """Return the metric clones of ``stage`` and dataloader ``index``, created on first use.

        Registered under ``self.lv_metrics[f"{stage}_{index}"]`` when made in ``setup`` (so they move with the
        model). A dataloader first seen inside an evaluation epoch gets clones kept aside until the next
        ``setup`` registers them: adding submodules during evaluation would change the model evaluation runs on
        (``ModeCheck`` reports that as LV206); meanwhile they follow the model's device at each epoch start.
        """
        key = f"{stage}_{index}"  # flat keys: a ModuleDict cannot hold a key named "train" (nn.Module.train)
        root = self._modules.get("lv_metrics")
        if isinstance(root, nn.ModuleDict) and key in root:
            found = root[key]
            assert isinstance(found, nn.ModuleDict)
            return found
        state = self._lv
        container = state.aside.pop(key, None)
        if container is None:
            with torch.inference_mode(False):
                container = nn.ModuleDict({name: m.clone() for name, m in (state.templates or {}).items()})
        container = container.to(self.device)
        if not register:
            state.aside[key] = container
            return container
        if not isinstance(root, nn.ModuleDict):
            root = nn.ModuleDict()
            self.lv_metrics = root
        root[key] = container.train(self.training)
        return container

    def _lv_eval_loaders(self, stage: Stage) -> list[object | None]:
        trainer = self.trainer
        if stage == "test":
            count = len(trainer.num_test_batches)
        elif trainer.sanity_checking:
            count = len(trainer.num_sanity_val_batches)
        else:
            count = len(trainer.num_val_batches)
        # The processed loaders (with the DistributedSampler Lightning injected) of the loop running now; the
        # public `trainer.val_dataloaders` prefers fit's loaders even inside a later `trainer.validate()`.
        try:
            flattened = trainer._evaluation_loop._combined_loader.flattened  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):
            flattened = None
        if isinstance(flattened, list) and len(flattened) == count:
            return list(flattened)
        return [None] * max(count, 1)

    def _lv_begin(self, stage: Stage) -> None:
        state = self._lv
        self._lv_configure()
        if stage in state.epochs and stage not in state.warned:
            state.warned.add(stage)
            rank_zero_warn(_never_logged(stage, "previous"), category=UserWarning)
        loaders = [None] if stage == "train" else self._lv_eval_loaders(stage)
        names = self._lv_names(stage)
        if names is not None and len(names) != len(loaders):
            raise ValueError(
                f"Expected attribute `{stage}_dataloader_names` to name each of the {len(loaders)} {stage} dataloaders "
                f"but got {len(names)} names: {list(names)!r}."
            )
        use_metrics = stage != "train" or self.log_train_metrics
        criterion = getattr(self, "criterion", None)
        reduction = "sum" if getattr(criterion, "reduction", "mean") == "sum" else "mean"
        ignore_index = getattr(criterion, "ignore_index", None)
        # CrossEntropyLoss and NLLLoss reject class indices out of range themselves (an error on the CPU, a
        # device-side assert on CUDA): counting them too would only cost time.
        count_targets = state.num_classes is not None and not (
            type(self).compute_loss is ValidationMixin.compute_loss
            and type(criterion) in (nn.CrossEntropyLoss, nn.NLLLoss)
        )
        epoch = _Epoch(loaders=[], check_default=state.default_in_use and use_metrics)
        group = _data_parallel_group(self.trainer.strategy)
        for i, dl in enumerate(loaders):
            container = self._lv_container(stage, i, register=False)
            with torch.inference_mode(False):  # fresh states that a later `fit` can update in place
                for metric in container.values():
                    if isinstance(metric, Metric):
                        metric.reset()
                        if group is not None and metric.process_group is None:
                            metric.process_group = group  # a tensor-parallel group sees the same samples
            suffix = "" if len(loaders) == 1 else f"/{names[i]}" if names else f"/dataloader_idx_{i}"
            epoch.loaders.append(
                _Loader(
                    loss=LossAccumulator(reduction),
                    targets=(
                        TargetRange(state.num_classes, ignore_index if isinstance(ignore_index, int) else None)
                        if count_targets and state.num_classes is not None
                        else None
                    ),
                    padding=PaddingFilter(None if dl is None else real_samples(dl)),
                    metrics=[(n, m) for n, m in container.items() if isinstance(m, Metric)] if use_metrics else [],
                    suffix=suffix,
                    throttle=Throttle(self.progress_interval),
                )
            )
        epoch.bar = running_bar(self.trainer, stage)
        state.epochs[stage] = epoch

    def _lv_end(self, stage: Stage) -> dict[str, float]:
        """Reduce across processes, report bad values, log; return the values for the history."""
        state = self._lv
        epoch = state.epochs.pop(stage, None)
        if epoch is None:  # the start hook never reached the mixin; update_metrics said so already
            return {}
        trainer = self.trainer
        device = self.device
        loaders = epoch.loaders
        sums = torch.stack(
            [
                torch.cat([ld.loss.summary(device).to(device), _bad_targets(ld, device)])
                for ld in loaders
            ]
        )
        extremes = torch.stack([_target_extremes(ld, device) for ld in loaders])
        if trainer.world_size > 1:
            # Sums of sums and counts: exact. One collective for all dataloaders, plus one for the extremes. Over
            # the data-parallel replicas only: the ranks of one tensor-parallel group saw the same samples.
            group = _data_parallel_group(trainer.strategy)
            sums = trainer.strategy.reduce(sums, group=group, reduce_op="sum")
            extremes = trainer.strategy.reduce(extremes, group=group, reduce_op="max")
        rows = sums.tolist()
        ext = extremes.tolist()
        problems: list[str] = []
        values: dict[str, float] = {}
        keys: list[str] = []  # metric keys, read back together below
        tensors: list[Tensor] = []
        for ld, (total, weight, nonfinite, batches, bad), (neg_lo, hi) in zip(loaders, rows, ext, strict=True):
            if batches == 0:  # nothing counted (a custom step that did not call update_metrics): nothing to log
                continue
            loss_key = f"{stage}/loss{ld.suffix}"
            values[loss_key] = loss = ld.loss.value(total, weight)
            if nonfinite:
                problems.append(
                    f"{int(nonfinite)} of {int(batches)} {stage} batches gave a non-finite loss (nan or inf), so "
                    f"`{loss_key}` is {loss}. Check the inputs and `compute_loss`"
                )
            elif weight == 0 and ld.loss.reduction == "mean":
                problems.append(
                    f"`{loss_key}` is nan: the loss's weight summed to 0 over the {int(batches)} {stage} batches "
                    "(every target was `ignore_index`, or every class weight 0)"
                )
            if bad:
                problems.append(
                    f"{int(bad)} of {int(batches)} {stage} batches{_on(ld.suffix)} had targets outside "
                    f"[0, {state.num_classes}) (smallest {int(-neg_lo)}, largest {int(hi)}); they count as wrong "
                    "predictions. Check `num_classes` and the labels"
                )
            for name, metric in ld.metrics:
                key = f"{stage}/{name}{ld.suffix}"
                with warnings.catch_warnings():
                    # A rank whose share was all padding has no update; the synced value still covers all ranks.
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    value = metric.compute()
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(_not_scalar(key, metric, value))
                keys.append(key)
                tensors.append(value.detach().reshape(()).to(device=device, dtype=torch.float64))
        if problems:
            message = "; ".join(problems) + "."
            policy = Policy.parse(self.on_bad_values)
            assert policy is not None  # checked when the metrics were configured
            policy.apply(message, error=ValueError, warn=lambda text: rank_zero_warn(
                text + " Set `on_bad_values = 'raise'` to stop instead.", category=UserWarning))
        if tensors:
            values.update(zip(keys, torch.stack(tensors).tolist(), strict=True))
        with torch.inference_mode(False):
            for ld in loaders:  # free list states (e.g. AUROC's scores) until the next epoch
                for _, metric in ld.metrics:
                    metric.reset()
        if epoch.bar is not None and loaders:  # the bar ends on the last dataloader's exact epoch values
            last = loaders[-1]
            prefix = f"{stage}/"
            final = {
                k[len(prefix) : len(k) - len(last.suffix)]: v
                for k, v in values.items()
                if k.startswith(prefix) and k.endswith(last.suffix)
            }
            epoch.bar.finish(final)
        epoch.bar = None
        distributed = trainer.world_size > 1
        for key, value in values.items():
            log_key = f"{key}_epoch" if stage == "train" and key.startswith("train/loss") else key
            # The values are already global and equal on every rank. Lightning asks for sync_dist on epoch-level
            # values under DDP; the max of equal values is the value itself (a mean would divide and round).
            self.log(
                log_key,
                value,
                prog_bar=stage == "val",
                sync_dist=distributed,
                reduce_fx="max",
                add_dataloader_idx=False,  # the suffix is ours: dataloader_idx_<i> or the user's name
            )
        return values

    def _lv_loss(self, outputs: Any, target: Any, n: int, is_sum: bool) -> BatchLoss:
        """The batch's loss and its weight: exact terms for a torch criterion, else what ``compute_loss`` returns."""
        # The default compute_loss (not overridden in the class or on the instance) calls the criterion: see into it.
        default = getattr(self.compute_loss, "__func__", None) is ValidationMixin.compute_loss
        try:
            batch = batch_loss(getattr(self, "criterion", None), outputs, target) if default else None
            loss = self.compute_loss(outputs, target) if batch is None else None
        except (RuntimeError, ValueError, IndexError) as err:
            if not default:
                raise
            hint = (
                " If the target has a trailing dimension of 1, return `x, y.squeeze(1)` from `unpack_batch`."
                if isinstance(target, Tensor) and target.ndim >= 2 and target.shape[-1] == 1
                else ""
            )
            raise type(err)(
                f"`criterion` ({getattr(self, 'criterion', None)!r}) failed on outputs {describe(outputs)} and "
                f"target {describe(target)}: {err}.{hint}"
            ) from err
        return batch if batch is not None else value_terms(loss, n, is_sum=is_sum, what="`compute_loss`")

    def _lv_metric_inputs(self, loader: _Loader, outputs: Any, target: Any) -> list[tuple[Any, ...]]:
        """The ``update`` arguments of each of ``loader``'s metrics, from ``metric_inputs``."""
        if not loader.metrics:
            return []
        if type(self).metric_inputs is ValidationMixin.metric_inputs:  # the default: no call, no checks per batch
            return [(outputs, target)] * len(loader.metrics)
        return split_inputs(
            self.metric_inputs(outputs, target), [name for name, _ in loader.metrics], hook="`metric_inputs`"
        )

    def _lv_check_default(self, loader: _Loader, inputs: list[tuple[Any, ...]], outputs: Any, target: Any) -> None:
        """Check the default accuracy's inputs (once per epoch): the shapes it takes, or the fix as code."""
        templates = self._lv.templates or {}
        for (name, _), args in zip(loader.metrics, inputs, strict=True):
            if templates.get(name) in _DEFAULTS and len(args) == 2:
                self._lv_check_default_inputs(args[0], args[1], outputs, target)

    def _lv_check_default_inputs(self, preds: Any, labels: Any, outputs: Any, target: Any) -> None:
        num_classes = self._lv.num_classes
        if (
            isinstance(preds, Tensor)
            and isinstance(labels, Tensor)
            and preds.ndim >= 2
            and preds.shape[1] == num_classes
            and labels.shape == preds.shape[:1] + preds.shape[2:]
            and not labels.is_floating_point()
        ):
            return
        if not (isinstance(preds, Tensor) and isinstance(labels, Tensor)):
            hint = f"to hand it the tensors inside them, {fix_code(outputs, target, _hook_fix)}"
        elif labels.ndim >= 2 and labels.shape[-1] == 1:
            hint = "return `x, y.squeeze(1)` from `unpack_batch`."
        else:
            hint = "for another task return your own metrics from `configure_metrics()`."
        raise ValueError(
            f"The default metric `MulticlassAccuracy(num_classes={num_classes})` expects outputs of shape "
            f"(N, {num_classes}, ...) (class scores in dimension 1) and integer targets of shape (N, ...), but got "
            f"outputs {describe(preds)} and target {describe(labels)}: {hint}"
        )


# --------------------------------------------------------------------------------------------------------------
# Helpers and messages

#: The checkpoint key under which the mixin keeps ``metrics_history``.
_CHECKPOINT_KEY = "lightning_validate"

_MISSING_CRITERION = (
    "`{name}` has no loss: set `self.criterion = nn.CrossEntropyLoss()` in `__init__`, or override "
    "`def compute_loss(self, outputs, target): return F.cross_entropy(outputs, target)`."
)

_UNPACK_HINT = "Override `unpack_batch(self, batch)` to return `(inputs, target)`."


def _unpack_error(batch: object) -> str:
    inputs, target = unpack_example(batch)
    return (
        f"`ValidationMixin.unpack_batch` expects a batch `(inputs, target)` (a tuple or list of 2) but got "
        f"{describe(batch)}. Override it in your LightningModule:\n\n"
        f"    def unpack_batch(self, batch):\n        return {inputs}, {target}\n"
    )


def _shape_error(outputs: Tensor, target: Tensor) -> str:
    return (
        f"Expected `outputs` and `target` to have the same batch size (first dimension) but got outputs "
        f"{describe(outputs)} and target {describe(target)}. Check `forward` and `unpack_batch`."
    )


def _hook_fix(outputs: str, target: str) -> str:
    return (
        "override `metric_inputs` in your LightningModule (a dict from metric name to its inputs gives each metric its "
        f"own):\n\n    def metric_inputs(self, outputs, target):\n        return {outputs}, {target}\n"
    )


def _not_scalar(key: str, metric: Metric, value: object) -> str:
    return (
        f"Metric `{key}` ({type(metric).__name__}) returned {describe(value)}; a logged metric must be a scalar. For "
        "per-class values use `average='macro'` (or 'micro'/'weighted'), or log them yourself."
    )


def _outside_epoch(stage: str, dataloader_idx: int, open_: bool) -> str:
    hook = _hook(stage)
    if log_stage(stage) is None:
        return f"Expected argument `stage` to be 'train', 'val' or 'test' but got {stage!r}."
    if open_:
        return (
            f"`update_metrics({stage!r}, ..., dataloader_idx={dataloader_idx})`: the mixin saw fewer {stage} "
            "dataloaders when the epoch started."
        )
    return (
        f"`update_metrics({stage!r}, ...)` ran outside a {hook} epoch the mixin saw start. If you override "
        f"`on_{hook}_epoch_start`, call `super().on_{hook}_epoch_start()` in it."
    )


def _data_parallel_group(strategy: object) -> Any:
    """The process group of the data-parallel replicas when it is not the whole world, else ``None`` (the world).

    ``ModelParallelStrategy`` with tensor parallelism gives every rank of a tensor-parallel group the same samples
    (its sampler's ``num_replicas`` is the data-parallel size): summing over the world would count each sample once
    per tensor-parallel rank.
    """
    try:
        mesh = getattr(strategy, "device_mesh", None)  # ModelParallelStrategy's, once set up
    except RuntimeError:  # accessed before the strategy set it up
        return None
    if mesh is None or "data_parallel" not in (getattr(mesh, "mesh_dim_names", None) or ()):
        return None
    data_parallel = mesh["data_parallel"]
    if data_parallel.size() == mesh.size():
        return None
    return data_parallel.get_group()


def _never_logged(stage: str, which: str) -> str:
    hook = _hook(stage)
    return (
        f"The {which} {hook} epoch was never logged: if you override `on_{hook}_epoch_end`, call "
        f"`super().on_{hook}_epoch_end()` in it."
    )


def _on(suffix: str) -> str:
    return f" ({suffix[1:]})" if suffix else ""


def _bad_targets(loader: _Loader, device: torch.device) -> Tensor:
    if loader.targets is None:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return loader.targets.summary(device)[0].to(device=device, dtype=torch.float64)


def _target_extremes(loader: _Loader, device: torch.device) -> Tensor:
    if loader.targets is None:
        return torch.full((2,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    return loader.targets.summary(device)[1].to(device)


def _show_running(bar: RunningBar, loader: _Loader) -> None:
    """Put this dataloader's running loss and metrics on the bar: one read-back from the device."""
    names: list[str] = []
    values: list[Tensor] = []
    loss = loader.loss.running_value()
    if loss is not None:
        names.append("loss")
        values.append(loss.to(torch.float64))
    for name, metric in loader.metrics:
        value = local_value(metric)
        if value is not None:
            names.append(name)
            values.append(value.to(device=loss.device if loss is not None else value.device, dtype=torch.float64))
    if values:
        bar.show(dict(zip(names, torch.stack(values).tolist(), strict=True)))
