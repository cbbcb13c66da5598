"""The pyfuse3 Operations: one filesystem whose root holds one directory per view.

Write path (see README, "Editing semantics"): every open file buffers the whole
file; when the buffer is committed to the view (flush, fsync, release) is the
state machine of :mod:`kvpfs.fs.openfile`, which plans each event and leaves the
actions to this module.  Errors surface from flush and fsync so close() and
editors see them; release happens after close() returned and can only log.

Errors (the seam's contract, :mod:`kvpfs.fs.view`): a view's :class:`FsError`
gives its errno; anything else a view raises is logged once, with its traceback,
at the logger of the view's module and answered EIO, as is any failure of this
layer itself.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from kvpfs.errors import FsError
from kvpfs.fs import text
from kvpfs.fs.inodes import Inode, InodeTable
from kvpfs.fs.invalidate import Invalidator
from kvpfs.fs.openfile import NEW_STATES, Action, Event, Plan, State, opened, transition
from kvpfs.fs.overlay import Overlay, ScratchFile
from kvpfs.fs.view import Node, NodeKind, Path, Stream, View
from kvpfs.scratch import is_scratch_name

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: The kernel refuses longer names (FUSE_NAME_MAX) before they reach us.
FUSE_NAME_MAX = 1024
#: Largest file content an open handle may buffer; stores have far smaller limits
#: and report their own errno at commit, this only protects the mount's memory.
MAX_BUFFER = 1 << 20
MAX_SCRATCH_BUFFER = 64 << 20

# An Enum member costs a ~70 ns attribute lookup on Python 3.11; the requests of
# every open, write and close use these instead.
_WRITE, _FLUSH, _RELEASE = Event.WRITE, Event.FLUSH, Event.RELEASE
_COMMIT, _COMMIT_NEW, _DROP = Action.COMMIT, Action.COMMIT_NEW, Action.DROP


@dataclass(slots=True)
class FsOptions:
    raw: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    #: Seconds the kernel may cache attributes and names of files; changes made by
    #: others are pushed as invalidations, so this only bounds a missed push.
    attr_timeout: float = 1.0
    #: Upper bound for any single view call; a store that hangs becomes EIO.
    store_timeout: float = 30.0


@dataclass(slots=True, eq=False)
class OpenFile:
    fh: int
    inode: Inode
    buffer: bytearray
    append: bool
    writable: bool
    scratch: ScratchFile | None = None
    stream: Stream | None = None
    #: What the buffer owes the store (kvpfs.fs.openfile); streams stay CLEAN.
    state: State = State.CLEAN


@dataclass(slots=True, eq=False)
class OpenDir:
    inode: Inode
    entries: list[tuple[str, Inode, Node | None]] | None = None


def fuse_op(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Only FUSEError may leave a handler: anything else would tear the mount down."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.TooSlowError:
            log.error("%s: the store did not answer in time", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            # Views' own failures arrive here as FsError already (Operations._call);
            # this is the FUSE layer's.  No OSError passes its errno through: only
            # an FsError says which errno the caller gets.
            log.exception("%s failed", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


#: The root and each view's own directory.
_TOP_DIR = Node(NodeKind.DIR, writable=False)


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _broken(callee: View | Stream, exc: Exception) -> FsError:
    """A view broke the seam's contract (raised something not FsError): say so once,
    with the traceback, where the view logs, and give the caller EIO."""
    logging.getLogger(type(callee).__module__).error(
        "%s raised %s, answered EIO", type(callee).__name__, type(exc).__name__, exc_info=exc
    )
    return FsError(errno.EIO, f"{type(callee).__name__}: {exc}")


class Operations(pyfuse3.Operations):
    """Dispatches FUSE requests to views; owns inodes, handles and the overlay."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, views: Sequence[View], options: FsOptions | None = None) -> None:
        super().__init__()
        names = [b.name for b in views]
        if len(set(names)) != len(names):
            raise ValueError(f"view names must be unique: {names}")
        self.views = {b.name: b for b in views}
        self.options = options or FsOptions()
        self.inodes = InodeTable()
        self.overlay = Overlay()
        self.invalidator = Invalidator(self.inodes)
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self._started_ns = time.time_ns()
        self._xattrs = any(b.has_xattrs for b in views)

    # ---------------------------------------------------------------- helpers

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    async def _call(self, callee: View | Stream, coro: Awaitable[R]) -> R:
        """Await a view's (or stream's) call, bounded by the store timeout unless the
        view bounds its own calls; whatever it raises leaves as FsError."""
        try:
            if callee.bounds_own_calls:
                # A cancel scope costs as much as the rest of a cached lookup.
                return await coro
            with trio.fail_after(self.options.store_timeout):
                return await coro
        except (FsError, trio.TooSlowError):
            raise
        except Exception as exc:
            raise _broken(callee, exc) from None

    async def _call_unbounded(self, callee: View | Stream, coro: Awaitable[R]) -> R:
        """:meth:`_call` without a deadline (a device read may wait for data)."""
        try:
            return await coro
        except FsError:
            raise
        except Exception as exc:
            raise _broken(callee, exc) from None

    async def _node(self, inode: Inode) -> Node:
        """The current node behind ``inode``, honouring the overlay."""
        if inode.view is None or inode.path == ():
            return _TOP_DIR
        view, path = inode.view, inode.path
        scratch = self.overlay.get(view, path)
        if scratch is not None:
            return Node(NodeKind.FILE, len(scratch.data), True, scratch.mtime_ns, volatile=False)
        unstored = inode.unstored
        if unstored is not None:
            size = len(text.file_to_value(bytes(unstored.buffer), self.options.raw))
            return Node(NodeKind.FILE, size, True)
        if self.overlay.is_hidden(view, path):
            raise FsError(errno.ENOENT)
        return await self._call(view, view.lookup(path))

    def _attrs(self, inode: Inode, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        timeout = self.options.attr_timeout
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        scratch = inode.view is not None and self.overlay.get(inode.view, inode.path)
        w = 0o200 if node.writable else 0
        if node.kind is NodeKind.DIR:
            mode = stat.S_IFDIR | (0o555 if node.readable else 0o111) | w
            a.st_nlink = 2
            size = 0
        elif node.kind is NodeKind.SYMLINK:
            mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
            size = len(os.fsencode(node.target))
        elif node.kind is NodeKind.STREAM:
            # Like a character device node: owner-only, no size.
            mode = stat.S_IFREG | (0o400 if node.readable else 0) | w
            a.st_nlink = 1
            size = 0
        else:
            mode = stat.S_IFREG | (0o444 if node.readable else 0) | w
            a.st_nlink = 1
            size = node.size if scratch else text.file_size(node.size, self.options.raw)
        if inode.mode is not None and node.kind is not NodeKind.SYMLINK:
            mode = stat.S_IFMT(mode) | stat.S_IMODE(inode.mode)
        a.st_mode = mode
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_uid = self.options.uid if inode.uid is None else inode.uid
        a.st_gid = self.options.gid if inode.gid is None else inode.gid
        mtime = inode.mtime_ns or node.mtime_ns or self._started_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = node.mtime_ns or mtime
        a.st_atime_ns = inode.atime_ns or mtime
        return a

    def _child_path(self, parent: Inode, name: str) -> tuple[View, Path]:
        if parent.view is None:
            raise FsError(errno.EPERM)
        if len(os.fsencode(name)) > FUSE_NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        return parent.view, (*parent.path, name)

    def _lookup_view_dir(self, name: str) -> Inode:
        view = self.views.get(name)
        if view is None:
            raise FsError(errno.ENOENT)
        return self.inodes.ensure(view, ())

    async def _exists(self, view: View, path: Path) -> bool:
        inode = self.inodes.find(view, path)
        if inode is not None and inode.unstored is not None:
            return True
        if self.overlay.get(view, path) is not None:
            return True
        if self.overlay.is_hidden(view, path):
            return False
        try:
            await self._call(view, view.lookup(path))
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _is_scratch(self, view: View, path: Path) -> bool:
        return is_scratch_name(path[-1])

    # ---------------------------------------------------------------- lookup / attributes

    @fuse_op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        sname = _name(name)
        if parent.view is None:
            inode = self._lookup_view_dir(sname)
        else:
            view, path = self._child_path(parent, sname)
            inode = self.inodes.find(view, path) or self.inodes.ensure(view, path)
        return await self._hand_out(inode)

    async def _hand_out(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode`` for a reply that gives the kernel a lookup of it."""
        # Counted before the store is asked: a FORGET of the kernel's previous
        # lookups, handled while we wait, must not drop the inode we are handing out.
        inode.lookups += 1
        try:
            node = await self._node(inode)
        except BaseException:
            inode.lookups -= 1
            self.inodes.drop_if_unused(inode)
            raise
        return self._attrs(inode, node)

    @fuse_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino = self._inode(inode)
        if ino is self.inodes.root:
            return self._attrs(ino, _TOP_DIR)
        return self._attrs(ino, await self._node(ino))

    @fuse_op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino = self._inode(inode)
        node = await self._node(ino)
        if fields.update_size:
            await self._truncate(ino, node, attr.st_size, fh)
            node = await self._node(ino)
        # Owner, mode and times are accepted and kept in memory: cp -a, sed -i and
        # vim change them and fail or warn if refused, but no store can hold them.
        if fields.update_mode:
            ino.mode = attr.st_mode
        if fields.update_uid:
            ino.uid = attr.st_uid
        if fields.update_gid:
            ino.gid = attr.st_gid
        if fields.update_atime:
            ino.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            ino.mtime_ns = attr.st_mtime_ns
        return self._attrs(ino, node)

    async def _truncate(self, ino: Inode, node: Node, size: int, fh: int | None) -> None:
        if node.kind is not NodeKind.FILE:
            raise FsError(errno.EISDIR if node.kind is NodeKind.DIR else errno.EINVAL)
        handle = self._files.get(fh) if fh is not None else ino.unstored
        if handle is not None:
            if not handle.writable:
                raise FsError(errno.EBADF)
            self._resize(handle, size)
            self._apply(handle, _WRITE)
            return
        assert ino.view is not None
        if not node.writable:
            raise FsError(ino.view.unwritable_errno)
        scratch = self.overlay.get(ino.view, ino.path)
        if scratch is not None:
            del scratch.data[size:]
            scratch.data.extend(b"\0" * (size - len(scratch.data)))
            return
        content = bytearray(await self._read_file(ino))
        del content[size:]
        content.extend(b"\0" * (size - len(content)))
        await self._store(ino, bytes(content))

    def _resize(self, handle: OpenFile, size: int) -> None:
        limit = MAX_SCRATCH_BUFFER if handle.scratch is not None else MAX_BUFFER
        if size > limit:
            raise FsError(errno.EFBIG)
        del handle.buffer[size:]
        handle.buffer.extend(b"\0" * (size - len(handle.buffer)))

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._node(self._inode(inode))
        if node.kind is not NodeKind.SYMLINK:
            raise FsError(errno.EINVAL)
        return os.fsencode(node.target)

    @fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.inodes)
        s.f_ffree = s.f_favail = 1 << 20
        # Long KVP keys escape to names well past 255 bytes; FUSE itself stops at 1024.
        s.f_namemax = FUSE_NAME_MAX
        return s

    # ---------------------------------------------------------------- directories

    @fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ino = self._inode(inode)
        if ino is not self.inodes.root:
            node = await self._node(ino)
            if node.kind is not NodeKind.DIR:
                raise FsError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = OpenDir(ino)
        ino.open_count += 1
        return fh

    async def _list(self, ino: Inode) -> list[tuple[str, Inode, Node | None]]:
        if ino.view is None:
            return [
                (name, self.inodes.ensure(b, ()), Node(NodeKind.DIR))
                for name, b in self.views.items()
            ]
        view, path = ino.view, ino.path
        listed = await self._call(view, view.listdir(path))
        entries: list[tuple[str, Inode, Node | None]] = []
        seen: set[str] = set()
        for name, node in listed:
            child = (*path, name)
            if self.overlay.is_hidden(view, child):
                continue
            if len(os.fsencode(name)) > FUSE_NAME_MAX:
                # The kernel rejects such an entry and with it the whole listing.
                log.warning("%s: name longer than %d bytes not listed", view.name, FUSE_NAME_MAX)
                continue
            seen.add(name)
            entries.append((name, self.inodes.ensure(view, child), node))
        for name, scratch in self.overlay.names_in(view, path):
            if name not in seen:
                seen.add(name)
                node = Node(NodeKind.FILE, len(scratch.data), True, scratch.mtime_ns)
                entries.append((name, self.inodes.ensure(view, (*path, name)), node))
        for handle in self._files.values():
            h = handle.inode
            if (
                handle.state in NEW_STATES
                and h.view is view
                and h.path[:-1] == path
                and h.path[-1] not in seen
            ):
                seen.add(h.path[-1])
                entries.append((h.path[-1], h, None))
        return entries

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise FsError(errno.EBADF)
        # One snapshot per pass, taken at offset 0: later offsets never skip or
        # repeat entries while the directory changes underneath.
        if start_id == 0 or d.entries is None:
            d.entries = await self._list(d.inode)
        for index in range(start_id, len(d.entries)):
            name, inode, node = d.entries[index]
            if node is None:
                node = await self._node(inode)
            if self.inodes.get(inode.ino) is not inode and inode.view is not None:
                # Forgotten by the kernel since the snapshot (a FORGET between two
                # READDIRPLUS calls): hand out a registered inode, never a dropped one.
                inode = self.inodes.ensure(inode.view, inode.path)
                d.entries[index] = (name, inode, node)
            attrs = self._attrs(inode, node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                self.inodes.drop_if_unused(inode)
                return
            inode.lookups += 1
        # Entries never handed to the kernel must not pin inodes.
        for _, inode, _ in d.entries:
            self.inodes.drop_if_unused(inode)

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None:
            d.inode.open_count -= 1
            if d.entries:
                for _, inode, _ in d.entries:
                    self.inodes.drop_if_unused(inode)
            self.inodes.drop_if_unused(d.inode)

    @fuse_op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        view, path = self._child_path(parent, _name(name))
        await self._call(view, view.mkdir(path))
        attrs = await self._hand_out(self.inodes.ensure(view, path))
        self.invalidator.entry(parent, path[-1])
        return attrs

    @fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        view, path = self._child_path(parent, _name(name))
        await self._call(view, view.rmdir(path))

    # ---------------------------------------------------------------- files

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _read_file(self, ino: Inode) -> bytes:
        assert ino.view is not None
        scratch = self.overlay.get(ino.view, ino.path)
        if scratch is not None:
            return bytes(scratch.data)
        unstored = ino.unstored
        if unstored is not None:
            return bytes(unstored.buffer)
        if self.overlay.is_hidden(ino.view, ino.path):
            raise FsError(errno.ENOENT)
        value = await self._call(ino.view, ino.view.read(ino.path))
        return text.value_to_file(value, self.options.raw)

    def _open_handle(
        self, ino: Inode, flags: int, content: bytes, scratch: ScratchFile | None
    ) -> OpenFile:
        accmode = flags & os.O_ACCMODE
        handle = OpenFile(
            fh=self._new_fh(),
            inode=ino,
            buffer=bytearray(content),
            append=bool(flags & os.O_APPEND),
            writable=accmode in (os.O_WRONLY, os.O_RDWR),
            scratch=scratch,
        )
        self._files[handle.fh] = handle
        ino.open_count += 1
        return handle

    @fuse_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        ino = self._inode(inode)
        node = await self._node(ino)
        if node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        assert ino.view is not None
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable and not node.writable:
            raise FsError(ino.view.unwritable_errno)
        if node.kind is NodeKind.STREAM:
            stream = await self._call(ino.view, ino.view.open_stream(ino.path, flags))
            handle = self._open_handle(ino, flags, b"", None)
            handle.stream = stream
            # Unbuffered, at the caller's sizes, no offsets: a character device.
            return pyfuse3.FileInfo(
                fh=handle.fh, direct_io=True, keep_cache=False, nonseekable=True
            )
        scratch = self.overlay.get(ino.view, ino.path)
        # libfuse negotiates atomic_o_trunc: the truncation arrives here, not as setattr.
        truncate = bool(flags & os.O_TRUNC) and writable
        content = b"" if truncate else await self._read_file(ino)
        handle = self._open_handle(ino, flags, content, scratch)
        # A further writer of a new file not yet stored shares its fate.
        joins = writable and ino.unstored is not None
        handle.state = opened(truncated=truncate, new_file=joins)
        if joins:
            ino.unstored = handle
        direct = node.volatile and scratch is None
        return pyfuse3.FileInfo(fh=handle.fh, direct_io=direct, keep_cache=False)

    @fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._inode(parent_inode)
        view, path = self._child_path(parent, _name(name))
        scratch: ScratchFile | None = None
        if self._is_scratch(view, path) and not await self._exists(view, path):
            scratch = ScratchFile()
            self.overlay.put(view, path, scratch)
        else:
            await self._call(view, view.check_new_name(path))
        inode = self.inodes.ensure(view, path)
        inode.mode = stat.S_IMODE(mode) & ~ctx.umask
        inode.uid, inode.gid = ctx.uid, ctx.gid
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        handle = self._open_handle(inode, flags, b"", scratch)
        if scratch is None:
            # The name exists only here until the handle's first commit.
            handle.state = State.NEW
            inode.unstored = handle
        node = await self._node(inode)
        inode.lookups += 1
        info = pyfuse3.FileInfo(fh=handle.fh, direct_io=scratch is None, keep_cache=False)
        return info, self._attrs(inode, node)

    @fuse_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        if handle.stream is not None:
            # No timeout: a device read legitimately waits until there is data.
            return await self._call_unbounded(handle.stream, handle.stream.read(size))
        return bytes(handle.buffer[off : off + size])

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files.get(fh)
        if handle is None or not handle.writable:
            raise FsError(errno.EBADF)
        if handle.stream is not None:
            return await self._call(handle.stream, handle.stream.write(buf))
        if handle.append:
            # The kernel's idea of the size may be stale (values change behind it).
            off = len(handle.buffer)
        end = off + len(buf)
        if end > len(handle.buffer):
            self._resize(handle, end)
        handle.buffer[off:end] = buf
        handle.state = transition(handle.state, _WRITE).state
        return len(buf)

    # ---------------------------------------------------------------- the open-file state machine

    def _apply(self, handle: OpenFile, event: Event) -> None:
        """An event that only changes the state (WRITE, STORED, UNLINK plan no actions)."""
        handle.state = transition(handle.state, event).state

    async def _on(self, handle: OpenFile, event: Event) -> None:
        """``event`` happened to ``handle``: enter the planned state, then act.

        (flush and release, on the path of every close, do the same inline.)
        """
        plan = transition(handle.state, event)
        handle.state = plan.state
        if plan.actions:
            await self._carry_out(handle, plan)

    async def _carry_out(self, handle: OpenFile, plan: Plan) -> None:
        """The plan's actions; the handle is in ``plan.state`` already, so a value
        the store refuses is dropped: the caller reports the error, nothing retries."""
        actions = plan.actions
        try:
            if _COMMIT in actions or _COMMIT_NEW in actions:
                ino = handle.inode
                assert ino.view is not None
                scratch = self.overlay.get(ino.view, ino.path)
                if scratch is not None:
                    scratch.data[:] = handle.buffer
                    scratch.mtime_ns = time.time_ns()
                else:
                    await self._store(ino, bytes(handle.buffer))
                if _COMMIT_NEW in actions:
                    self._stored(ino)
        finally:
            # Whatever the commit before it did: a refused new file is given up.
            if _DROP in actions:
                self._drop(handle)

    def _stored(self, ino: Inode) -> None:
        """A new file reached the store: the name is no longer the mount's alone."""
        ino.unstored = None
        for other in self._files.values():
            if other.inode is ino:
                self._apply(other, Event.STORED)

    def _drop(self, handle: OpenFile) -> None:
        ino = handle.inode
        if ino.unstored is handle:
            # A new file whose value was refused never existed in the store; the
            # kernel still holds a positive entry from create() that would make
            # the next open of the name fail with ENOENT.
            ino.unstored = None
            self._forget_name(ino)

    async def _store(self, ino: Inode, content: bytes) -> None:
        assert ino.view is not None
        value = text.file_to_value(content, self.options.raw)
        await self._call(ino.view, ino.view.write(ino.path, value))
        self.overlay.unhide(ino.view, ino.path)
        # No invalidation of our own inode: the kernel updated its attributes from
        # the write itself, and a round trip through the notify thread per commit
        # cost almost half of a set.

    @fuse_op
    async def flush(self, fh: int) -> None:
        handle = self._files.get(fh)
        if handle is not None:
            plan = transition(handle.state, _FLUSH)
            handle.state = plan.state
            if plan.actions:
                await self._carry_out(handle, plan)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files.get(fh)
        if handle is not None:
            await self._on(handle, Event.FSYNC)

    @fuse_op
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        ino = handle.inode
        try:
            if handle.stream is not None:
                handle.state = State.CLOSED
                await self._call_unbounded(handle.stream, handle.stream.release())
            else:
                plan = transition(handle.state, _RELEASE)
                handle.state = plan.state
                if plan.actions:
                    await self._carry_out(handle, plan)
        except FsError as exc:
            # close() already returned; all we can do is say so.
            log.error("could not store %s: %s", "/".join(ino.path), exc)
            raise
        finally:
            ino.open_count -= 1
            self.inodes.drop_if_unused(ino)

    def _forget_name(self, ino: Inode) -> None:
        if ino.view is None or not ino.path:
            return
        parent = self.inodes.find(ino.view, ino.path[:-1])
        if parent is not None:
            self.invalidator.entry(parent, ino.path[-1])
        self.invalidator.inode(ino)

    async def commit_all(self) -> None:
        """Store what open handles still hold (the mount is ending under them)."""
        for handle in list(self._files.values()):
            try:
                await self._on(handle, Event.UNMOUNT)
            except (FsError, trio.TooSlowError) as exc:
                log.error("could not store %s at unmount: %s", "/".join(handle.inode.path), exc)

    @fuse_op
    async def poll(
        self,
        inode: int,
        fh: int,
        poll_handle: pyfuse3.PollHandle | None,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        handle = self._files.get(fh)
        if handle is None or handle.stream is None:
            return select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
        stream = handle.stream
        try:
            return stream.poll(poll_handle.notify if poll_handle is not None else None)
        except FsError:
            raise
        except Exception as exc:
            raise _broken(stream, exc) from None

    # ---------------------------------------------------------------- names

    @fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        view, path = self._child_path(parent, _name(name))
        scratch = self.overlay.get(view, path)
        if scratch is not None:
            origin = self.overlay.release_origin(view, scratch)
            if origin is not None:
                # The editor gave up the moved-away copy without writing a new key.
                await self._call(view, view.remove(origin))
            self.overlay.pop(view, path)
            return
        inode = self.inodes.find(view, path)
        if inode is not None and inode.unstored is not None:
            # A new file never stored: nothing to remove, and nothing of it ever
            # reaches the store.
            for handle in self._files.values():
                if handle.inode is inode:
                    self._apply(handle, Event.UNLINK)
            inode.unstored = None
            return
        if self.overlay.is_hidden(view, path):
            raise FsError(errno.ENOENT)
        await self._call(view, view.remove(path))

    @fuse_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        if old_parent.view is None or new_parent.view is None:
            raise FsError(errno.EPERM)
        if old_parent.view is not new_parent.view:
            raise FsError(errno.EXDEV)
        view, old = self._child_path(old_parent, _name(name_old))
        _, new = self._child_path(new_parent, _name(name_new))
        if old == new:
            return
        old_inode = self.inodes.find(view, old)
        if old_inode is not None and old_inode.unstored is not None:
            # A new file reaches the store before the store can rename it.
            for handle in [h for h in self._files.values() if h.inode is old_inode]:
                await self._on(handle, Event.RENAME)

        old_scratch = self.overlay.get(view, old)
        new_is_scratch = self.overlay.get(view, new) is not None or (
            self._is_scratch(view, new) and not await self._exists(view, new)
        )
        if noreplace and await self._exists(view, new):
            raise FsError(errno.EEXIST)

        if old_scratch is not None and new_is_scratch:
            self.overlay.pop(view, old)
            replaced = self.overlay.pop(view, new)
            if replaced is not None:
                origin = self.overlay.release_origin(view, replaced)
                if origin is not None:
                    await self._call(view, view.remove(origin))
            self.overlay.put(view, new, old_scratch)
        elif old_scratch is not None:
            # sed -i, os.replace, vim's k~ -> k: an atomic put of the scratch content.
            value = text.file_to_value(bytes(old_scratch.data), self.options.raw)
            await self._call(view, view.write(new, value))
            self.overlay.unhide(view, new)
            self.overlay.pop(view, old)
            origin = self.overlay.release_origin(view, old_scratch)
            if origin is not None and origin != new:
                await self._call(view, view.remove(origin))
        elif new_is_scratch:
            # vim's save renames k -> k~ before writing k anew: keep the key in the
            # store (hidden here) so that the pool never loses it.
            if self.overlay.is_hidden(view, old):
                raise FsError(errno.ENOENT)
            content = await self._read_file(old_inode or self.inodes.ensure(view, old))
            replaced = self.overlay.pop(view, new)
            if replaced is not None:
                origin = self.overlay.release_origin(view, replaced)
                if origin is not None:
                    await self._call(view, view.remove(origin))
            self.overlay.put(view, new, ScratchFile(bytearray(content), origin=old))
            self.overlay.hide(view, old)
        else:
            if self.overlay.is_hidden(view, old):
                raise FsError(errno.ENOENT)
            await self._call(view, view.rename(old, new, replace=not noreplace))
            self.overlay.unhide(view, new)

        if old_inode is not None:
            self.inodes.move(old_inode, new)
        elif (inode := self.inodes.find(view, new)) is not None:
            # Nothing known under the old name: the inode of the replaced file is stale.
            self.invalidator.inode(inode)

    # ---------------------------------------------------------------- refused operations

    @fuse_op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.EPERM)

    @fuse_op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.EPERM)

    @fuse_op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.EPERM)

    # ---------------------------------------------------------------- xattrs

    def _xattr_view(self, inode: int) -> tuple[View, Path] | None:
        if not self._xattrs:
            # ENOSYS makes the kernel stop asking for the rest of the mount's life,
            # which saves a getxattr("security.capability") before every write.
            raise FsError(errno.ENOSYS)
        ino = self._inode(inode)
        if ino.view is None or not ino.view.has_xattrs:
            return None
        if self.overlay.get(ino.view, ino.path) is not None:
            return None
        return ino.view, ino.path

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        target = self._xattr_view(inode)
        if target is None:
            raise FsError(errno.ENODATA)
        return await self._call(target[0], target[0].getxattr(target[1], _name(name)))

    @fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        target = self._xattr_view(inode)
        if target is None:
            return []
        return [os.fsencode(n) for n in await self._call(target[0], target[0].listxattr(target[1]))]

    @fuse_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        target = self._xattr_view(inode)
        if target is None:
            raise FsError(errno.ENOTSUP)
        await self._call(target[0], target[0].setxattr(target[1], _name(name), value))
        self.invalidator.inode(self._inode(inode))

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._xattr_view(inode)
        raise FsError(errno.ENOTSUP)

