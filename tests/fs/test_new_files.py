"""The open-file state machine carried out through a real mount: what reaches the
store, and when, for files created through the mount, shared by two writers,
unlinked or renamed before their first commit, or refused."""

from __future__ import annotations

import errno
import os
import time

import pytest

from tests.fs.memory_view import MemoryView
from tests.mounting import eventually, in_thread

pytestmark = pytest.mark.mount


@pytest.fixture
def store() -> MemoryView:
    b = MemoryView()
    b.add_dir(("d",))
    b.tree[("d",)]["k"] = b"old"
    return b


def writes(store: MemoryView) -> list[tuple[str, tuple[str, ...], bytes | None]]:
    return store.writes()


async def test_touch_stores_an_empty_value_at_release(mount, store: MemoryView) -> None:
    s = await mount([store])
    new = f"{s.mountpoint}/mem/d/new"

    def touch() -> list[str]:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT, 0o644)
        listed = sorted(os.listdir(os.path.dirname(new)))  # listed before it is stored
        os.close(fd)
        return listed

    assert await in_thread(touch) == ["k", "new"]

    async def stored() -> bool:  # at FUSE's release, which follows close(2) asynchronously
        return bool(writes(store))

    await eventually(stored, timeout=5)
    assert writes(store) == [("write", ("d", "new"), b"")]


async def test_unlinked_before_its_first_commit_never_reaches_the_store(
    mount, store: MemoryView
) -> None:
    s = await mount([store])
    new = f"{s.mountpoint}/mem/d/new"

    def scenario() -> tuple[list[str], int]:
        fd = os.open(new, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"data\n")
        os.unlink(new)
        listed = sorted(os.listdir(os.path.dirname(new)))
        os.write(fd, b"more\n")
        os.fsync(fd)
        os.close(fd)
        try:
            os.stat(new)
        except OSError as exc:
            return listed, exc.errno or 0
        return listed, 0

    assert await in_thread(scenario) == (["k"], errno.ENOENT)
    assert writes(store) == []


async def test_a_refused_new_file_is_not_stored_later_and_its_name_goes(
    mount, store: MemoryView
) -> None:
    s = await mount([store])
    new = f"{s.mountpoint}/mem/d/new"

    def scenario() -> tuple[int, int, list[str]]:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 3000)  # over the view's 2047 bytes
        try:
            os.fsync(fd)
            refused = 0
        except OSError as exc:
            refused = exc.errno or 0
        # Still open: the name is the mount's alone until release.
        listed = sorted(os.listdir(os.path.dirname(new)))
        os.close(fd)  # nothing written since: no second attempt
        # FUSE's release follows close(2) asynchronously; then the name goes.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.stat(new)
            except OSError as exc:
                return refused, exc.errno or 0, listed
            time.sleep(0.01)
        return refused, 0, listed

    assert await in_thread(scenario) == (errno.EFBIG, errno.ENOENT, ["k", "new"])
    assert writes(store) == []


async def test_a_second_writer_shares_the_new_file(mount, store: MemoryView) -> None:
    s = await mount([store])
    new = f"{s.mountpoint}/mem/d/new"

    def scenario() -> bytes:
        a = os.open(new, os.O_WRONLY | os.O_CREAT, 0o644)
        b = os.open(new, os.O_WRONLY)  # joins the file that exists only in the mount
        os.write(a, b"from-a\n")
        os.close(a)  # stored here
        os.close(b)  # wrote nothing: nothing more
        with open(new, "rb") as f:
            return f.read()

    assert await in_thread(scenario) == b"from-a\n"
    assert writes(store) == [("write", ("d", "new"), b"from-a")]


async def test_rename_of_an_open_new_file_stores_it_first(mount, store: MemoryView) -> None:
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"

    def scenario() -> None:
        fd = os.open(f"{d}/new", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"v\n")
        os.rename(f"{d}/new", f"{d}/k")
        os.close(fd)

    await in_thread(scenario)
    assert store.value(("d", "k")) == b"v"
    assert writes(store) == [("write", ("d", "new"), b"v"), ("rename", ("d", "new"), b"d/k")]


async def test_o_trunc_without_a_write_is_stored_at_fsync_once(
    mount, store: MemoryView
) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"

    def scenario() -> None:
        fd = os.open(k, os.O_WRONLY | os.O_TRUNC)
        os.fsync(fd)
        os.fsync(fd)
        os.close(fd)

    await in_thread(scenario)
    assert writes(store) == [("write", ("d", "k"), b"")]
