"""``.kvpfs/`` at the mount's root: where this mount's data comes from, as files.

A script that finds a mount can ask it what it is, without parsing the command's
output::

    export XENSTORED_PATH=$(cat MNT/.kvpfs/xenstored-path)

Every file is read-only and fixed for the life of the mount.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from kvpfs.errors import FsError
from kvpfs.fs.view import Node, NodeKind, Path, View

_DIR = Node(NodeKind.DIR, writable=False)


class InfoView(View):
    """Read-only files named by ``facts`` (name -> value), in that order."""

    name = ".kvpfs"
    bounds_own_calls = True

    def __init__(self, facts: Mapping[str, str]) -> None:
        self._files = {name: value.encode() for name, value in facts.items()}

    def _file(self, path: Path) -> bytes:
        if len(path) != 1 or path[0] not in self._files:
            raise FsError(errno.ENOENT)
        return self._files[path[0]]

    async def lookup(self, path: Path) -> Node:
        if path == ():
            return _DIR
        return Node(NodeKind.FILE, size=len(self._file(path)), volatile=False)

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if path != ():
            self._file(path)
            raise FsError(errno.ENOTDIR)
        return [(name, await self.lookup((name,))) for name in self._files]

    async def read(self, path: Path) -> bytes:
        if path == ():
            raise FsError(errno.EISDIR)
        return self._file(path)
