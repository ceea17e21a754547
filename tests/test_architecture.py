"""The import direction of the layers (docs/architecture.md): each layer imports only the layers below it.

Read from the source with ``ast`` (lazy imports inside functions count too), so a new import that crosses a layer
fails here with the module and the line, before it becomes a cycle or drags Lightning into plain PyTorch code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_validate"

#: Layer of each part of the package -> what it may import: packages of ours and third-party distributions.
#: Lightning (``lightning``) is allowed only in the Lightning adapters and ``stages``.
LAYERS: dict[str, tuple[set[str], set[str]]] = {
    "findings": (set(), {"torch"}),
    "engine": ({"findings", "engine"}, {"torch"}),
    "metrics": ({"metrics"}, {"torch", "torchmetrics", "lightning_utilities"}),
    "progress": (set(), set()),
    "stages": (set(), {"lightning"}),
    "plain": ({"findings", "engine", "metrics", "progress", "plain"}, {"torch", "torchmetrics", "tqdm"}),
    "mode_check": ({"findings", "engine", "metrics", "stages", "mode_check"},
                   {"torch", "torchmetrics", "lightning", "lightning_utilities", "typing_extensions"}),
    "mixin": ({"findings", "engine", "metrics", "progress", "stages", "mixin"},
              {"torch", "torchmetrics", "lightning", "lightning_utilities", "typing_extensions", "tqdm", "rich"}),
    # The command line of the paired comparison: records (metrics) or checkpoints validated by Lightning.
    "paired": ({"metrics"}, {"torch", "lightning"}),
}
TOP = {"__init__", "__about__"}  # the package's front door re-exports every layer


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "lightning_validate.<relative>"))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if part_of(p) not in TOP)


def test_every_module_belongs_to_a_layer() -> None:
    assert {part_of(p) for p in MODULES} <= set(LAYERS), "a new part of the package: add it to LAYERS and the docs"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_go_down_the_layers_only(path: Path) -> None:
    ours, third_party = LAYERS[part_of(path)]
    wrong = []
    for line, name in imports(path):
        top = name.split(".")[0]
        if top == "lightning_validate":
            target = name.split(".")[1] if "." in name else "__init__"
            if target not in ours:
                wrong.append(f"line {line}: {name}")
        elif top in {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "lightning_utilities",
                     "tqdm", "rich", "typing_extensions", "torch"} and top not in third_party:
            wrong.append(f"line {line}: {name}")
    assert not wrong, f"{path.relative_to(PACKAGE)} imports across its layer: {wrong}"


def test_the_engine_speaks_no_lightning() -> None:
    """The engine's words too: its messages must not send a plain PyTorch user to a Lightning hook."""
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "on_validation" not in text and "LightningModule" not in text, path.name
