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
    fields = {"code": "LV205", "module": "backbone.bn1", "phase": "validation", "boundary": "on_validation_end",
              "expected": "eval mode as before evaluation", "seen": "backbone.bn1 (BatchNorm2d) in train mode",
              "fix": "`model.backbone.bn1.eval()`"}
    return Finding(**{**fields, **kwargs})


def test_message_format() -> None:
    f = _finding()
    assert f.message == (
        "LV205 submodule mode not restored after evaluation: `backbone.bn1` at validation/on_validation_end: "
        "expected eval mode as before evaluation, saw backbone.bn1 (BatchNorm2d) in train mode. "
        "Fix: `model.backbone.bn1.eval()`"
    )
    assert str(f) == f.message
    assert f.title == CODES["LV205"]


def test_message_with_detail_and_without_boundary() -> None:
    f = _finding(boundary="", detail="covers 12 submodules; changed in on_validation_epoch_end")
    assert f.message == (
        "LV205 submodule mode not restored after evaluation: `backbone.bn1` at validation: expected eval mode as "
        "before evaluation, saw backbone.bn1 (BatchNorm2d) in train mode (covers 12 submodules; changed in "
        "on_validation_epoch_end). Fix: `model.backbone.bn1.eval()`"
    )


def test_message_is_one_line() -> None:
    assert "\n" not in _finding(detail="x").message


def test_key_ignores_the_boundary() -> None:
    a, b = _finding(boundary="on_validation_batch_start"), _finding(boundary="on_validation_end")
    assert a.key == b.key == ("LV205", "backbone.bn1", "validation")
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
