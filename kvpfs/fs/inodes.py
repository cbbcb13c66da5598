"""Inode bookkeeping: kernel inode numbers <-> (view, path).

Inodes are path-based: a rename moves the inode to the new path (as the kernel
moves its dentry), and an inode is dropped once the kernel has forgotten every
lookup of it.  Inode numbers are never reused within a mount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3

from kvpfs.fs.view import Path, View

if TYPE_CHECKING:
    from kvpfs.fs.operations import OpenFile

ROOT_INODE: int = pyfuse3.ROOT_INODE


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    #: None for the mount's root directory.
    view: View | None
    path: Path
    lookups: int = 0
    #: chmod/chown/utimens are accepted and kept here, never persisted.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    #: Open handles keep an inode alive even after the kernel forgot it.
    open_count: int = 0
    #: A file created here and not yet stored: the open handle whose buffer is its
    #: content (a handle in one of kvpfs.fs.openfile.NEW_STATES).
    unstored: OpenFile | None = None

    @property
    def key(self) -> tuple[int, Path]:
        return (id(self.view), self.path)


class InodeTable:
    def __init__(self) -> None:
        self._next = ROOT_INODE + 1
        self.root = Inode(ROOT_INODE, None, (), lookups=1)
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, Path], Inode] = {}

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def find(self, view: View, path: Path) -> Inode | None:
        return self._by_key.get((id(view), path))

    def ensure(self, view: View, path: Path) -> Inode:
        inode = self._by_key.get((id(view), path))
        if inode is None:
            inode = Inode(self._next, view, path)
            self._next += 1
            self._by_ino[inode.ino] = inode
            self._by_key[inode.key] = inode
        return inode

    def move(self, inode: Inode, new_path: Path) -> None:
        """Re-key ``inode`` (and, for directories, everything below it) to ``new_path``."""
        assert inode.view is not None
        old_path = inode.path
        displaced = self._by_key.get((id(inode.view), new_path))
        if displaced is not None and displaced is not inode:
            # The kernel still holds the replaced file's inode; it must not be
            # found under the name any more, but stays valid until forgotten.
            self._detach(displaced)
        n = len(old_path)
        view_id = id(inode.view)
        moving = [
            i
            for (bid, p), i in self._by_key.items()
            if bid == view_id and p[:n] == old_path
        ]
        for i in moving:
            del self._by_key[i.key]
        for i in moving:
            i.path = new_path + i.path[n:]
            self._by_key[i.key] = i

    def _detach(self, inode: Inode) -> None:
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        inode.path = (*inode.path, "\0detached")

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None or inode is self.root:
            return
        inode.lookups = max(0, inode.lookups - count)
        self.drop_if_unused(inode)

    def drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups == 0 and inode.open_count == 0 and inode is not self.root:
            self._by_ino.pop(inode.ino, None)
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
