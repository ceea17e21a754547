"""The probe behind ``ModeCheck(probe=True)`` (LV103): run a batch twice in eval mode and compare the outputs.

During the first evaluation batch a forward pre-hook records the first call of the LightningModule and of each
direct child (inputs copied); at that batch's end each recorded call is run twice with the random number generators
restored in between, and outputs that differ mean randomness in eval mode. Modules allowed in train mode (MC dropout)
run in eval mode for the probe and replay their first output on the second run, so their randomness is not reported.

The probe only looks. Loss modules and torchmetrics objects are never hooked or run (a loss is no source of
randomness, and the step's loss accounting must see the criterion exactly as without the probe). Around its runs it
saves and puts back what a forward in eval mode can still change: every buffer of the model (fake-quant observers
and caches update in eval mode), every torchmetrics state in it, and the random number generators (CPU and CUDA).
What it cannot put back: Python attributes a forward sets, and parameters written in place by a forward (that is
LV201 in itself).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_validate.findings import Finding, display_name, make_finding
from lightning_validate.metrics.states import restore_states, save_states
from lightning_validate.mode_check.metric_tracking import is_metric
from lightning_validate.stages import RunningStage, hook_word

__all__ = ["ProbeCalls", "probe_findings", "record_first_calls", "remove_hooks"]

#: Qualified name (``""``: the model itself) -> the module and a copy of its first call's inputs.
ProbeCalls = dict[str, tuple[nn.Module, tuple[Any, ...], dict[str, Any]]]


def record_first_calls(model: nn.Module, handles: list[RemovableHandle]) -> ProbeCalls:
    """Record the first call of ``model`` and of each direct child (loss modules and torchmetrics objects excepted).

    Args:
        model: the LightningModule.
        handles: receives each forward pre-hook handle as it is registered; remove them with ``remove_hooks``.

    Returns:
        The calls, filled in as the forward runs.
    """
    calls: ProbeCalls = {}
    targets = [("", model), *((n, m) for n, m in model.named_children() if not _never_probed(m))]
    for name, module in targets:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name not in calls:
                calls[name] = (mod, _detach_clone(args, mod), _detach_clone(kwargs, mod))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return calls


def remove_hooks(handles: list[RemovableHandle]) -> None:
    """Remove the pre-hooks registered by ``record_first_calls``."""
    for handle in handles:
        handle.remove()


def probe_findings(
    model: nn.Module, calls: ProbeCalls, allowed: list[nn.Module], phase: str, stage: RunningStage
) -> list[Finding]:
    """Run each recorded call twice; differing outputs mean randomness in eval mode. ``model`` is left as it was.

    Args:
        model: the LightningModule: its buffers, metric states and the random number generators are put back.
        calls: the calls recorded by ``record_first_calls``.
        allowed: the modules allowed in train mode (``allow_train_mode``); their randomness is replayed.
        phase: the finding's phase.
        stage: the evaluation stage, whose batch-end hook the finding names.

    Returns:
        One LV103 finding per direct child whose outputs differ, or for the model itself when no child's do.
    """
    differing: list[tuple[str, str]] = []
    with _preserved_state(model, allowed) as replay:
        for name, (module, args, kwargs) in calls.items():
            replay.record()
            first = module(*_detach_clone(args, module), **_detach_clone(kwargs, module))
            replay.replay()
            second = module(*_detach_clone(args, module), **_detach_clone(kwargs, module))
            diff = _difference(first, second)
            if diff is not None:
                differing.append((name, diff))
    children = [(n, d) for n, d in differing if n]
    return [make_finding(
        "LV103", module=display_name(name), phase=phase, boundary=f"on_{hook_word(stage)}_batch_end (probe)",
        expected="the same output for the same batch run twice in eval mode", seen=f"outputs differ ({diff})",
    ) for name, diff in (children or differing)]


def _never_probed(module: nn.Module) -> bool:
    return is_metric(module) or isinstance(module, nn.modules.loss._Loss)


def _detach_clone(value: Any, owner: nn.Module) -> Any:
    """Copy nested inputs so that an in-place change by the step (or by a run) does not change the probe's input.

    Other objects than tensors and plain values are copied too: a key-value cache (Hugging Face's ``DynamicCache``,
    passed by ``generate()``) grows at every call, so two runs on one cache would differ. Modules, and the modules,
    parameters and buffers of ``owner`` (the module called) that such an object refers to, are not copied.
    """
    value = apply_to_collection(value, Tensor, lambda t: t.detach().clone())
    return apply_to_collection(value, object, _copy_object, owner, wrong_dtype=_NOT_COPIED)


#: Inputs passed as they are: tensors (cloned above), collections (walked), modules, immutable values.
_NOT_COPIED = (Tensor, nn.Module, Mapping, Sequence, str, bytes, int, float, complex, type(None), torch.dtype,
               torch.device)


def _copy_object(obj: object, owner: nn.Module) -> object:
    # The memo maps what must stay shared to itself: a cache that refers to the model does not copy the model.
    memo: dict[int, Any] = {id(x): x for x in (*owner.modules(), *owner.parameters(), *owner.buffers())}
    try:
        return copy.deepcopy(obj, memo)
    except Exception:  # an object that cannot be copied (a handle, a stream) is passed as it is
        return obj


def _tensors(value: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(value, Tensor, found.append)
    return found


def _difference(a: Any, b: Any) -> str | None:
    """``None`` when two outputs are equal within float tolerance, else a short description of the difference."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return f"{len(ta)} vs {len(tb)} tensors"
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape:
            return f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True):
                return f"max abs difference {float((x - y).abs().max()):.3g}"
        elif not torch.equal(x, y):
            return "integer outputs differ"
    return None


