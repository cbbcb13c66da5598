"""Pool files built byte by byte, and other processes that lock them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvpfs.kvp.records import KEY_FIELD_SIZE, VALUE_FIELD_SIZE

HERE = Path(__file__).parent


def raw_record(key: bytes, value: bytes, key_junk: bytes = b"", value_junk: bytes = b"") -> bytes:
    """A record as other writers leave them: leftovers after each field's NUL."""
    raw_key = (key + b"\0" + key_junk)[:KEY_FIELD_SIZE].ljust(KEY_FIELD_SIZE, b"\0")
    raw_value = (value + b"\0" + value_junk)[:VALUE_FIELD_SIZE].ljust(VALUE_FIELD_SIZE, b"\0")
    return raw_key + raw_value


def child_env() -> dict[str, str]:
    """The environment for a helper process that imports kvpfs from this tree."""
    env = dict(os.environ)
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def lock_held(path: Path, kind: str, *, shared: bool = False, seconds: float = 30.0) -> Iterator[
    subprocess.Popen[str]
]:
    """Another process holds a lock (``ofd``, ``posix`` or ``flock``) on ``path``.

    The lock is taken when the context is entered and released when the process
    exits (after ``seconds`` or when the context ends).
    """
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "lockholder.py"), str(path), kind,
         "sh" if shared else "ex", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
