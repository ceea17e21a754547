"""``ModeCheck``'s arguments, checked together: one error that lists every problem and repeats the call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lightning_validate.engine.names import glob_problem
from lightning_validate.findings import CODES, Policy

__all__ = ["parse_arguments"]


def parse_arguments(
    *,
    on_violation: object,
    allow_train_mode: object,
    allow_eval_mode: object,
    allow_grad: object,
    ignore: object,
    probe: object,
    report_path: object,
    verbose: object,
) -> Policy:
    """Check every argument of ``ModeCheck``; return the violation policy.

    Raises:
        ValueError: naming the call as written (arguments that differ from their defaults) and each problem.

    Example:
        >>> parse_arguments(on_violation="raise", allow_train_mode=(), allow_eval_mode=(), allow_grad=False,
        ...                 ignore=(), probe=False, report_path=None, verbose=True)
        <Policy.RAISE: 'raise'>

    """
    given = {
        "on_violation": (on_violation, "warn"), "allow_train_mode": (allow_train_mode, ()),
        "allow_eval_mode": (allow_eval_mode, ()), "allow_grad": (allow_grad, False), "ignore": (ignore, ()),
        "probe": (probe, False), "report_path": (report_path, None), "verbose": (verbose, True),
    }
    problems: list[str] = []
    policy = Policy.parse(on_violation)
    if policy is None:
        problems.append(f"Expected `on_violation` to be 'warn' or 'raise' but got {on_violation!r}.")
    for arg in ("allow_train_mode", "allow_eval_mode"):
        problem = glob_problem(arg, given[arg][0])
        if problem is not None:
            problems.append(problem)
    for arg in ("allow_grad", "probe", "verbose"):
        if not isinstance(given[arg][0], bool):
            problems.append(f"Expected `{arg}` to be True or False but got {given[arg][0]!r}.")
    problems += _ignore_problems(ignore)
    problems += _report_path_problems(report_path)
    if problems or policy is None:
        call = ", ".join(f"{k}={v!r}" for k, (v, default) in given.items() if _differs(v, default))
        raise ValueError(f"`ModeCheck({call})` is not valid. " + " ".join(problems))
    return policy


def _ignore_problems(ignore: object) -> list[str]:
    if isinstance(ignore, str) or not isinstance(ignore, Sequence):
        return [f"Expected `ignore` to be a list of finding codes but got {ignore!r}"
                + (f": write `ignore=[{ignore!r}]`." if isinstance(ignore, str) else ".")]
    unknown = [c for c in ignore if c not in CODES]
    if unknown:
        return [f"Unknown finding code(s) in `ignore`: {', '.join(map(repr, unknown))}. Valid codes: "
                f"{', '.join(CODES)}."]
    return []


def _report_path_problems(report_path: object) -> list[str]:
    if report_path is None:
        return []
    if not isinstance(report_path, (str, os.PathLike)):
        return [f"Expected `report_path` to be a file path (str or os.PathLike) or None but got {report_path!r}."]
    if Path(report_path).is_dir():
        return [f"Expected `report_path` to be a file path but {str(report_path)!r} is a directory: "
                f"`report_path={os.path.join(str(report_path), 'modecheck.json')!r}`."]
    return []


def _differs(value: object, default: object) -> bool:
    try:
        return bool(value != default)
    except Exception:  # an argument whose `!=` is not a plain bool (an array): show it
        return True
