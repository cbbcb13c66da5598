"""The kvpfs command as a user runs it: a subprocess, found again by its command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

KVPFS = [sys.executable, "-m", "kvpfs.cli"]


def kvpfs_pid(mountpoint: Path) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # ``python -m kvpfs.cli``, the ``kvpfs`` entry point (also as mount.fuse3 runs it).
        ours = any(a.endswith((b"kvpfs", b"kvpfs.cli")) for a in argv)
        if ours and os.fsencode(str(mountpoint)) in argv:
            return int(entry)
    return None


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def run(*args: str, timeout: float = 20, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVPFS, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