class _Replay:
    """Makes modules allowed to be random (MC dropout) give their first output again on the second run."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.outputs: dict[int, list[Any]] = {}
        self.replaying = False
        self.position: dict[int, int] = {}

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        key = id(module)
        if self.replaying:
            i = self.position.get(key, 0)
            self.position[key] = i + 1
            recorded = self.outputs.get(key, [])
            return recorded[i] if i < len(recorded) else output
        self.outputs.setdefault(key, []).append(output)
        return output

    def record(self) -> None:
        self.outputs, self.position, self.replaying = {}, {}, False

    def replay(self) -> None:
        self.position, self.replaying = {}, True


@contextmanager
def _preserved_state(model: nn.Module, allowed: list[nn.Module]) -> Iterator[_Replay]:
    """Put back the model's buffers and metric states, the RNGs and the allowed modules' flags, whatever happens."""
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    buffers = _save_buffers(model)
    metrics = save_states([model])
    flags = [m.training for m in allowed]
    replay = _Replay(allowed)
    handles = [m.register_forward_hook(replay.hook) for m in allowed]
    try:
        for m in allowed:  # allowed train-mode modules run in eval for the probe: no state updates, less randomness
            m.training = False
        yield replay
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(allowed, flags, strict=True):
            m.training = flag
        _restore_buffers(buffers)
        restore_states(metrics)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


#: Per module: its buffer dict's entries before the probe, each with a copy of its content.
_SavedBuffers = list[tuple[nn.Module, dict[str, tuple[Tensor | None, Tensor | None]]]]


def _save_buffers(model: nn.Module) -> _SavedBuffers:
    saved: _SavedBuffers = []
    for module in model.modules():
        if module._buffers and not is_metric(module):
            saved.append((module, {
                name: (t, t.detach().clone() if t is not None else None) for name, t in module._buffers.items()
            }))
    return saved


def _restore_buffers(saved: _SavedBuffers) -> None:
    """Each buffer object back in its place with its content; buffers the probe's runs added are removed."""
    with torch.no_grad():
        for module, entries in saved:
            for name in [n for n in module._buffers if n not in entries]:
                del module._buffers[name]
            for name, (original, content) in entries.items():
                module._buffers[name] = original  # a forward that replaced the tensor left the original untouched
                if original is not None and content is not None and original.shape == content.shape:
                    original.copy_(content)
