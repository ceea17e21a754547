"""Tests of the package surface: lazy Lightning import, a sorted and resolvable `__all__`, version, typing marker."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_validate


def test_import_does_not_import_lightning() -> None:
    # (tqdm is not checked: `import torch` imports it.)
    code = (
        "import sys, lightning_validate\n"
        "from lightning_validate import evaluating, take_snapshot, compare, CODES, Finding\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'lightning_fabric', 'torchmetrics'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_all_is_sorted_and_every_name_resolves() -> None:
    names = lightning_validate.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(lightning_validate, name) is not None, name
    assert set(names) <= set(dir(lightning_validate))


def test_version_matches_the_installed_metadata() -> None:
    assert lightning_validate.__version__ == importlib.metadata.version("lightning-validate")


def test_py_typed_is_shipped() -> None:
    package = Path(lightning_validate.__file__).parent
    assert (package / "py.typed").is_file()
    pyproject = (package.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert 'packages = ["lightning_validate"]' in pyproject  # hatchling ships every file of the package folder


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"^module 'lightning_validate' has no attribute 'no_such_name'$"):
        lightning_validate.no_such_name  # type: ignore[attr-defined]  # noqa: B018
