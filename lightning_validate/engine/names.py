"""Qualified names: looking through wrappers, walking a module once, glob allowlists, and grouping names.

Names are those of the user's model whether it is compiled, wrapped by DDP, FSDP or activation checkpointing:
the segments such wrappers insert are removed. FSDP2's ``fully_shard`` inserts no segment but swaps each sharded
module's class for a subclass (``FSDPLinear``); ``class_name`` gives the user's class back.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1))
    >>> list(named_modules(unwrap(torch.nn.DataParallel(net))))
    ['', '0']
    >>> Globs.parse("allow_train_mode", ["head.drop*"]).covers("head.drop1.inner")
    True

"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["Globs", "ancestors", "class_name", "covers", "glob_problem", "group", "named_modules", "unwrap", "walk"]

#: Attribute segments that wrappers insert into qualified names; removed so that names stay those of the user's
#: model whether it is compiled, wrapped by FSDP or activation checkpointing.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

#: The attribute of FSDP1's flat parameter, which holds all the parameters of a wrapped module.
_FLAT_PARAM = "_flat_param"


def unwrap(model: nn.Module) -> nn.Module:
    """Return the user's module inside ``torch.compile``, DDP/DataParallel and framework wrappers.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True

    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner: object = model.__dict__.get("_modules", {}).get("_orig_mod")  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if inner is None:  # wrappers that keep the module as `_forward_module` (Fabric's and Lightning's)
            inner = model.__dict__.get("_modules", {}).get("_forward_module")
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def class_name(module: nn.Module) -> str:
    """The name of the user's class of ``module``, also when FSDP2 swapped it for ``FSDP<class>``.

    ``fully_shard`` makes each sharded module an instance of ``type("FSDP" + cls.__name__, (FSDPModule, cls))``;
    messages name ``Linear``, not ``FSDPLinear``.

    Example:
        >>> import torch
        >>> class FSDPModule: ...
        >>> FSDPLinear = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
        >>> class_name(torch.nn.Linear(1, 1)), class_name(FSDPLinear(1, 1))
        ('Linear', 'Linear')

    """
    cls = type(module)
    bases = cls.__bases__
    if (len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == "FSDP" + bases[1].__name__):
        return bases[1].__name__
    return cls.__name__


def _clean(name: str) -> str:
    if "_orig_mod" not in name and "_wrapped_module" not in name:  # the common case, checked cheaply
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map each cleaned qualified name to its submodule.

    A compiled submodule appears twice (wrapper, then the module it wraps) under one cleaned name: the wrapped
    module, listed second, wins.
    """
    return {_clean(n): m for n, m in model.named_modules()}


def walk(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """Submodules, parameters and buffers in one walk (three ``named_*`` walks cost three times as much).

    Shared parameters and buffers are listed once, under their first name, as ``named_parameters()`` does. FSDP1's
    flat parameter (``use_orig_params=False``) holds every parameter of its unit: it is named by the unit's module.
    """
    modules = named_modules(model)
    params: list[tuple[str, Tensor]] = []
    buffers: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for name, module in modules.items():
        prefix = name + "." if name else ""
        for out, members in ((params, module._parameters), (buffers, module._buffers)):
            for key, t in members.items():
                if t is not None:
                    i = id(t)
                    if i not in seen:
                        seen.add(i)
                        out.append((name if key == _FLAT_PARAM else prefix + key, t))
    return modules, params, buffers


def glob_problem(argument: str, value: object) -> str | None:
    """Say what is wrong with a list of names or glob patterns given as ``argument``; ``None`` when it is fine.

    A bare string would silently be read as one pattern per character, so it is refused with the fix.
    """
    if isinstance(value, str):
        return (f"Expected `{argument}` to be a list of names or glob patterns but got the string {value!r}: write "
                f"`{argument}=[{value!r}]`.")
    if not isinstance(value, Sequence | set | frozenset) or not all(isinstance(p, str) for p in value):
        shown = list(value) if isinstance(value, Iterable) else value
        return f"Expected `{argument}` to be a list of names or glob patterns (str) but got {shown!r}."
    return None


class Globs(tuple[str, ...]):
    """Names or glob patterns of submodules, validated once where the user passed them.

    A pattern that names a submodule covers its descendants too, so allowing ``"head.mc_dropout"`` allows
    ``"head.mc_dropout.inner"``.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, argument: str, value: object) -> Globs:
        """Validate ``value`` (the user's ``argument``) once; a ``Globs`` passes through unchanged.

        Raises:
            TypeError: if ``value`` is a string or not a list of strings.
        """
        if isinstance(value, Globs):
            return value
        problem = glob_problem(argument, value)
        if problem is not None:
            raise TypeError(problem)
        return cls(value)  # type: ignore[arg-type]

    def covers(self, name: str) -> bool:
        """Whether ``name``, or one of its ancestors, matches one of the patterns.

        Example:
            >>> Globs(["head.drop"]).covers("head.drop.inner"), Globs(["*.drop*"]).covers("head.fc")
            (True, False)

        """
        if not self:
            return False
        parts = name.split(".") if name else []
        candidates = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
        return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in self)


def ancestors(name: str) -> list[str]:
    """List the root, then each prefix of ``name``, then ``name`` itself (top-down)."""
    if not name:
        return [""]
    parts = name.split(".")
    return ["", *(".".join(parts[:k]) for k in range(1, len(parts) + 1))]


def group(changed: Iterable[str], universe: Iterable[str], *, root: bool = True) -> list[tuple[str, int]]:
    """Collapse names into the topmost prefixes all of whose members changed, with how many each covers.

    Fifty BatchNorm layers of a backbone un-frozen together are one finding about ``backbone``, not fifty.
    With ``root=False`` nothing collapses into the whole model: "the model's tensors changed" names nothing.

    Example:
        >>> group(["a.0", "a.1"], ["a.0", "a.1", "b"])
        [('a', 2)]

    """
    changed = list(dict.fromkeys(changed))
    if not changed:
        return []
    changed_set = set(changed)
    total: dict[str, int] = {}
    hits: dict[str, int] = {}
    for name in universe:
        inside = name in changed_set
        for anc in ancestors(name):
            total[anc] = total.get(anc, 0) + 1
            if inside:
                hits[anc] = hits.get(anc, 0) + 1
    out: dict[str, int] = {}
    for name in changed:
        chain = ancestors(name)[0 if root else 1:]
        for k, anc in enumerate(chain):
            # A prefix that is not itself a member only absorbs groups of two or more: one changed tensor is
            # named by its own name, not by its module's.
            if total.get(anc, 0) and hits.get(anc, 0) == total[anc] and (anc == name or total[anc] > 1):
                # A deeper prefix with the same members names them more precisely: `backbone.1`, not `backbone`,
                # when the backbone's only buffers are those of its one BatchNorm.
                while k + 1 < len(chain) and total.get(chain[k + 1], 0) == total[anc]:
                    k += 1
                out.setdefault(chain[k], hits[chain[k]])
                break
        else:
            out.setdefault(name, 1)
    return list(out.items())


def covers(count: int, noun: str) -> str:
    """``"covers 3 submodules"`` for a group, ``""`` for a single member."""
    return f"covers {count} {noun}" if count > 1 else ""
