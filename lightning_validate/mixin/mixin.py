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

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from lightning_validate.metrics.batches import batch_size_of
from lightning_validate.metrics.fast_accuracy import default_metrics
from lightning_validate.metrics.inputs import split_inputs
from lightning_validate.metrics.intervals import Intervals
from lightning_validate.metrics.loss_calls import recorded_terms
from lightning_validate.metrics.loss_terms import BatchLoss, LossMean, LossTerms, batch_loss, loss_plan, value_terms
from lightning_validate.metrics.records import SampleRecord
from lightning_validate.mixin import build, messages
from lightning_validate.mixin.build import Stage
from lightning_validate.mixin.run import CHECKPOINT_KEY, RunState
from lightning_validate.progress import DEFAULT_INTERVAL

__all__ = ["ValidationMixin"]

# The mixin sits before LightningModule in the user's bases. Type checkers see LightningModule's attributes
# (self.log, self.trainer, ...) through this base; at run time it is a plain object, so the mixin adds nothing
# to the MRO but its own methods.
if TYPE_CHECKING:
    _Base = pl.LightningModule
else:
    _Base = object

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
    ``return self.update_metrics("val", self(x), y, dataloader_idx)`` in it to keep the epoch metrics (and
    ``x, y = self.real_batch("val", batch, dataloader_idx)`` to leave DDP's repeated samples out of the forward);
    if you override any of the hooks, call ``super()`` in it.

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
        log_perplexity: also log ``val/ppl`` (``test/ppl``, ``train/ppl``), ``exp`` of the epoch's exact loss: the
            perplexity of the set for a token-mean cross-entropy (``False``; see ``docs/language-models.md``).
        confidence: ``None`` (default: no intervals, nothing extra per batch), a level such as ``0.95``, or
            ``Intervals(confidence=0.95, replicates=1000, seed=0, record=False)``: every validation and test value
            is also logged with its confidence interval, ``val/<name>_low`` and ``val/<name>_high`` (in
            ``metrics_history`` too), reduced with the values, once per epoch. The interval covers the sampling of
            the validation set, not training seeds or hyperparameters; ``docs/uncertainty.md`` says which method
            each value gets. A value without one is named in a warning. With ``record=True``,
            ``sample_record(stage)`` gives the epoch's per-sample record, for ``paired_comparison``.
    """

    on_bad_values: Literal["warn", "raise"] = "warn"
    progress_interval: float = DEFAULT_INTERVAL
    val_dataloader_names: Sequence[str] | None = None
    test_dataloader_names: Sequence[str] | None = None
    log_train_metrics: bool = True
    log_perplexity: bool = False
    confidence: float | Intervals | None = None

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
        metrics = default_metrics(build.num_classes_of(self))
        build.DEFAULTS.update(metrics.values())  # so that shapes are checked for them, also via super()
        return metrics

    def compute_loss(self, outputs: Any, target: Any) -> Tensor | LossTerms | LossMean:
        """Return the loss of a batch. Default: ``self.criterion(outputs, target)``.

        With the default, a ``torch.nn`` loss module is exact as it is (the mixin reads its numerator and
        denominator, ``docs/losses.md``). An override is exact when it returns what a torch loss call returned
        (``self.criterion(outputs.flatten(0, 1), target.flatten())``, ``F.cross_entropy(...)``: the mixin reads
        that call's terms, e.g. the tokens not ignored), one value per sample (or per element; each counts once),
        ``LossTerms(sum, weight)`` for a weighted mean, or ``LossMean(mean, weight)`` for a mean computed elsewhere
        (a Hugging Face model's ``outputs.loss``). Any other 0-dim value (the sum of two loss calls, a call times a
        factor) is weighted by the batch size: exact only when it is a mean over samples.
        """
        criterion = getattr(self, "criterion", None)
        if criterion is None:
            raise TypeError(messages.MISSING_CRITERION.format(name=type(self).__name__))
        loss: Tensor = criterion(outputs, target)
        return loss

    def unpack_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(inputs, target)``. Default: a tuple or list of two."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(messages.unpack_error(batch))

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
        return self._lv_step("val", batch, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        """Forward, loss and metrics of one test batch; returns its loss."""
        return self._lv_step("test", batch, dataloader_idx)

    def real_batch(self, stage: Stage, batch: Any, dataloader_idx: int = 0) -> tuple[Any, Any]:
        """``unpack_batch(batch)`` without the samples ``DistributedSampler`` repeated to pad this process.

        Call it in your own step so that what the model computes from the batch itself (its own ``outputs.loss``,
        generated text) covers real samples only; the default steps do so when ``compute_loss`` is overridden.
        ``update_metrics`` cuts whatever is left after the forward. A batch that is all repeats comes back whole
        (every process runs its forward) and ``update_metrics`` counts nothing of it. Plain ints, no sync.
        """
        inputs, target = self.unpack_batch(batch)
        epoch = self._lv.epochs.get(stage)
        if epoch is None or dataloader_idx >= len(epoch.loaders):
            return inputs, target  # update_metrics says why
        return epoch.loaders[dataloader_idx].real(inputs, target)

    def update_metrics(self, stage: Stage, outputs: Any, target: Any, dataloader_idx: int = 0) -> Tensor | None:
        """Count one batch in ``stage``'s epoch values; return its loss (``None`` if it was all DDP padding).

        Call it from your own step to keep the mixin's epoch metrics. No host-device sync: the loss and the
        metrics accumulate on the device; the bar reads them back only when ``progress_interval`` has passed.
        """
        epoch = self._lv.epochs.get(stage)
        if epoch is None or dataloader_idx >= len(epoch.loaders):
            raise RuntimeError(messages.outside_epoch(stage, dataloader_idx, epoch is not None))
        return epoch.loaders[dataloader_idx].update(
            outputs, target, inputs_of=self._lv_metric_inputs, loss_of=epoch.loss_of or self._lv_loss, bar=epoch.bar
        )

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, stage: str) -> None:
        """Build the metrics before any loop runs, so they move with the model and exist before evaluation.

        Also clean up after an earlier run on this model that raised: its unfinished epochs are dropped, and the
        modes Lightning did not put back are given back (``RunState.start``).
        """
        super().setup(stage)
        self._lv.start(self)
        build.prepare(self, self._lv, self._lv_default_loss())
        build.register(self, self._lv, stage)

    @override
    def teardown(self, stage: str) -> None:
        """Close the run: Lightning calls this only when the run ended normally."""
        super().teardown(stage)
        self._lv.end()

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
        self._lv.record_train_epoch(self.trainer.current_epoch, self._lv_end("train"))

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
            self._lv.pending.update(values)  # recorded with the training epoch's values at its end

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

    def sample_record(self, stage: Stage = "val", dataloader_idx: int = 0) -> SampleRecord:
        """The per-sample record of the last ``stage`` epoch (``confidence = Intervals(record=True)``).

        Save it (``record.save(path)``) to compare two checkpoints evaluated in separate runs with
        ``paired_comparison``. Under DDP each process records its own samples (``SampleRecord.merge`` joins them).
        """
        return self._lv.record_of(stage, dataloader_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save ``metrics_history`` (and the values of an epoch not closed yet) under ``"lightning_validate"``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self._lv.checkpoint(self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore ``metrics_history``; a checkpoint written without it (before 0.2) leaves the history empty."""
        super().on_load_checkpoint(checkpoint)
        self._lv.restore(checkpoint)

    # ----------------------------------------------------------------------------------------------------------
    # Internals: each delegates to the run state (run.py), the epoch (epoch.py) or the builders (build.py)

    @property
    def _lv(self) -> RunState:
        state = self.__dict__.get("_lv_state")
        if state is None:
            state = RunState()
            self.__dict__["_lv_state"] = state
        return state

    def _lv_default_loss(self) -> bool:
        """Whether the class keeps the default ``compute_loss`` (the criterion, which the mixin can see into)."""
        return type(self).compute_loss is ValidationMixin.compute_loss

    def _lv_evaluation(self, hook: str, make_eval: Callable[[], None]) -> None:
        fn = self.trainer.state.fn
        self._lv.evaluate(self, fn.value if fn is not None else "fit", hook, make_eval)

    def _lv_begin(self, stage: Stage) -> None:
        build.prepare(self, self._lv, self._lv_default_loss())
        epoch = build.open_epoch(self, self._lv, stage, self._lv_default_loss())
        epoch.loss_of = self._lv_criterion_loss()
        self._lv.open(epoch)

    def _lv_end(self, stage: Stage) -> dict[str, float]:
        """Reduce across processes, report bad values, log; return the values for the history."""
        epoch = self._lv.epochs.pop(stage, None)
        if epoch is None:  # the start hook never reached the mixin; update_metrics said so already
            return {}
        totals = epoch.reduce(self.trainer, self.device)
        values = epoch.values(totals, self.device)
        epoch.report(totals, values, self.on_bad_values)
        epoch.close(values)
        distributed = self.trainer.world_size > 1
        for name, value in epoch.logged(values).items():
            # The values are already global and equal on every rank. Lightning asks for sync_dist on epoch-level
            # values under DDP; the max of equal values is the value itself (a mean would divide and round).
            self.log(name, value, prog_bar=stage == "val" and name not in epoch.bounds, sync_dist=distributed,
                     reduce_fx="max", add_dataloader_idx=False)  # the suffix is ours: dataloader_idx_<i> or the user's
        self._lv.intervals_done(epoch)
        return values

    def _lv_criterion_loss(self) -> Callable[[Any, Any, int, bool], BatchLoss] | None:
        """The epoch's loss path when ``compute_loss`` is the default and ``criterion`` a torch loss, else ``None``.

        Decided once per epoch, so a batch pays only for the criterion and its weight; a criterion replaced during
        the epoch goes the general way (``_lv_loss``).
        """
        if getattr(self.compute_loss, "__func__", None) is not ValidationMixin.compute_loss:
            return None
        criterion = getattr(self, "criterion", None)
        plan = loss_plan(criterion)
        if plan is None:
            return None

        def loss_of(outputs: Any, target: Any, n: int, is_sum: bool) -> BatchLoss:
            if self.criterion is not criterion:
                return self._lv_loss(outputs, target, n, is_sum)
            try:
                batch = plan(outputs, target)
            except (RuntimeError, ValueError, IndexError) as err:
                raise type(err)(messages.criterion_error(criterion, outputs, target, err)) from err
            return batch if batch is not None else self._lv_loss(outputs, target, n, is_sum)

        return loss_of

    def _lv_loss(self, outputs: Any, target: Any, n: int, is_sum: bool) -> BatchLoss:
        """The batch's loss and its weight: exact terms for a torch criterion, else what ``compute_loss`` returns."""
        # The default compute_loss (not overridden in the class or on the instance) calls the criterion: see into it.
        default = getattr(self.compute_loss, "__func__", None) is ValidationMixin.compute_loss
        criterion = getattr(self, "criterion", None)
        loss: Any = None
        try:
            batch = batch_loss(criterion, outputs, target) if default else None
            if batch is None:  # your compute_loss (or a criterion not seen into): the terms of the loss call it returns
                loss, batch = recorded_terms(self.compute_loss, outputs, target, is_sum=is_sum)
        except (RuntimeError, ValueError, IndexError) as err:
            if not default:
                raise
            raise type(err)(messages.criterion_error(criterion, outputs, target, err)) from err
        return batch if batch is not None else value_terms(loss, n, is_sum=is_sum, what="`compute_loss`")

    def _lv_step(self, stage: Stage, batch: Any, dataloader_idx: int) -> Tensor | None:
        """``real_batch``, the forward and ``update_metrics`` in one: one look-up of the loader per batch."""
        inputs, target = self.unpack_batch(batch)
        epoch = self._lv.epochs.get(stage)
        if epoch is None or dataloader_idx >= len(epoch.loaders):
            raise RuntimeError(messages.outside_epoch(stage, dataloader_idx, epoch is not None))
        loader = epoch.loaders[dataloader_idx]
        if loader.padding.limit is not None and epoch.loss_of is None:
            # Under DDP, when your compute_loss computes the loss (it may be the model's own): the repeated samples
            # left out before the forward. The mixin's own criterion path cuts the outputs after it, as it always did.
            inputs, target = loader.real(inputs, target)
        outputs = self(inputs)
        return loader.update(
            outputs, target, inputs_of=self._lv_metric_inputs, loss_of=epoch.loss_of or self._lv_loss, bar=epoch.bar
        )

    def _lv_metric_inputs(self, names: list[str], outputs: Any, target: Any) -> list[tuple[Any, ...]]:
        """The ``update`` arguments of each metric, from ``metric_inputs``."""
        if type(self).metric_inputs is ValidationMixin.metric_inputs:  # the default: no call, no checks per batch
            return [(outputs, target)] * len(names)
        return split_inputs(self.metric_inputs(outputs, target), names, hook="`metric_inputs`")
