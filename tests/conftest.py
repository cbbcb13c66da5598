"""Shared fixtures: in-process kvpfs mounts that are always unmounted."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from kvpfs.fs.mount import Session, fuse_options, serve
from kvpfs.fs.operations import FsOptions, Operations
from kvpfs.fs.view import View
from tests.mounting import stop_sessions


def fuse_usable() -> str | None:
    """Why mount tests cannot run here, or None if they can."""
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc}"
    os.close(fd)
    if os.geteuid() != 0:
        return "mount tests need root"
    return None


MountFactory = Callable[..., Awaitable[Session]]


@pytest.fixture
async def mount(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[MountFactory]:
    """``await mount([views], options=FsOptions(...), read_only=False)`` -> Session.

    The mountpoint is ``session.mountpoint``.  Teardown stops the session and, if
    the kernel still lists the mount, detaches it lazily, whatever the test did.
    """
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    sessions: list[Session] = []

    async def factory(
        views: Sequence[View],
        options: FsOptions | None = None,
        *,
        read_only: bool = False,
        allow_other: bool = False,
    ) -> Session:
        mnt = tmp_path / f"mnt{len(sessions)}"
        mnt.mkdir()
        ops = Operations(views, options or FsOptions())
        opts = fuse_options(read_only=read_only, allow_other=allow_other)
        session: Session = await nursery.start(serve, ops, str(mnt), opts)
        sessions.append(session)
        return session

    try:
        yield factory
    finally:
        await stop_sessions(sessions)
