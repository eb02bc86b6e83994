"""Shared fixtures: where the read-only test corpus lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("LINEWARDEN_CORPUS", ROOT.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "README.md").exists():
        pytest.skip(f"test corpus not found at {CORPUS} (set LINEWARDEN_CORPUS)")
    return CORPUS
