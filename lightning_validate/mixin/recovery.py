"""Giving the model back after an evaluation that raised: the modes it had before Lightning's ``.eval()``.

Lightning records each submodule's mode before an evaluation and puts it back only when the evaluation ends
normally. When a hook or step raises, the model stays in eval mode, and the next ``fit`` on the same object would
train with Dropout off and BatchNorm statistics frozen. ``ValidationMixin`` records the modes around Lightning's
``.eval()`` (its ``on_{stage}_model_eval`` hooks) and, at the start of the next run, puts them back if the model is
still exactly as that interrupted evaluation left it.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(1, 1), nn.Dropout())
    >>> opened = OpenEvaluation("validate", "validation", before=modes(model))
    >>> opened.after = modes(model.eval())  # ... then a validation_step raised
    >>> give_back(model, opened), model[1].training
    (['', '0', '1'], True)

"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_validate.engine.names import group, named_modules
from lightning_validate.findings import display_name

__all__ = ["OpenEvaluation", "give_back", "modes", "restored_message"]


@dataclass
class OpenEvaluation:
    """An evaluation that began in a run: what ran it, and the modes before and after ``.eval()``."""

    fn: str  # the trainer function: "fit", "validate", "test", "predict"
    hook: str  # the word of its hooks: "validation", "test", "predict"
    before: dict[str, bool]
    after: dict[str, bool] | None = None


def modes(model: nn.Module) -> dict[str, bool]:
    """Qualified submodule name -> ``training`` flag (the root is ``""``)."""
    return {name: module.training for name, module in named_modules(model).items()}


def give_back(model: nn.Module, opened: OpenEvaluation) -> list[str]:
    """Put back the modes of ``opened.before`` if ``model`` is still exactly as ``.eval()`` left it.

    Returns the qualified names of the submodules whose mode changed (empty: nothing done). Nothing is done when
    something else gave the model back already (``ModeCheck``, the user) or changed a mode since, or when a
    submodule was added or removed: the recorded modes would no longer describe this model.
    """
    if opened.after is None:
        return []
    now = modes(model)
    if now.keys() != opened.before.keys() or now != opened.after:
        return []
    changed = [name for name, flag in opened.before.items() if now[name] != flag]
    found = named_modules(model)
    for name in changed:
        found[name].training = opened.before[name]  # assignment, as Lightning restores: no recursion into children
    return changed


def restored_message(opened: OpenEvaluation, changed: list[str], universe: list[str], hide: str = "") -> str:
    """The warning that says what happened and that it was fixed; names under ``hide`` are counted, not shown."""
    names = [name for name, _ in group(changed, universe) if not (hide and name.startswith(hide))]
    shown = ", ".join(f"`{display_name(n)}`" for n in names[:5]) + (", ..." if len(names) > 5 else "")
    were = "submodule was" if len(changed) == 1 else "submodules were"
    return (
        f"The previous `trainer.{opened.fn}()` on this model raised during {opened.hook}, and Lightning puts each "
        f"submodule's mode back only when an evaluation ends normally: {len(changed)} {were} still in eval mode "
        f"({shown}). ValidationMixin gave them back the modes they had before that evaluation, so this run starts "
        "from the model as it was. Nothing else to do."
    )
