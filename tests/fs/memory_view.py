"""A dict-backed View for testing the FUSE layer on its own.

It records every store operation so tests can assert how often and with what the
FUSE layer committed, and can be told to fail or hang.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import ChangeSink, Node, NodeKind, Path, View


@dataclass
class MemoryView(View):
    name: str = "mem"
    #: directory path -> {name: value}; a value of None marks a subdirectory.
    tree: dict[Path, dict[str, bytes | None]] = field(default_factory=lambda: {(): {}})
    read_only_dirs: set[Path] = field(default_factory=set)
    max_value: int = 2047
    log: list[tuple[str, Path, bytes | None]] = field(default_factory=list)
    fail_next_write: int = 0
    hang: bool = False
    sink: ChangeSink | None = None

    def add_dir(self, path: Path, *, read_only: bool = False) -> None:
        self.tree[path[:-1]][path[-1]] = None
        self.tree[path] = {}
        if read_only:
            self.read_only_dirs.add(path)

    def value(self, path: Path) -> bytes | None:
        return self.tree.get(path[:-1], {}).get(path[-1])

    def external_write(self, path: Path, value: bytes) -> None:
        """A change by someone else: the FUSE layer learns of it through the sink."""
        existed = path[-1] in self.tree[path[:-1]]
        self.tree[path[:-1]][path[-1]] = value
        if self.sink is not None:
            if existed:
                self.sink.value_changed(self, path)
            else:
                self.sink.entries_changed(self, path[:-1], [path[-1]])

    def external_remove(self, path: Path) -> None:
        del self.tree[path[:-1]][path[-1]]
        if self.sink is not None:
            self.sink.entries_changed(self, path[:-1], [path[-1]])

    async def _maybe_hang(self) -> None:
        if self.hang:
            await trio.sleep_forever()

    def _dir(self, path: Path) -> dict[str, bytes | None]:
        d = self.tree.get(path)
        if d is None:
            raise FsError(errno.ENOENT)
        return d

    async def lookup(self, path: Path) -> Node:
        await self._maybe_hang()
        if path in self.tree:
            return Node(NodeKind.DIR, writable=path not in self.read_only_dirs)
        d = self._dir(path[:-1])
        if path[-1] not in d:
            raise FsError(errno.ENOENT)
        value = d[path[-1]]
        assert value is not None
        return Node(NodeKind.FILE, len(value), path[:-1] not in self.read_only_dirs)

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        await self._maybe_hang()
        return [(name, await self.lookup((*path, name))) for name in self._dir(path)]

    async def read(self, path: Path) -> bytes:
        await self._maybe_hang()
        value = self._dir(path[:-1]).get(path[-1])
        if value is None:
            raise FsError(errno.ENOENT)
        self.log.append(("read", path, None))
        return value

    async def check_new_name(self, path: Path) -> None:
        self._dir(path[:-1])
        if path[:-1] in self.read_only_dirs:
            raise FsError(errno.EROFS)
        if len(path[-1]) > 100:
            raise FsError(errno.ENAMETOOLONG)

    async def write(self, path: Path, value: bytes) -> None:
        await self._maybe_hang()
        await self.check_new_name(path)
        if self.fail_next_write:
            code, self.fail_next_write = self.fail_next_write, 0
            raise FsError(code)
        if len(value) > self.max_value:
            raise FsError(errno.EFBIG)
        self.log.append(("write", path, value))
        self._dir(path[:-1])[path[-1]] = value

    async def remove(self, path: Path) -> None:
        d = self._dir(path[:-1])
        if path[:-1] in self.read_only_dirs:
            raise FsError(errno.EROFS)
        if d.get(path[-1], b"") is None:
            raise FsError(errno.EISDIR)
        if path[-1] not in d:
            raise FsError(errno.ENOENT)
        self.log.append(("remove", path, None))
        del d[path[-1]]

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        if old[:-1] != new[:-1]:
            raise FsError(errno.EXDEV)
        d = self._dir(old[:-1])
        if old[-1] not in d:
            raise FsError(errno.ENOENT)
        if not replace and new[-1] in d:
            raise FsError(errno.EEXIST)
        self.log.append(("rename", old, "/".join(new).encode()))
        d[new[-1]] = d.pop(old[-1])

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.sink = sink
        task_status.started()
        await trio.sleep_forever()

    def writes(self) -> list[tuple[str, Path, bytes | None]]:
        return [e for e in self.log if e[0] != "read"]
