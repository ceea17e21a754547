"""One stage vocabulary for the Lightning adapters, taken from Lightning's own enums.

A run is a ``TrainerFn`` (``fit``, ``validate``, ``test``, ``predict``); the loop running inside it is a
``RunningStage`` (``train``, ``sanity_check``, ``validate``, ``test``, ``predict``), whose value is the ``phase`` of
a finding. Lightning's hooks spell the evaluation stages differently (``on_validation_epoch_end``, also during the
sanity check), and its log keys and dataloader attributes differently again (``val``): ``hook_word`` and
``RunningStage.dataloader_prefix`` give those words, so no other module spells them.

Example:
    >>> hook_word(RunningStage.SANITY_CHECKING), RunningStage.SANITY_CHECKING.dataloader_prefix
    ('validation', 'val')
    >>> [s.value for s in evaluation_stages(TrainerFn.FITTING)]
    ['validate']

"""

from __future__ import annotations

from lightning.pytorch.trainer.states import RunningStage, TrainerFn

__all__ = ["RunningStage", "TrainerFn", "evaluation_stages", "hook_word", "log_stage"]

_HOOK_WORD = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "validation",
    RunningStage.VALIDATING: "validation",
    RunningStage.TESTING: "test",
    RunningStage.PREDICTING: "predict",
}

#: Trainer function -> the evaluation stages whose hooks it runs (the sanity check runs the validation hooks).
_EVALUATIONS = {
    TrainerFn.FITTING: (RunningStage.VALIDATING,),
    TrainerFn.VALIDATING: (RunningStage.VALIDATING,),
    TrainerFn.TESTING: (RunningStage.TESTING,),
    TrainerFn.PREDICTING: (RunningStage.PREDICTING,),
}

#: The stages whose values ``ValidationMixin`` logs, by their log prefix (``update_metrics("val", ...)``).
_LOG_STAGES = {s.dataloader_prefix: s for s in (RunningStage.TRAINING, RunningStage.VALIDATING, RunningStage.TESTING)}


def hook_word(stage: RunningStage) -> str:
    """The word Lightning's hooks use for ``stage``: ``on_{word}_epoch_end``."""
    return _HOOK_WORD[stage]


def evaluation_stages(fn: TrainerFn | str) -> tuple[RunningStage, ...]:
    """The evaluation stages a trainer function runs (``fit`` runs validation); none for an unknown function."""
    try:
        return _EVALUATIONS[TrainerFn(fn)]
    except ValueError:
        return ()


def log_stage(prefix: str) -> RunningStage | None:
    """The stage whose values are logged under ``prefix`` (``"train"``, ``"val"``, ``"test"``), else ``None``."""
    return _LOG_STAGES.get(prefix)
