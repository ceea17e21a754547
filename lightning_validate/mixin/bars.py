"""Running values on Lightning's validation and test progress bars, TQDM or Rich.

``running_bar(trainer, "val")`` finds the bar of the stage that is shown on this process and returns a
``RunningBar`` that takes values already read back to the host: ``show`` during the epoch (the caller reads the
values at most a few times per second, see ``lightning_validate.progress.Throttle``), ``finish`` once at the end
with the exact epoch values. Neither reads anything from the device, and neither redraws the bar per call: the bar
draws the values at its own next refresh (TQDM: ``finish`` redraws at once).

TQDM: the values go to the bar's postfix (``loss=0.123, acc=0.900``), as Lightning's training bar shows its own.

Rich: Lightning's ``RichProgressBar`` draws logged metrics only on the training bar, in its last column, and leaves
that column empty on the validation and test bars. The values go to that column of the stage's bar
(``loss: 0.123 acc: 0.900``, in the theme's ``metrics`` style, ``metrics_format`` and delimiter), so they sit where
the training bar shows its metrics. The task's description and the other columns are left as they are. The column
is found on the ``rich.progress.Progress`` Lightning built (``RichProgressBar.progress``, re-created per run) and
wrapped once; it keeps drawing the training bar's metrics as before.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> running_bar(trainer, "val") is None
    True
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_validate.progress import format_postfix

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from rich.console import RenderableType
    from rich.progress import Progress, ProgressColumn, Task

__all__ = ["RunningBar", "running_bar"]

#: The Rich task field that carries the formatted values (``Progress.update(task_id, **fields)``).
_FIELD = "lightning_validate_values"


class RunningBar(ABC):
    """The bar of one evaluation stage, given values already on the host."""

    @abstractmethod
    def show(self, values: Mapping[str, float]) -> None:
        """Put running values on the bar; it draws them at its next refresh."""

    @abstractmethod
    def finish(self, values: Mapping[str, float]) -> None:
        """Put the epoch's final values on the bar; they stay on it when the epoch ends."""


def running_bar(trainer: pl.Trainer, stage: str) -> RunningBar | None:
    """The bar of ``stage`` (``"val"`` or ``"test"``) shown on this process, else ``None``.

    ``None`` for the training stage, without a progress bar, on a process whose bar is disabled (ranks other than
    0), and for progress bars other than Lightning's ``TQDMProgressBar`` and ``RichProgressBar`` (and their
    subclasses).
    """
    if stage not in ("val", "test"):
        return None
    callback = trainer.progress_bar_callback
    if isinstance(callback, TQDMProgressBar) and callback.is_enabled:
        try:
            bar = callback.test_progress_bar if stage == "test" else callback.val_progress_bar
        except TypeError:  # not created (yet)
            return None
        return None if getattr(bar, "disable", True) else _TqdmBar(bar)
    if isinstance(callback, RichProgressBar) and callback.is_enabled:
        return _RichBar(trainer, callback, stage)
    return None


class _TqdmBar(RunningBar):
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def show(self, values: Mapping[str, float]) -> None:
        self._bar.set_postfix(format_postfix(values), refresh=False)

    def finish(self, values: Mapping[str, float]) -> None:
        self._bar.set_postfix(format_postfix(values), refresh=True)


class _RichBar(RunningBar):
    def __init__(self, trainer: pl.Trainer, callback: RichProgressBar, stage: str) -> None:
        self._trainer = trainer
        self._callback = callback
        self._stage = stage

    def show(self, values: Mapping[str, float]) -> None:
        self._put(values)

    def finish(self, values: Mapping[str, float]) -> None:
        # No redraw here: Lightning draws a last frame when it stops the display at the end of `validate`/`test`,
        # and inside `fit` it has hidden the validation bar already (its callback hook runs before the module's).
        self._put(values)

    def _put(self, values: Mapping[str, float]) -> None:
        """Store the formatted values on the stage's current task, for the bar's next refresh to draw."""
        progress: Progress | None = getattr(self._callback, "progress", None)
        task_id = self._task_id()
        if progress is None or task_id is None:  # no display yet, or no batch of this stage has started a task
            return
        _wrap_metrics_column(progress, self._callback)
        theme = self._callback.theme
        fmt, delimiter = getattr(theme, "metrics_format", ".3f"), getattr(theme, "metrics_text_delimiter", " ")
        progress.update(task_id, lightning_validate_values=_rich_text(values, fmt, delimiter))  # the field _FIELD

    def _task_id(self) -> Any:
        # Read at each call: Lightning starts a new task per dataloader (and per epoch), at the first batch.
        callback = self._callback
        if self._stage == "test":
            return getattr(callback, "test_progress_bar_id", None)
        if self._trainer.sanity_checking:  # the TQDM path shows the sanity check's values too
            return getattr(callback, "val_sanity_progress_bar_id", None)
        return getattr(callback, "val_progress_bar_id", None)


def _rich_text(values: Mapping[str, float], fmt: str, delimiter: str) -> str:
    """Format values as Lightning's Rich metrics column does (a format that does not fit a float falls back to str).

    >>> _rich_text({"loss": 0.12345, "acc": 0.9}, ".3f", " ")
    'loss: 0.123 acc: 0.900'
    >>> _rich_text({"loss": 0.5}, "d", " | ")
    'loss: 0.5'
    """
    texts = []
    for name, value in values.items():
        try:
            shown = f"{value:{fmt}}"
        except (TypeError, ValueError):  # a theme's format for other values: never stop the evaluation for it
            shown = str(value)
        texts.append(f"{name}: {shown}")
    return delimiter.join(texts)


def _wrap_metrics_column(progress: Progress, callback: RichProgressBar) -> None:
    """Make the metrics column of ``progress`` also draw our task field (once per ``Progress``)."""
    values_column = _values_column_type()
    columns = list(progress.columns)
    if any(isinstance(column, values_column) for column in columns):
        return
    inner = getattr(callback, "_metric_component", None)
    style = getattr(callback.theme, "metrics", "")
    if inner is not None and any(column is inner for column in columns):
        columns = [values_column(column, style) if column is inner else column for column in columns]
    else:  # a Lightning without that column, or a subclass that dropped it: a column of our own at the end
        columns.append(values_column(None, style))
    progress.columns = tuple(columns)


@functools.cache
def _values_column_type() -> type[Any]:  # a ProgressColumn subclass; Any: rich is imported inside
    """The column class, built on first use: importing this module must not need ``rich`` (an optional extra)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ValuesColumn(ProgressColumn):
        """Lightning's metrics column, which also draws the running values of the validation and test tasks."""

        def __init__(self, inner: ProgressColumn | None, style: Any) -> None:
            super().__init__()
            self.inner = inner
            self.style = style

        def render(self, task: Task) -> RenderableType:
            # The inner column runs for every task, as if unwrapped: Lightning's column reads back its own cache of
            # earlier tasks' cells (`_renderable_cache`, filled by `__call__`), and Lightning 2.2 fails on a gap.
            inner = self.inner(task) if self.inner is not None else Text()
            text = task.fields.get(_FIELD)
            return inner if text is None else Text(text, justify="left", style=self.style)

    return ValuesColumn
