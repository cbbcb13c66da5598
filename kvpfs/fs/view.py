"""The seam between the FUSE layer and a store (KVP pools, XenStore, the vbd view).

A view owns one top-level directory of the mount (``kvp``, ``xenstore``, ...).
It sees paths as tuples of filenames below that directory and never sees inodes,
file handles, editor scratch files or the text convention: those belong to the
FUSE layer.

Errors: views (and their streams) raise :class:`kvpfs.errors.FsError` with the
errno the caller must get, and only that errno ever reaches the caller.  A view
maps its store's errors itself, through one table per store (XenStore's is
``kvpfs.xenstore.errnos``).  Anything else a view raises, an OSError included, is
a bug: the FUSE layer logs it once, with its traceback, at the logger of the
view's module (``logging.getLogger(type(view).__module__)``), and answers EIO.
"""

from __future__ import annotations

import enum
import errno
import select
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from kvpfs.errors import FsError

#: Filenames below the view's directory, e.g. ("guest", "MyKey").
Path = tuple[str, ...]


class NodeKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    #: A device-like file: every read and write goes to :meth:`View.open_stream`'s
    #: Stream unbuffered, at the caller's size (an emulated character device).
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class Node:
    """What the FUSE layer needs to answer getattr for one name."""

    kind: NodeKind
    #: Length of the stored value in bytes (files), before the text convention.
    size: int = 0
    #: Whether this mount may change the node (drives the mode bits and the errno
    #: of a write-open, see :attr:`View.unwritable_errno`).
    writable: bool = False
    #: Last change time when the store knows it, else 0 (the mount's start time is used).
    mtime_ns: int = 0
    #: Symlink target, relative to the symlink's directory.
    target: str = ""
    #: Files whose value can change behind the kernel's back are opened with direct_io.
    volatile: bool = True
    #: Whether this mount may read the node (the r bits; XenStore permissions).
    readable: bool = True


class Stream(ABC):
    """An open STREAM file.  Reads may wait (a blocking device read)."""

    #: See :attr:`View.bounds_own_calls`.
    bounds_own_calls: bool = False

    @abstractmethod
    async def read(self, size: int) -> bytes: ...

    @abstractmethod
    async def write(self, data: bytes) -> int: ...

    def poll(self, wake: Callable[[], None] | None) -> int:
        """The ready mask (select.POLLIN | ...); keep ``wake`` to call when it changes."""
        return select.POLLIN | select.POLLOUT

    async def release(self) -> None:
        """The last descriptor of this open file was closed."""
        return None


class ChangeSink(Protocol):
    """Where a view reports changes made by someone else (another process, the host).

    The FUSE layer turns them into kernel cache invalidations.  Reporting a change
    that the mount made itself is harmless.
    """

    def value_changed(self, view: View, path: Path) -> None: ...

    def entries_changed(
        self, view: View, directory: Path, names: Sequence[str]
    ) -> None: ...


class View(ABC):
    """A store shown as a directory tree.  All methods run on the trio thread."""

    #: Name of the view's top-level directory in the mount.
    name: str

    #: True if every call returns or fails within a bound of the view's own
    #: (lock timeouts, request timeouts); the FUSE layer then adds no timeout of
    #: its own.  Otherwise each call is cut off after the mount's ``timeout``.
    bounds_own_calls: bool = False

    #: What writing a node that is not ``writable`` gives: a read-only KVP pool is
    #: EROFS, a XenStore node the connection may not write is EACCES.
    unwritable_errno: int = errno.EROFS

    @abstractmethod
    async def lookup(self, path: Path) -> Node:
        """The node at ``path`` (``()`` is the view's own directory); ENOENT if absent."""

    @abstractmethod
    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        """The children of the directory at ``path``, in a stable order."""

    @abstractmethod
    async def read(self, path: Path) -> bytes:
        """The whole stored value of the file at ``path``."""

    async def write(self, path: Path, value: bytes) -> None:
        """Create or replace the file at ``path`` with ``value``, atomically."""
        raise FsError(errno.EROFS)

    async def check_new_name(self, path: Path) -> None:
        """Raise the errno that creating ``path`` would get (ENAMETOOLONG, EROFS, ...).

        Called on create() so that a refused name fails at open(), before any data
        is written; :meth:`write` must check again.
        """
        raise FsError(errno.EROFS)

    async def remove(self, path: Path) -> None:
        """Delete the file at ``path``."""
        raise FsError(errno.EROFS)

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        """Move a file within the view atomically.

        ``replace=False`` is RENAME_NOREPLACE: EEXIST if ``new`` exists.  EXDEV when the
        view cannot move between the two directories.
        """
        raise FsError(errno.EXDEV)

    async def open_stream(self, path: Path, flags: int) -> Stream:
        """Open the STREAM node at ``path`` (``flags`` as open(2) got them)."""
        raise FsError(errno.EPERM)

    async def mkdir(self, path: Path) -> None:
        raise FsError(errno.EPERM)

    async def rmdir(self, path: Path) -> None:
        raise FsError(errno.EPERM)

    #: Whether the view has xattrs (XenStore permissions); see :meth:`getxattr`.
    has_xattrs: bool = False

    async def listxattr(self, path: Path) -> list[str]:
        return []

    async def getxattr(self, path: Path, name: str) -> bytes:
        raise FsError(errno.ENODATA)

    async def setxattr(self, path: Path, name: str, value: bytes) -> None:
        raise FsError(errno.ENOTSUP)

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background work for as long as the mount lives (watches, polling).

        Started in the mount's nursery with ``nursery.start``; it reports started
        once the view is ready to serve, and is cancelled at unmount.
        """
        task_status.started()

    def terminating(self) -> None:
        """The mount is asked to end: wake whatever would hold it up (a blocked read).

        Called on the trio thread before the request loop is told to stop.
        """
        return None

    async def aclose(self) -> None:
        """Release resources at unmount (after :meth:`run` was cancelled)."""
        return None
