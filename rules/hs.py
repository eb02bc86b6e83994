"""Hyperscan where it is installed: the optional import and per-thread scratch space.

A Hyperscan scratch serves one scan at a time, and the Engine is asked from several
threads (the proxy's loop, replay workers, tests), so each database gets one scratch
per thread (``ThreadScratch``). The binding keeps no reference to a match callback:
callers pass module-level functions, never a temporary lambda (that segfaults).
"""

from __future__ import annotations

import threading
from typing import Any

try:  # pragma: no branch
    import hyperscan
except ImportError:  # pragma: no cover - hyperscan is a dependency on x86-64
    hyperscan = None  # type: ignore[assignment]

__all__ = ["ThreadScratch", "hyperscan"]


class ThreadScratch:
    """The scratch space of one database, one per thread, made on first use there."""

    __slots__ = ("_db", "_local")

    def __init__(self, db: Any) -> None:
        self._db = db
        self._local = threading.local()

    def get(self) -> Any:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = hyperscan.Scratch(self._db)
        return s
