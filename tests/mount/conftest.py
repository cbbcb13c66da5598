"""Fixtures of the mount tests: pool directories, and the kvpfs command run as a user would."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpfs.fs.mount import force_unmount, mounted_at
from kvpfs.kvp.location import create_pools
from tests.conftest import fuse_usable
from tests.mount.cli_support import kvpfs_pid, wait_gone
from tests.mount.kvp_fixtures import Pools


@pytest.fixture
def pools(tmp_path: Path) -> Pools:
    directory = tmp_path / "pools"
    directory.mkdir()
    create_pools(str(directory))
    return Pools(directory)



@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        pid = kvpfs_pid(path)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
        force_unmount(str(path))
        assert not mounted_at(str(path))


@pytest.fixture
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The embedded xenstored's socket goes to $XDG_RUNTIME_DIR/kvpfs: one per test.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    monkeypatch.delenv("XENSTORED_RUNDIR", raising=False)
