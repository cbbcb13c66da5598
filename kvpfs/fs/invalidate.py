"""Pushing changes made behind the kernel's back into its caches.

pyfuse3's invalidate_inode/invalidate_entry can block (and deadlock when called
from a handler of the same directory), so they run in a worker thread, batched,
from one task in the mount's nursery.  ``invalidate_entry_async`` is avoided: it
silently does nothing in the second pyfuse3 session of a process.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

import pyfuse3
import trio

from kvpfs.fs.inodes import Inode, InodeTable
from kvpfs.fs.view import Path, View

log = logging.getLogger(__name__)

_Item = tuple[int, bytes | None]


class Invalidator:
    """The mount's :class:`kvpfs.fs.view.ChangeSink`."""

    def __init__(self, inodes: InodeTable) -> None:
        self._inodes = inodes
        self._queue: dict[_Item, None] = {}
        self._wakeup = trio.Event()
        self._running = False
        #: Incremented after each applied batch; tests wait on it.
        self.batches = 0
        self._idle = trio.Event()

    # what the operations and views report

    def inode(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.open_count > 0:
            self._push((inode.ino, None))

    def entry(self, parent: Inode, name: str) -> None:
        if parent.lookups > 0:
            self._push((parent.ino, os.fsencode(name)))

    def value_changed(self, view: View, path: Path) -> None:
        inode = self._inodes.find(view, path)
        if inode is not None:
            self.inode(inode)

    def entries_changed(self, view: View, directory: Path, names: Sequence[str]) -> None:
        parent = self._inodes.find(view, directory)
        for name in names:
            child = self._inodes.find(view, (*directory, name))
            if child is not None:
                self.inode(child)
            if parent is not None:
                self.entry(parent, name)

    def _push(self, item: _Item) -> None:
        if not self._running:
            return
        self._queue[item] = None
        self._wakeup.set()

    # the worker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch = list(self._queue)
                self._queue.clear()
                await trio.to_thread.run_sync(_apply, batch, abandon_on_cancel=True)
                self.batches += 1
        finally:
            self._running = False
            self._queue.clear()

    async def settle(self) -> None:
        """Wait until everything queued so far has reached the kernel (for tests)."""
        while self._queue:
            await trio.sleep(0.005)
        await trio.sleep(0)


def _apply(batch: list[_Item]) -> None:
    for ino, name in batch:
        try:
            if name is None:
                pyfuse3.invalidate_inode(ino)
            else:
                pyfuse3.invalidate_entry(ino, name)
        except OSError as exc:
            # The kernel no longer knows the inode or name: nothing to invalidate.
            if exc.errno != errno.ENOENT:
                log.debug("invalidation of %s/%r failed: %s", ino, name, exc)
