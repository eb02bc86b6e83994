"""Shared fixtures: where the read-only test corpus lives."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("LINEWARDEN_CORPUS", ROOT.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "README.md").exists():
        pytest.skip(f"test corpus not found at {CORPUS} (set LINEWARDEN_CORPUS)")
    return CORPUS


CORPUS_CATEGORIES = ("gambling", "fake_invoice", "weapons", "drugs", "fraud")


def write_corpus_ruleset(corpus_dir: Path, out: Path) -> Path:
    """The corpus rules as a linewarden rule-set directory.

    keywords.tsv is already in linewarden's format; domains.txt is the corpus's
    own: an exact ``name`` becomes ``=name`` and ``*.name`` stays (corpus README).
    """
    out.mkdir(parents=True, exist_ok=True)
    cats = "".join(f'[categories.{c}]\naction = "block"\n\n' for c in CORPUS_CATEGORIES)
    (out / "ruleset.toml").write_text(f'name = "corpus"\nversion = 1\n\n{cats}', encoding="utf-8")
    (out / "keywords.tsv").write_bytes((corpus_dir / "rules" / "keywords.tsv").read_bytes())
    rows = ["id\tcategory\tdomain"]
    for n, line in enumerate((corpus_dir / "rules" / "domains.txt").read_text("utf-8").splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        pattern, category = line.split("\t")[:2]
        if not pattern.startswith("*."):
            pattern = "=" + pattern
        rows.append(f"D{n:05d}\t{category}\t{pattern}")
    (out / "domains.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def corpus_rules(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rule-set directory holding the corpus's keywords and domains."""
    return write_corpus_ruleset(corpus, tmp_path_factory.mktemp("corpus-rules"))


async def kill_first_worker_and_await_restart(pool: Any) -> None:
    """SIGKILL a ``WorkerPool``'s first worker (a process the test started, by its pid)
    and wait until the pool has started another in its place."""
    old = pool.workers[0].process
    os.kill(old.pid, signal.SIGKILL)
    for _ in range(300):
        if pool.restarts == 1:
            break
        await asyncio.sleep(0.1)
    assert pool.restarts == 1 and pool.workers[0].process.pid != old.pid
