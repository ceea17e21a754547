"""Findings: what the checks report, each with a stable code, the place it was seen and the fix.

This module is the catalogue. For every code it holds the one-line title and the fix, written for the context the
finding was seen in: in plain PyTorch (``evaluating()``) the fix speaks of ``model.eval()`` and ``evaluating()``; in a
Lightning run it names the hook of the stage that ran (``on_test_model_train`` in a test run). Every finding is
built here, by ``make_finding`` with keyword arguments, so a code's words exist once. ``Policy`` is the one
warn-or-raise choice that ``ModeCheck(on_violation=)``, ``evaluating(check=)`` and ``ValidationMixin.on_bad_values``
share.

Every code is documented in ``docs/codes.md``, one section each, with the same title. Codes never change meaning
once released; a retired code is not reused.

Example:
    >>> f = make_finding("LV101", module="backbone.bn1", phase="test", boundary="on_test_batch_start",
    ...                  expected="eval mode", seen="backbone.bn1 (BatchNorm2d) in train mode")
    >>> print(f.message)  # doctest: +NORMALIZE_WHITESPACE
    LV101 submodule in train mode during evaluation: `backbone.bn1` at test/on_test_batch_start: expected eval mode,
    saw backbone.bn1 (BatchNorm2d) in train mode. Fix: call `model.eval()` before evaluating (Lightning does it
    unless `on_test_model_eval` is overridden); if `backbone.bn1` must stay in train mode on purpose, allow it:
    `allow_train_mode=['backbone.bn1']`

"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CODES", "Finding", "ModeCheckError", "ModeCheckWarning", "Policy", "make_finding"]

OnViolation = Literal["warn", "raise"]

#: How the root module is named in findings.
ROOT = "<model>"

#: The phase of findings from plain PyTorch (``evaluating()``, ``validate()``). Lightning phases are the values of
#: Lightning's ``RunningStage``: ``train``, ``sanity_check``, ``validate``, ``test``, ``predict``.
PLAIN = "evaluating"

#: Lightning phase -> the word Lightning's hooks use for it (``on_validation_model_eval``).
_HOOK_WORD = {"sanity_check": "validation", "validate": "validation", "test": "test", "predict": "predict",
              "train": "train"}


@dataclass(frozen=True)
class _Fix:
    """A fix template: ``plain`` for plain PyTorch, ``lightning`` for a Lightning phase (``None``: the same text).

    Templates are ``str.format`` strings over the finding's context: ``{module}`` (display name), ``{owner}`` (the
    display name of the submodule the fix acts on: a parameter's module), ``{path}`` (``model.backbone[1]``),
    ``{self_path}`` (``self.backbone[1]``), ``{hook}`` (``validation``, ``test``...) and any extra field the caller
    passes (``{name}`` of a metric).
    """

    plain: str
    lightning: str | None = None

    def render(self, lightning: bool, fields: Mapping[str, str]) -> str:
        template = self.lightning if lightning and self.lightning is not None else self.plain
        return template.format(**fields)


@dataclass(frozen=True)
class _Entry:
    title: str
    fix: _Fix
    variants: Mapping[str, _Fix] = field(default_factory=dict)


_PARAM_WRITES = "do not write parameters during evaluation (`p.data.clamp_()`, an EMA update, `optimizer.step()`): "

#: Quantization-aware training: ``torch.ao.quantization`` observers update their ranges in eval mode too.
_OBSERVERS = _Fix(
    "quantization observers keep updating in eval mode, so evaluation data moved the quantization ranges: turn "
    "them off around evaluation, `model.apply(torch.ao.quantization.disable_observer)` before it and "
    "`model.apply(torch.ao.quantization.enable_observer)` after it",
    "quantization observers keep updating in eval mode, so evaluation data moved the quantization ranges: turn "
    "them off for the evaluation, `self.apply(torch.ao.quantization.disable_observer)` in `on_{hook}_model_eval` "
    "(after `super().on_{hook}_model_eval()`) and `self.apply(torch.ao.quantization.enable_observer)` in "
    "`on_{hook}_model_train` (after `super().on_{hook}_model_train()`)",
)

#: The catalogue. 1xx: the state during evaluation; 2xx: what evaluation changed; 3xx: the state during training;
#: 4xx: torchmetrics objects.
_CATALOGUE: dict[str, _Entry] = {
    "LV101": _Entry("submodule in train mode during evaluation", _Fix(
        "call `model.eval()` before evaluating; if `{module}` must stay in train mode on purpose, allow it: "
        "`allow_train_mode=[{module!r}]`",
        "call `model.eval()` before evaluating (Lightning does it unless `on_{hook}_model_eval` is overridden); "
        "if `{module}` must stay in train mode on purpose, allow it: `allow_train_mode=[{module!r}]`",
    )),
    "LV102": _Entry("grad enabled during evaluation", _Fix(
        "remove `torch.set_grad_enabled(True)` from evaluation code; for input gradients use a local "
        "`with torch.enable_grad():` block inside the step",
    )),
    "LV103": _Entry("non-deterministic forward in eval mode", _Fix(
        "make randomness follow the mode: `F.dropout(x, p, training=self.training)` or an `nn.Dropout` module "
        "instead of `training=True`, and `F.scaled_dot_product_attention(..., dropout_p=p if self.training else "
        "0.0)` in attention; if the randomness is intended (MC dropout, sampling), allow the module: "
        "`allow_train_mode=[{module!r}]`, or `ignore=['LV103']`",
    )),
    "LV201": _Entry(
        "parameter changed by evaluation",
        _Fix(
            _PARAM_WRITES + "move the write after `optimizer.step()`",
            _PARAM_WRITES + "move the write to `on_train_batch_end` or after `optimizer.step()`",
        ),
        {"observer": _OBSERVERS},  # a learnable fake-quantization's scale, written by its observer
    ),
    "LV202": _Entry(
        "buffer changed by evaluation",
        _Fix(  # a buffer of a module of the user's, or a group of buffers of several kinds
            "find what writes the buffer during evaluation and make it follow the mode (`if self.training:` around "
            "the update) or restore it afterwards; if a submodule in train mode updates it (BatchNorm running "
            "statistics), keep it in eval mode (`{path}.eval()`); a cache computed from the input's shape is not "
            "state: register it with `persistent=False`, then rebuilding it with another shape is not reported",
        ),
        {
            "norm": _Fix(
                "a submodule ran in train mode during evaluation and updated its buffers (BatchNorm running "
                "statistics): keep it in eval mode (`{path}.eval()`), or restore the buffers after computing the loss",
            ),
            "observer": _OBSERVERS,
            "quant_toggle": _Fix(
                "evaluation switched observation or fake quantization off (or on) and did not switch it back: undo "
                "the switch after evaluating, `model.apply(torch.ao.quantization.enable_observer)` after a "
                "`disable_observer` (`enable_fake_quant` after `disable_fake_quant`)",
                "evaluation switched observation or fake quantization off (or on) and did not switch it back: undo "
                "the switch in `on_{hook}_model_train`, `self.apply(torch.ao.quantization.enable_observer)` after a "
                "`disable_observer` in `on_{hook}_model_eval` (`enable_fake_quant` after `disable_fake_quant`)",
            ),
            "cache": _Fix(
                "`{module}` is a non-persistent buffer (a cache) that evaluation rewrote in place, with the same "
                "shape: if it holds values computed from the input's shape alone (a rotary table, a mask), allow "
                "its module, `allow_train_mode=[{owner!r}]`; if it keeps something between calls (a KV cache, a "
                "counter), reset it at the end of evaluation",
            ),
        },
    ),
    "LV203": _Entry("requires_grad changed by evaluation", _Fix(
        "do not freeze or unfreeze during evaluation; save and restore the flags: "
        "`flags = {{n: p.requires_grad for n, p in model.named_parameters()}}` ... "
        "`for n, p in model.named_parameters(): p.requires_grad_(flags[n])`",
    )),
    "LV204": _Entry(".grad changed by evaluation", _Fix(
        "do not call `loss.backward()` during evaluation; for input gradients use "
        "`torch.autograd.grad(output.sum(), inputs)`, which leaves `.grad` untouched",
    )),
    "LV205": _Entry(
        "submodule mode not restored after evaluation",
        _Fix(  # a submodule that was in eval mode came back in train mode
            "restore each submodule's own mode instead of calling `model.train()`: "
            "`with lightning_validate.evaluating(model): ...`",
            "restore each submodule's own mode instead of calling `model.train()`: "
            "`with lightning_validate.evaluating(model): ...`, or in Lightning remove the `on_{hook}_model_train` "
            "override (Lightning >= 2.2 restores every submodule's mode itself)",
        ),
        {"left_in_eval": _Fix(  # a submodule that was in train mode came back in eval mode
            "put the submodule back in train mode after evaluation: call `{path}.train()`, or evaluate under "
            "`with lightning_validate.evaluating(model): ...`, which restores each submodule's own mode",
            "put the submodule back in train mode after evaluation: remove the `on_{hook}_model_train` override "
            "that does nothing, or call `{path}.train()` at the end of evaluation",
        )},
    ),
    "LV206": _Entry("submodules added or removed by evaluation", _Fix(
        "do not add or remove submodules during evaluation; create them in `__init__` or `setup()`",
    )),
    "LV301": _Entry("grad disabled during training", _Fix(
        "do not call `torch.set_grad_enabled(False)` outside a `with` block; wrap evaluation in `torch.no_grad()` "
        "or `lightning_validate.evaluating(model)` so grad comes back",
    )),
    "LV302": _Entry("trainable submodule in eval mode during training", _Fix(
        "call `{path}.train()` before training (a pretrained model loaded in eval mode stays there), or freeze it "
        "with `requires_grad_(False)` if it should not learn",
        "call `{self_path}.train()` in `on_train_start` (a pretrained model loaded in eval mode stays there: "
        "Lightning >= 2.2 no longer calls `.train()`), or freeze it with `requires_grad_(False)` if it should not "
        "learn",
    )),
    "LV401": _Entry("metric object updated in two stages", _Fix(
        "use one instance per stage: `self.train_{name} = metric.clone()`, `self.val_{name} = metric.clone()` "
        "(a `MetricCollection(...).clone(prefix='val_')` for collections)",
    )),
    "LV402": _Entry("metric object not reset between epochs", _Fix(
        "call `self.{name}.reset()` after `self.{name}.compute()` at the end of each epoch, or log the object "
        "itself (`self.log('...', self.{name})`) so that Lightning resets it",
    )),
}

#: Every finding code with its one-line title (the catalogue's titles).
CODES: dict[str, str] = {code: entry.title for code, entry in _CATALOGUE.items()}


class ModeCheckError(RuntimeError):
    """Raised for a finding when the user asked to fail fast (``on_violation="raise"``, ``check="raise"``).

    Attributes:
        findings: the findings that caused the error, first one first.

    """

    def __init__(self, message: str, findings: list[Finding] | None = None) -> None:
        super().__init__(message)
        self.findings: list[Finding] = list(findings or [])


class ModeCheckWarning(UserWarning):
    """Warning category of every finding reported with ``on_violation="warn"``; filter it like any warning."""


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One problem the checks found. Built with keyword arguments only; the checks build it with ``make_finding``.

    Attributes:
        code: stable code such as ``"LV101"``; see ``CODES`` and ``docs/codes.md``.
        module: qualified name of the submodule, parameter or buffer (``"backbone.bn1"``), ``"<model>"`` for the
            root module, or the name of a global state (``"grad mode"``).
        phase: where it was seen: ``"evaluating"`` in plain PyTorch, else Lightning's running stage
            (``"sanity_check"``, ``"validate"``, ``"test"``, ``"predict"``, ``"train"``).
        boundary: the hook or point inside the phase (``"on_validation_batch_start"``, ``"end"``).
        expected: what should have been seen.
        seen: what was seen.
        fix: the fix, written as code where possible.
        detail: optional extra context (for example the hook that made a change).

    """

    code: str
    module: str
    phase: str
    boundary: str
    expected: str
    seen: str
    fix: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(
                f"Expected argument `code` to be one of the documented codes ({', '.join(CODES)}) but got "
                f"{self.code!r}. Add a new code to `CODES` and a section to docs/codes.md first."
            )

    @property
    def title(self) -> str:
        """The one-line title of this finding's code."""
        return CODES[self.code]

    @property
    def message(self) -> str:
        """A one-line message: code, title, module, where, expected, seen and the fix."""
        where = f"{self.phase}/{self.boundary}" if self.boundary else self.phase
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"{self.code} {self.title}: `{self.module}` at {where}: expected {self.expected}, saw {self.seen}{extra}."
            f" Fix: {self.fix}"
        )

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity used to report a finding once: code, module and phase (not the batch or boundary)."""
        return (self.code, self.module, self.phase)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields plus ``title`` and ``message``."""
        out = asdict(self)
        out["title"] = self.title
        out["message"] = self.message
        return out

    def __str__(self) -> str:
        return self.message


