"""``-o timeout=S`` bounds a KVP change's wait for another process's lock: EIO.

The command as a user runs it, with another process holding the guest pool's
lock (each lock family hv_kvp_daemon and cloud-init use) for longer than S.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tests.kvp.helpers import lock_held
from tests.mount.cli_support import run
from tests.mount.kvp_fixtures import Pools, rec
from tests.mounting import write_bytes

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("private_runtime_dir")]

TIMEOUT = 1.5


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_a_write_behind_a_held_lock_is_eio_after_timeout(
    mnt: Path, pools: Pools, kind: str
) -> None:
    pools.set_bytes("guest", rec(b"k", b"old"))
    result = run(
        str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", "off",
        "-o", f"timeout={TIMEOUT:g}",
    )
    assert result.returncode == 0, result.stderr
    key = mnt / "kvp/guest/k"
    assert key.read_bytes() == b"old\n"
    before = pools.bytes("guest")
    with lock_held(pools.path("guest"), kind, seconds=30):
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            write_bytes(key, b"new\n")
        waited = time.monotonic() - start
        assert info.value.errno == errno.EIO
        assert TIMEOUT * 0.9 <= waited < TIMEOUT + 3, waited
        assert pools.bytes("guest") == before
    # Once the lock is free, the same write goes through at once.
    start = time.monotonic()
    write_bytes(key, b"new\n")
    assert time.monotonic() - start < 2
    assert pools.bytes("guest") == rec(b"k", b"new")
    assert os.listdir(mnt / "kvp/guest") == ["k"]
