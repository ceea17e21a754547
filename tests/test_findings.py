"""Tests of findings: the message format, JSON export, the error and warning classes, and the codes' docs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lightning_validate.findings import CODES, Finding, ModeCheckError, ModeCheckWarning

DOCS = Path(__file__).resolve().parents[1] / "docs" / "codes.md"


def _finding(**kwargs: str) -> Finding:
    fields = {"code": "LV205", "module": "backbone.bn1", "phase": "validate", "boundary": "on_validation_end",
              "expected": "eval mode as before evaluation", "seen": "backbone.bn1 (BatchNorm2d) in train mode",
              "fix": "`model.backbone.bn1.eval()`"}
    return Finding(**{**fields, **kwargs})


def test_message_format() -> None:
    f = _finding()
    assert f.message == (
        "LV205 submodule mode not restored after evaluation: `backbone.bn1` at validate/on_validation_end: "
        "expected eval mode as before evaluation, saw backbone.bn1 (BatchNorm2d) in train mode. "
        "Fix: `model.backbone.bn1.eval()`"
    )
    assert str(f) == f.message
    assert f.title == CODES["LV205"]


def test_message_with_detail_and_without_boundary() -> None:
    f = _finding(boundary="", detail="covers 12 submodules; changed in on_validation_epoch_end")
    assert f.message == (
        "LV205 submodule mode not restored after evaluation: `backbone.bn1` at validate: expected eval mode as "
        "before evaluation, saw backbone.bn1 (BatchNorm2d) in train mode (covers 12 submodules; changed in "
        "on_validation_epoch_end). Fix: `model.backbone.bn1.eval()`"
    )


def test_message_is_one_line() -> None:
    assert "\n" not in _finding(detail="x").message


def test_key_ignores_the_boundary() -> None:
    a, b = _finding(boundary="on_validation_batch_start"), _finding(boundary="on_validation_end")
    assert a.key == b.key == ("LV205", "backbone.bn1", "validate")
    assert a.key != _finding(phase="test").key


def test_to_dict_is_json_serializable_and_round_trips() -> None:
    f = _finding(detail="covers 3 submodules")
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["title"] == CODES["LV205"] and d["message"] == f.message
    names = [field.name for field in dataclasses.fields(Finding)]
    assert Finding(**{n: d[n] for n in names}) == f
    assert set(d) == {*names, "title", "message"}


def test_findings_are_frozen_and_hashable() -> None:
    f = _finding()
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "LV101"  # type: ignore[misc]
    assert len({f, _finding()}) == 1


def test_an_undocumented_code_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `code` to be one of the documented codes \(LV101, LV102, "
                                         r".*LV402\) but got 'LV999'. Add a new code to `CODES` and a section to "
                                         r"docs/codes.md first."):
        _finding(code="LV999")


def test_error_and_warning_classes() -> None:
    f = _finding()
    findings = [f]
    err = ModeCheckError("found one", findings)
    findings.append(f)  # the error keeps its own list
    assert isinstance(err, RuntimeError) and str(err) == "found one" and err.findings == [f]
    assert ModeCheckError("none").findings == []
    assert issubclass(ModeCheckWarning, UserWarning)
    with pytest.warns(ModeCheckWarning, match=r"^LV205 submodule mode not restored"):
        import warnings

        warnings.warn(f.message, ModeCheckWarning, stacklevel=1)


def test_codes_are_well_formed_and_sorted() -> None:
    assert list(CODES) == sorted(CODES)
    assert all(re.fullmatch(r"LV[1-4]\d\d", code) for code in CODES)
    assert all(title and title == title.strip() and not title.endswith(".") for title in CODES.values())


def _doc_sections() -> dict[str, tuple[str, str]]:
    """``code -> (title, body)`` for every ``## LVxxx: title`` heading of docs/codes.md."""
    text = DOCS.read_text(encoding="utf-8")
    parts = re.split(r"^## (LV\d{3}): (.+)$", text, flags=re.MULTILINE)
    return {parts[i]: (parts[i + 1].strip(), parts[i + 2]) for i in range(1, len(parts), 3)}


def test_every_code_is_documented_with_its_title() -> None:
    sections = _doc_sections()
    assert list(sections) == list(CODES), "docs/codes.md must have one section per code, in order"
    for code, (title, _) in sections.items():
        assert title == CODES[code], code


@pytest.mark.parametrize("code", list(CODES))
def test_every_section_has_example_message_fix_and_non_triggers(code: str) -> None:
    _, body = _doc_sections()[code]
    for heading in ("### Example", "### Message", "### Fix", "### Not reported"):
        assert heading in body, f"{code}: missing {heading!r}"
    assert "```python" in body, f"{code}: no code example"
    message = re.search(r"### Message\s+```text\n(.+?)\n```", body, flags=re.DOTALL)
    assert message is not None, f"{code}: the message must be a ```text block"
    assert message.group(1).startswith(f"{code} {CODES[code]}: `"), code


def _engine_messages() -> dict[str, str]:
    """Run the scenarios of docs/codes.md through the engine: code -> the first message it gave."""
    import torch
    from torch import nn

    from lightning_validate import evaluating
    from lightning_validate.engine import check_eval_state, check_train_state, compare, take_snapshot

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(288, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    out: dict[str, str] = {}

    def keep(findings: list[Finding]) -> None:
        for f in findings:
            out.setdefault(f.code, f.message)

    def checked(body: object) -> None:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with evaluating(model, check=True):
                body()  # type: ignore[operator]
        for w in caught:
            out.setdefault(str(w.message).split()[0], str(w.message))

    model.eval()
    model.head[1].train()
    keep(check_eval_state(model, phase="validate", boundary="on_validation_batch_start", allow_grad=True))
    model.eval()
    keep(check_eval_state(model, phase="validate", boundary="on_validation_batch_start"))
    model.train()
    checked(lambda: model.head[2].weight.data.clamp_(-0.01, 0.01))
    checked(lambda: (model.backbone.train(), model(x)))
    checked(lambda: model.backbone.requires_grad_(False))
    model.backbone.requires_grad_(True)

    def backward() -> None:
        with torch.enable_grad():
            model(x).sum().backward()

    checked(backward)
    model.zero_grad(set_to_none=True)
    model.backbone.eval()
    before = take_snapshot(model)
    model.eval()
    model.train()
    keep(compare(before, take_snapshot(model), phase="validate", boundary="on_validation_model_train"))
    before = take_snapshot(model)
    model.aux = nn.Linear(8, 2)
    keep(compare(before, take_snapshot(model), phase="validate", boundary="on_validation_end"))
    del model.aux
    with torch.no_grad():
        keep(check_train_state(model, boundary="on_train_batch_start"))
    model.backbone.eval()
    keep(check_train_state(model, boundary="on_train_batch_start (first of the epoch)"))
    return out


def test_documented_messages_match_what_the_engine_says() -> None:
    def masked(text: str) -> str:  # the numbers of a value change depend on the random initialization
        return re.sub(r"-?\d+\.\d+(e-?\d+)?", "<number>", text)

    produced = _engine_messages()
    assert set(produced) >= {"LV101", "LV102", "LV201", "LV202", "LV203", "LV204", "LV205", "LV206", "LV301",
                             "LV302"}
    sections = _doc_sections()
    for code, message in produced.items():
        documented = re.search(r"### Message\s+```text\n(.+?)\n```", sections[code][1], flags=re.DOTALL)
        assert documented is not None
        assert masked(documented.group(1)) == masked(message), code
