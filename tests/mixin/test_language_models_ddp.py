"""Under DDP a language model logs the single-process values: the token mean, its ``exp`` and an exact text metric.

``lm_ddp.GeneratingLM`` on 2 CPU processes (gloo), with ``ddp`` (the script launched again for rank 1) and
``ddp_spawn``: batch sizes 1, 8 and 64, the loss through the criterion and through the model's own loss, greedy
generation scored by ``CharErrorRate``. The references are plain loops over the whole set on this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_cases import PROMPT, BigramLM, char_error_rate, decode, token_mean, whole_set
from lm_ddp import PATHS, SIZES, data, run

ROOT = Path(__file__).resolve().parents[2]


def run_ddp(tmp_path: Path) -> dict[str, float]:
    out = tmp_path / "logged.json"
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "lm_ddp.py"), "ddp", str(out)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return {k: float(v) for k, v in json.loads(out.read_text()).items()}


def references(duplicate_first: bool = False) -> dict[str, float]:
    """Loss, perplexity and character error rate over the whole set; with ``duplicate_first``, what counting
    DistributedSampler's repeat (sample 0, on the second process) would give."""
    items, model = data(), BigramLM()
    if duplicate_first:
        items = [items[0], *items]
    seqs = [item["ids"] for item in items]
    loss = token_mean(whole_set(model, seqs))
    pairs = [(decode(model.generate(s[None, :PROMPT]))[0], decode(item["answer"][None])[0]) for s, item in
             zip(seqs, items, strict=True)]
    return {"loss": loss, "ppl": math.exp(loss), "cer": char_error_rate(pairs)}


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_loss_ppl_and_generated_text_are_exact_under_ddp(strategy: str, tmp_path: Path) -> None:
    logged = run_ddp(tmp_path) if strategy == "ddp" else run(strategy)
    ref, padded = references(), references(duplicate_first=True)
    for i in range(len(PATHS) * len(SIZES)):
        for name in ("loss", "ppl", "cer"):
            value = logged[f"val/{name}/dataloader_idx_{i}"]
            assert value == pytest.approx(ref[name], abs=1e-6, rel=1e-6), (strategy, name, i)
            assert abs(value - padded[name]) > 1e-4, (strategy, name, i)  # counting the repeat would show
