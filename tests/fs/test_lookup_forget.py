"""A FORGET handled while a LOOKUP of the same inode waits for the store.

After a pushed ``invalidate_entry`` the kernel looks the name up again and, in
parallel, forgets the lookups of the old dentry.  The inode handed out by the
new LOOKUP must stay registered, or the kernel's next request on it (a lookup
below it, getxattr, ...) finds nothing: ENOENT for an existing node.
"""

from __future__ import annotations

import trio
import trio.testing

from kvpfs.fs.operations import Operations
from kvpfs.fs.view import Node, Path
from tests.fs.memory_view import MemoryView


class GatedBackend(MemoryView):
    """lookup() waits for ``gate`` while it is set."""

    gate: trio.Event | None = None

    async def lookup(self, path: Path) -> Node:
        if self.gate is not None and path:
            await self.gate.wait()
        return await super().lookup(path)


async def test_forget_during_lookup_keeps_the_inode() -> None:
    store = GatedBackend()
    store.add_dir(("d",))
    store.tree[("d",)]["k"] = b"v"
    ops = Operations([store])
    backend_dir = (await ops.lookup(1, b"mem", None)).st_ino
    first = (await ops.lookup(backend_dir, b"d", None)).st_ino

    store.gate = trio.Event()
    result: list[int] = []

    async def lookup_again() -> None:
        result.append((await ops.lookup(backend_dir, b"d", None)).st_ino)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookup_again)
        await trio.testing.wait_all_tasks_blocked()
        # The kernel drops the old dentry's single lookup while the new one waits.
        await ops.forget([(first, 1)])
        store.gate.set()
    assert result == [first]
    inode = ops.inodes.get(first)
    assert inode is not None and inode.lookups == 1
    # And a lookup below it works.
    store.gate = None
    assert (await ops.lookup(first, b"k", None)).st_size == 2
