"""The FUSE layer against an in-memory store, driven by real programs."""

from __future__ import annotations

import errno
import os

import pytest

from tests.fs.memory_view import MemoryView
from tests.mounting import in_thread, read_bytes, sh

pytestmark = pytest.mark.mount


@pytest.fixture
def store() -> MemoryView:
    b = MemoryView()
    b.add_dir(("d",))
    b.add_dir(("ro",), read_only=True)
    b.tree[("d",)]["k"] = b"value"
    b.tree[("ro",)]["fixed"] = b"host"
    return b


async def test_ls_cat_echo(mount, store: MemoryView) -> None:
    s = await mount([store])
    m = s.mountpoint
    out = await sh(f"ls {m} {m}/mem/d")
    assert b"mem" in out.stdout and b"k" in out.stdout
    assert (await sh(f"cat {m}/mem/d/k")).stdout == b"value\n"
    await sh(f"echo new > {m}/mem/d/k2")
    assert store.value(("d", "k2")) == b"new"
    await sh(f"echo x > {m}/mem/d/k")
    assert store.value(("d", "k")) == b"x"
    # One commit per command: bash's early flush must not store an empty value.
    assert [e for e in store.writes() if e[1] == ("d", "k")] == [("write", ("d", "k"), b"x")]


async def test_read_only_dir_is_erofs(mount, store: MemoryView) -> None:
    s = await mount([store])
    path = f"{s.mountpoint}/mem/ro/fixed"

    def attempt() -> int:
        try:
            with open(path, "w") as f:
                f.write("x")
        except OSError as exc:
            return exc.errno or 0
        return 0

    assert await in_thread(attempt) == errno.EROFS
    assert store.value(("ro", "fixed")) == b"host"
    assert await in_thread(read_bytes, path) == b"host\n"
    assert os.stat  # keep import used
