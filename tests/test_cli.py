"""`examples/cli.py` with `examples/cli_config.yaml`: ModeCheck and the ValidationMixin model configured from YAML."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_validate import ModeCheck

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], Any]:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # examples/cli.py imports its model from examples/digits.py
    monkeypatch.setattr("sys.argv", ["cli.py"])  # LightningCLI warns when pytest's own arguments sit next to `args`
    # Lightning 2.6.6's LightningCLI calls a jsonargparse API deprecated in jsonargparse 4.4x: not ours to fix.
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    return importlib.import_module("cli").main  # type: ignore[no-any-return]


def test_cli_config_builds_modecheck_and_fits(cli_main: Callable[[list[str]], Any], tmp_path: Path) -> None:
    cli = cli_main([
        "fit",
        "--config", str(EXAMPLES / "cli_config.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.hidden=32",
    ])
    checks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModeCheck)]
    assert len(checks) == 1
    assert checks[0].on_violation == "raise"  # from the YAML's init_args
    assert checks[0].findings == []
    assert cli.model.hparams.hidden == 32
    assert cli.trainer.current_epoch == 1
    assert {"val/loss", "val/acc", "val/f1"} <= set(cli.trainer.callback_metrics)
    assert checks[0].probe is True
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["best-epoch=0.ckpt"]  # epochs count from 0, as on the bar
