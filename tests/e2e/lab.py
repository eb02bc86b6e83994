"""The namespace lab as the end-to-end tests use it (deploy/lab.sh: client, gateway, server).

One place for what every lab test does: decide whether the lab can run here, bring
it up under a unique prefix, run commands inside its namespaces, wait for a process
to announce itself, and tear everything down (only the processes the test started,
by their own handles; then the namespaces).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "deploy" / "lab.sh"

LAB_SECONDS = 60
"""Bound on `lab.sh up`/`down` and on a process announcing itself: both take a few
seconds here; a minute means something is stuck, and the test must not hang."""


def skip_reason(tools: tuple[str, ...] = ("ip", "nft", "dnsmasq")) -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not LAB.exists():
        return f"{LAB} (the namespace lab script) is missing"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./dev.sh test installs it as root)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable here"
    return None


def ns(prefix: str, role: str) -> list[str]:
    """The command prefix that runs a command in the lab's ``role`` namespace."""
    return ["ip", "netns", "exec", f"{prefix}-{role}"]


def wait_for(path: Path, text: bytes, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``proc``'s log at ``path`` holds ``text``; fail if it exits or stalls."""
    deadline = time.monotonic() + LAB_SECONDS
    while text not in (path.read_bytes() if path.exists() else b""):
        assert proc.poll() is None, f"{what} exited: {path.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.2)


@contextlib.contextmanager
def lab_session(letters: str, tools: tuple[str, ...] = ("ip", "nft", "dnsmasq"),
                **ports: str) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Bring the lab up under ``letters`` + 4 random hex digits (parallel runs do not
    collide); yields (prefix, procs): append every process started, they are killed
    at the end. ``ports`` are lab.sh's variables (LW_DNS_PORT=..., LW_PROXY_PORT=...)."""
    reason = skip_reason(tools)
    if reason:
        pytest.skip(reason)
    prefix = letters + secrets.token_hex(2)
    env = dict(os.environ, LW_LAB=prefix, **ports)
    subprocess.run([str(LAB), "up"], env=env, check=True, capture_output=True, timeout=LAB_SECONDS)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield prefix, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by our own Popen handle: processes this test started
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        subprocess.run([str(LAB), "down"], env=env, capture_output=True, timeout=LAB_SECONDS)