def display_name(name: str) -> str:
    """Qualified name as shown to users: the root module (``""``) is ``"<model>"``."""
    return name or ROOT


def attribute_path(name: str, root: str = "model") -> str:
    """Write the Python expression that reaches a submodule, for fixes written as code.

    Example:
        >>> attribute_path("backbone.1.conv"), attribute_path("", "self"), attribute_path("<model>")
        ('model.backbone[1].conv', 'self', 'model')

    """
    if name == ROOT:
        name = ""
    return root + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)


def make_finding(
    code: str,
    *,
    module: str,
    phase: str,
    boundary: str,
    expected: str,
    seen: str,
    detail: str = "",
    variant: str = "",
    owner: str | None = None,
    **fields: str,
) -> Finding:
    """Build a finding of ``code`` with its fix rendered from the catalogue for this context.

    Args:
        code: the finding code.
        module: the display name of what the finding is about (``"backbone.bn1"``, ``"<model>"``, ``"grad mode"``).
        phase: ``"evaluating"`` (plain PyTorch) or a Lightning running stage; a Lightning phase picks the fix that
            names that stage's hooks.
        boundary: the hook or point inside the phase.
        expected: what should have been seen.
        seen: what was seen.
        detail: extra context.
        variant: a named variant of the code's fix, for what the finding is about (``"left_in_eval"`` for LV205;
            ``"norm"``, ``"observer"``, ``"quant_toggle"``, ``"cache"`` for LV202); ``""``: the default fix.
        owner: the submodule the fix acts on, when it is not ``module`` (a parameter's module).
        **fields: extra template fields (``name`` of a metric object).

    Returns:
        The finding.

    Raises:
        ValueError: for a code or variant that is not in the catalogue.

    """
    entry = _CATALOGUE.get(code)
    if entry is None:
        raise ValueError(f"Expected argument `code` to be one of the documented codes ({', '.join(CODES)}) but got "
                         f"{code!r}. Add a new code to the catalogue and a section to docs/codes.md first.")
    fix = entry.variants.get(variant) if variant else entry.fix
    if fix is None:
        raise ValueError(f"Expected argument `variant` to be one of {sorted(entry.variants)!r} for {code} but got "
                         f"{variant!r}.")
    target = module if owner is None else owner
    context = {"module": module, "owner": display_name(target) if owner is not None else module,
               "path": attribute_path(target), "self_path": attribute_path(target, "self"),
               "hook": _HOOK_WORD.get(phase, phase), **fields}
    return Finding(code=code, module=module, phase=phase, boundary=boundary, expected=expected, seen=seen,
                   fix=fix.render(phase in _HOOK_WORD, context), detail=detail)


class Policy(str, enum.Enum):
    """What to do with a finding or a bad value: warn and go on, or raise and stop.

    The user-facing arguments take the strings (``on_violation="raise"``); ``Policy.parse`` turns them into this
    type once, at the API boundary.

    Example:
        >>> Policy.parse("raise"), Policy.parse("warning")
        (<Policy.RAISE: 'raise'>, None)

    """

    WARN = "warn"
    RAISE = "raise"

    @classmethod
    def parse(cls, value: object) -> Policy | None:
        """The policy named by ``value`` (``"warn"`` or ``"raise"``), or ``None`` when it names none."""
        return cls(value) if isinstance(value, str) and value in ("warn", "raise") else None

    def apply(self, message: str, *, error: Callable[[str], BaseException], warn: Callable[[str], None]) -> None:
        """Raise ``error(message)`` under ``RAISE``; call ``warn(message)`` under ``WARN``."""
        if self is Policy.RAISE:
            raise error(message)
        warn(message)
