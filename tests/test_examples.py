"""The examples run end to end, and the README's Quickstart is what `.ci/run` executes.

The scripts run as a user runs them (a subprocess, `python examples/<name>.py`), so their own warning filters and
output are what is tested.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args: str, timeout: float = 120) -> str:
    # Unbuffered, stderr into stdout: the warnings and the prints come out in the order a user sees them.
    proc = subprocess.run(
        [sys.executable, "-u", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _quickstart_commands() -> list[str]:
    """The commands between the README markers, read the way `.ci/run` reads them."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart:begin -->\n(.*?)<!-- quickstart:end -->", text, re.S)
    assert block, "README.md lost its <!-- quickstart:begin/end --> markers, which .ci/run reads"
    return [
        line.strip() for line in block.group(1).splitlines()
        if line.strip() and not line.strip().startswith(("```", "<!--"))
    ]


def test_readme_quickstart_is_two_commands_run_by_ci() -> None:
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert "torch==2.13.0" in commands[0]
    assert "python examples/digits.py" in commands[0]
    assert "python -m pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "quickstart:begin" in ci and "quickstart:end" in ci
    assert "mkdocs build --strict" in ci and "ruff check ." in ci and "mypy" in ci


def test_catch_a_bug_reports_the_unfrozen_batchnorm_with_its_fix() -> None:
    out = _run(str(EXAMPLES / "catch_a_bug.py"))
    assert "LV205" in out, out
    assert "`backbone`" in out, out  # the frozen block, by its qualified name
    assert "statistics changed by training: YES" in out and "statistics changed by training: no" in out, out
    assert "on_validation_model_train" in out, out  # the fix names the override to remove
    assert "findings: buggy " in out and ", fixed 0" in out, out
    assert not re.search(r"findings: buggy 0,", out), out
    shown = re.search(r"\$ python examples/catch_a_bug\.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert shown, "README.md lost the output block of examples/catch_a_bug.py"
    assert shown.group(1).strip() == out.strip(), "README.md shows an outdated output of catch_a_bug.py; paste:\n" + out


def test_digits_fast_run_writes_logs_plot_and_reports_test_accuracy(tmp_path: Path) -> None:
    out = _run(str(EXAMPLES / "digits.py"), "--fast", "--no-progress-bar", "--out", str(tmp_path))
    log_dir = tmp_path / "logs" / "version_0"
    metrics_csv = log_dir / "metrics.csv"
    plot = log_dir / "curves.png"
    assert metrics_csv.is_file(), out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with metrics_csv.open(newline="") as f:
        columns = set(csv.DictReader(f).fieldnames or [])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= columns
    number = r"(\d\.\d+)"
    interval = rf"{number} \[{number}, {number}\]"  # each value with its 95% interval
    acc = re.search(rf"^acc\s+{interval}\s+{interval}$", out, re.M)
    assert acc, out
    val_acc, val_low, val_high, test_acc, test_low, test_high = map(float, acc.groups())
    assert 0.5 < val_acc <= 1 and 0.5 < test_acc <= 1  # 2 epochs; the full run reaches ~0.97
    assert val_low < val_acc < val_high and test_low < test_acc < test_high
    assert {"val/acc_low", "val/acc_high", "val/loss_low"} <= columns
    assert "ModeCheck: clean" in out, out
    assert "Tip" not in out and "Warning" not in out, out  # nothing the user did not cause
    assert re.search(r"best-epoch=[01]\.ckpt", out), out  # epochs count from 0 here, on the bar and in the plot


def test_cli_example_prints_nothing_the_user_did_not_cause(tmp_path: Path) -> None:
    """No advertising tips and no TensorBoard notice: the config names its logger and checkpoint callback."""
    out = _run(str(EXAMPLES / "cli.py"), "fit", "--config", str(EXAMPLES / "cli_config.yaml"),
               "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
               f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
    assert "Tip" not in out and "tensorboard" not in out.lower() and "Warning" not in out, out
    assert "ModeCheck (fit): " in out and "no findings" in out, out


def test_language_model_logs_one_loss_and_ppl_at_every_batch_size() -> None:
    out = _run(str(EXAMPLES / "language_model.py"), "--fast", "--no-progress-bar")
    rows = re.findall(r"^\s+(1|8|64)\s+(\d\.\d{6})\s+(\d+\.\d{4})\s+(\d\.\d{4})\s+\|\s+(\d\.\d{6})\s+(\d+\.\d{4})$",
                      out, re.M)
    assert [row[0] for row in rows] == ["1", "8", "64"], out
    reference = re.search(r"token mean over the set \(a plain float64 loop\): (\d\.\d{6}), perplexity (\d+\.\d{4})",
                          out)
    assert reference, out
    assert {row[1:4] for row in rows} == {(reference.group(1), reference.group(2), rows[0][3])}, out  # one value
    assert abs(float(rows[0][1]) - math.log(float(rows[0][2]))) < 1e-4
    assert 0 <= float(rows[0][3]) <= 1
    assert abs(float(rows[0][4]) - float(reference.group(1))) > 1e-3, out  # batch means at batch size 1: off
    assert "Warning" not in out, out
