"""README.md: the generated field and settings references match the code."""

from __future__ import annotations

from pathlib import Path

from storage.docgen import config_reference, field_reference, render
from storage.records import RECORD_TYPES

DOC = Path(__file__).resolve().parents[2] / "README.md"


def test_doc_matches_the_structs_and_config():
    text = DOC.read_text(encoding="utf-8")
    assert render(text) == text, "README.md is stale: run `python -m storage.docgen README.md`"


def test_every_field_of_every_kind_is_documented():
    ref = field_reference()
    for t in RECORD_TYPES:
        assert f"#### `{t.__struct_config__.tag}`" in ref
        for f in t.__struct_fields__:
            assert f"| `{f}` |" in ref
    for line in ref.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented: {line}"
    assert "| `retention_days` | `180` |" in config_reference()
