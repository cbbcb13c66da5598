"""The ``xenstore`` directory of the mount: XenStore nodes as directories and files.

Mapping (README, "The XenStore view"):

* a node with children is a directory; a node without children is a file whose
  content is the node's value (the FUSE layer adds the text convention);
* a childless node is a directory only if this mount made it with ``mkdir``
  (remembered for the life of the mount, forgotten once the node is seen gone).
  Every other childless node is a file, also an empty node with an empty value
  that someone else made (``xenstore-write /a ""`` is a common flag);
* a directory's own value and every node's permissions are the xattrs
  ``user.xenstore.value`` and ``user.xenstore.perms`` (``xenstore-ls -p``
  notation without the parentheses, e.g. ``n0,r1``);
* writing a file is one XS_WRITE at commit (a new node in a transaction that
  checks that its directory still exists, since XS_WRITE would silently re-create
  it); ``rm`` and ``rmdir`` are XS_RM in a transaction that checks the node is a
  leaf or empty; ``mkdir`` is XS_MKDIR; renaming a file is one transaction
  (read, write new, copy permissions, remove old), retried on EAGAIN.  Renaming a
  directory, or onto a name XenStore cannot hold, is EXDEV: ``mv`` then copies,
  and reports the copy's own error;
* on a guest connection an unreadable node is a directory of mode 0111: neither
  its type nor its permissions can be read, and below it lie nodes the guest may
  read (``/local`` and ``/local/domain`` are ``n0``).

Cache.  One watch on ``/`` tells of every change (xenstored fires a watch for
each written, created, removed or re-permissioned node, and for the root of a
removed subtree).  The cache is a tree of :class:`_Cached` nodes holding what was
fetched: the child list (``complete``), the value and the permissions.  An event
for ``P`` drops ``P``'s subtree, marks the parent's child list incomplete (P may
have been created or removed) and is pushed to the kernel; an event naming a
node below an unknown name also marks that ancestor's list incomplete (XS_WRITE
creates missing parents).  A gap (reconnection, overflowed watch buffer, the
watch's own initial event on ``/``) drops everything.

A fetch races with events: its reply may be older than an event that the watch
task processes before the fetching task resumes.  So every fetch takes a
snapshot of the watch stream's position (items consumed + items waiting) before
it asks, and stores its result only if no event since then could concern the
node (checked against a log of recent event paths once the watch task has
caught up), and no gap happened.  Otherwise the result is returned to the caller
but not kept.  xenstored sends events in order with the replies on the one
connection, so an event caused before the server answered is always counted.
Answers about content and names from the cache first let the watch take in
what the server already sent (:meth:`XenStoreView._ready`).

On an unprivileged (guest) connection xenstored only sends events for nodes the
guest may read, so the mount cannot learn of every change: nothing is cached
there, every operation asks the server (events still invalidate the kernel).
"""

from __future__ import annotations

import errno
import logging
import re
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import ChangeSink, Node, NodeKind, Path, View
from kvpfs.xenstore.client import (
    Connector,
    Transaction,
    WatchEvent,
    XenStoreClient,
    XenStoreError,
)
from kvpfs.xenstore.errnos import fs_error
from kvpfs.xenstore.protocol import (
    XENSTORE_PAYLOAD_MAX,
    Access,
    Perm,
    ProtocolError,
    is_valid_nodename,
    parse_perms_text,
)

__all__ = [
    "PERMS_XATTR",
    "VALUE_XATTR",
    "XenStoreView",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

VALUE_XATTR = "user.xenstore.value"
PERMS_XATTR = "user.xenstore.perms"
_XATTRS = [VALUE_XATTR, PERMS_XATTR]

#: XenStore node names: one path component of ``A-Za-z0-9-_@``.
_NAME = re.compile(r"[A-Za-z0-9_@-]+")

#: Watch events buffered before the client reports an overflow (then the cache is
#: dropped whole); a burst of this many changes costs a few MiB at most.
WATCH_CAPACITY = 65536
#: How many processed event paths are remembered for the fetch/event race check.
EVENT_LOG = 8192
#: Concurrent requests one listing makes for its children's types and sizes.
FETCH_CONCURRENCY = 128
DEFAULT_TIMEOUT = 10.0
#: Scheduler passes an answer from the cache waits at most for the watch task.
CATCH_UP_PASSES = 16


def _xs(path: Path) -> str:
    return "/" + "/".join(path)


def _related(a: Path, b: Path) -> bool:
    """One path is the other or below it: a change to either may concern the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


class _Cached:
    """What the mount knows of one existing node.

    ``kids`` holds the children known to exist (all of them when ``complete``);
    ``None`` instead of an empty dict keeps leaves small.
    """

    __slots__ = ("complete", "kids", "perms", "value")

    def __init__(self) -> None:
        self.kids: dict[str, _Cached] | None = None
        self.complete = False
        self.value: bytes | None = None
        self.perms: tuple[Perm, ...] | None = None


_NOTHING = object()


class _Flight:
    """One fetch in progress; concurrent askers for the same thing wait for it."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: object = _NOTHING
        self.error: FsError | None = None


class _Fetched:
    """A node as the server just described it (``exists`` False: it does not)."""

    __slots__ = ("exists", "kids", "perms", "unreadable", "value")

    def __init__(self) -> None:
        self.exists = True
        self.kids: list[str] = []
        self.value: bytes | None = None
        self.perms: tuple[Perm, ...] | None = None
        self.unreadable = False


_ABSENT = _Fetched()
_ABSENT.exists = False


_Snapshot = tuple[int, int]


# --------------------------------------------------------------------------- backend


class XenStoreView(View):
    """XenStore as the ``xenstore`` tree of the mount.

    ``socket_path`` is the xenstored socket (or xenbus device) to use; None follows
    libxenstore's rules (:mod:`kvpfs.xenstore.locate`, with ``env``); the view
    never starts a xenstored itself (the composition root does).  ``connect``
    replaces the socket with any stream factory (tests count requests with it).
    ``domid`` says which guest an unprivileged connection speaks for (read from
    the relative node ``domid`` when not given); it only matters for the mode bits.
    ``timeout`` bounds every request (EIO after it; pass the mount's ``timeout=S``).
    """

    name = "xenstore"
    has_xattrs = True
    unwritable_errno = errno.EACCES
    # Each request gives up after ``timeout`` and an operation makes at most a few
    # in a row (a listing stops at its first failure), so the FUSE layer need not
    # wrap every call in a deadline of its own.
    bounds_own_calls = True

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        connect: Connector | None = None,
        env: Mapping[str, str] | None = None,
        domid: int | None = None,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        watch_capacity: int = WATCH_CAPACITY,
    ) -> None:
        if connect is not None and socket_path is not None:
            raise ValueError("give either socket_path or connect, not both")
        self.socket_path = socket_path
        self.read_only = read_only
        self.timeout = timeout
        self._connect = connect
        self._env = env
        self._domid = domid
        self._watch_capacity = watch_capacity

        self._client: XenStoreClient | None = None
        self._sink: ChangeSink | None = None
        self._watch_pending: Callable[[], int] | None = None
        #: The watch is registered and its first item processed: the cache may be used.
        self._watching = False
        #: ``client.connections`` when the cache was last known good.
        self._conn_epoch = 0
        self.privileged = True
        self._caching = True

        self._root = _Cached()
        #: Items taken from the watch (events and gap markers).
        self._seq = 0
        #: Gaps so far: a fetch that spans one must not store its result.
        self._resets = 0
        self._log: deque[tuple[int, Path]] = deque(maxlen=EVENT_LOG)
        self._flights: dict[tuple[str, Path], _Flight] = {}
        #: Childless nodes this mount made with mkdir: directories while they exist.
        self._made_dirs: set[Path] = set()

    @property
    def client(self) -> XenStoreClient | None:
        """The connection while :meth:`run` runs (None otherwise)."""
        return self._client

    # ------------------------------------------------------------------ background

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, set the watch on ``/`` and keep the cache and the kernel in step
        with it until cancelled."""
        try:
            await self._run(sink, task_status)
        except BaseExceptionGroup as group:
            # The nursery only wraps: the mount should see why it failed, plainly.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _run(self, sink: ChangeSink, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            if self._connect is not None:
                client = XenStoreClient(
                    connect=self._connect, timeout=self.timeout, watch_capacity=self._watch_capacity
                )
            else:
                client = XenStoreClient(
                    self.socket_path,
                    env=self._env,
                    timeout=self.timeout,
                    watch_capacity=self._watch_capacity,
                )
            try:
                async with client:
                    self._client = client
                    await self._learn_identity(client)
                    self._sink = sink
                    await self._follow(client, task_status)
            finally:
                self._client = None
                self._sink = None
                self._watching = False
                nursery.cancel_scope.cancel()

    async def _learn_identity(self, client: XenStoreClient) -> None:
        try:
            await client.is_domain_introduced(0)
        except XenStoreError as exc:
            if exc.errno != errno.EACCES:
                raise
            self.privileged = False
        self._caching = self.privileged
        if not self.privileged and self._domid is None:
            try:
                self._domid = int(await client.read("domid"))
            except (XenStoreError, ValueError):
                log.warning("xenstore: cannot tell which domain this connection is")

    async def _follow(self, client: XenStoreClient, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            try:
                async with client.watch("/") as watch:
                    self._watch_pending = watch.pending
                    async for item in watch:
                        # Synchronous from here to the next item: consumed + waiting
                        # must always equal what the client delivered.
                        self._seq += 1
                        if isinstance(item, WatchEvent):
                            self._on_event(item.path)
                        else:
                            log.info("xenstore: %s; dropping the cache", type(item).__name__)
                            self._reset(push=True)
                            self._conn_epoch = client.connections
                        if not self._watching:
                            self._watching = True
                            self._conn_epoch = client.connections
                            if not started:
                                started = True
                                task_status.started()
            except XenStoreError as exc:
                if not started:
                    raise
                log.warning("xenstore: the watch on / ended: %s", exc)
                self._watching = False
                self._watch_pending = None
                self._reset(push=True)
            finally:
                # (At unmount there is nothing to tell the kernel any more.)
                self._watching = False
                self._watch_pending = None
            # Not connected, or the watch could not be registered again: retry.
            await trio.sleep(0.1)
            await client.wait_connected()

    def _pending(self) -> int:
        pending = self._watch_pending
        return pending() if pending is not None else 0

    # ------------------------------------------------------------------ change tracking

    def _on_event(self, raw: str) -> None:
        if not raw.startswith("/"):
            return  # not a node (our watch is absolute; special names never match it)
        path: Path = tuple(raw[1:].split("/")) if raw != "/" else ()
        self._log.append((self._seq, path))
        self._changed(path, push=True)

    def _changed(self, path: Path, *, push: bool) -> None:
        """``path`` may have been written, created (with missing parents), removed
        (with its subtree) or re-permissioned."""
        if not path:
            self._reset(push=push)
            return
        node = self._root
        for depth in range(len(path) - 1):
            kids = node.kids
            child = kids.get(path[depth]) if kids else None
            if child is None:
                # An unknown name on the way: XS_WRITE may just have created it.
                self._child_changed(node, path[:depth], path[depth], push)
                return
            node = child
        self._child_changed(node, path[:-1], path[-1], push)

    def _child_changed(self, parent: _Cached, ppath: Path, name: str, push: bool) -> None:
        made = ppath in self._made_dirs
        was_file = bool(ppath) and parent.complete and not parent.kids and not made
        if parent.kids:
            parent.kids.pop(name, None)
        parent.complete = False
        sink = self._sink
        if not push or sink is None:
            return
        if not was_file:
            # (Below what the kernel knows as a file there is nothing to invalidate,
            # and the kernel would refuse the request with ENOTDIR.)
            sink.entries_changed(self, ppath, [name])
        if ppath and not parent.kids and not made:
            # Nothing else is known to be in the parent: it may have turned from a
            # directory into a file or back, which the kernel must look up anew.
            sink.entries_changed(self, ppath[:-1], [ppath[-1]])

    def _reset(self, *, push: bool) -> None:
        """Forget everything (a gap in the events: anything may have changed)."""
        self._resets += 1
        old, self._root = self._root, _Cached()
        sink = self._sink
        if not push or sink is None:
            return
        stack: list[tuple[Path, _Cached]] = [((), old)]
        while stack:
            path, node = stack.pop()
            if node.kids:
                sink.entries_changed(self, path, list(node.kids))
                stack.extend(((*path, n), c) for n, c in node.kids.items())

    def _snapshot(self) -> _Snapshot:
        return (self._seq + self._pending(), self._resets)

    def _may_store(self, snap: _Snapshot, path: Path) -> bool:
        """Whether a result fetched since ``snap`` is still current for ``path``."""
        if not self._caching or self._resets != snap[1] or not self._watching:
            return False
        delivered = self._seq + self._pending()
        if delivered == snap[0]:
            return True
        if self._seq != delivered:
            return False  # events newer than the request are still waiting
        log_ = self._log
        if not log_ or log_[0][0] > snap[0] + 1:
            return False  # the log no longer reaches back to the snapshot
        for seq, changed in reversed(log_):
            if seq <= snap[0]:
                break
            if _related(changed, path):
                return False
        return True

    # ------------------------------------------------------------------ cache access

    def _find(self, path: Path) -> _Cached | None:
        node = self._root
        for name in path:
            kids = node.kids
            if not kids:
                return None
            child = kids.get(name)
            if child is None:
                return None
            node = child
        return node

    def _ensure(self, path: Path) -> _Cached:
        node = self._root
        for name in path:
            kids = node.kids
            if kids is None:
                kids = node.kids = {}
            child = kids.get(name)
            if child is None:
                # The node exists (just fetched), so a list without it is outdated.
                node.complete = False
                child = kids[name] = _Cached()
            node = child
        return node

    def _known_absent(self, path: Path) -> bool:
        parent = self._find(path[:-1])
        return (
            parent is not None
            and parent.complete
            and (not parent.kids or path[-1] not in parent.kids)
        )

    def _store_kids(self, path: Path, names: Sequence[str]) -> None:
        node = self._ensure(path)
        old = node.kids or {}
        if names:
            intern = sys.intern
            node.kids = {n: old.get(n) or _Cached() for n in map(intern, names)}
        else:
            node.kids = None
        node.complete = True

    def _store_absent(self, path: Path) -> None:
        self._made_dirs.discard(path)
        parent = self._find(path[:-1])
        if parent is not None and parent.kids:
            parent.kids.pop(path[-1], None)

    def _node_of(self, path: Path, c: _Cached) -> Node | None:
        """The Node from cached facts, or None if something is missing."""
        if not c.complete:
            return None
        if c.kids or path in self._made_dirs or not path:
            return Node(NodeKind.DIR, writable=not self.read_only)
        if c.value is None:
            return None
        return Node(NodeKind.FILE, len(c.value), writable=not self.read_only)

    # ------------------------------------------------------------------ requests

    def _live(self) -> XenStoreClient:
        client = self._client
        if client is None or not client.connected or not self._watching:
            raise FsError(errno.EIO, "xenstore: xenstored is not reachable")
        if client.connections != self._conn_epoch:
            # Reconnected and the watch is registered again, but its Reconnected
            # marker is not processed yet: nothing cached may be trusted.
            self._conn_epoch = client.connections
            self._reset(push=True)
        return client

    async def _ready(self) -> XenStoreClient:
        """The client, once the watch has taken in what xenstored already sent.

        A change someone just made (``xenstore-write K V && cat K``) was announced
        to us before the writer got its reply, but the event may still sit unread
        in the socket buffer when the reader's request arrives.  The poll that woke
        the FUSE worker for this request also found the socket readable and
        scheduled the client's reader beside it: one scheduler pass lets the reader
        take the event in, then the watch task applies what it queued.
        """
        self._live()
        if self._caching:
            await trio.lowlevel.checkpoint()
            for _ in range(CATCH_UP_PASSES):
                if not self._pending():
                    break
                await trio.lowlevel.checkpoint()
        return self._live()

    async def _ask(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except XenStoreError as exc:
            raise fs_error(exc) from None

    async def _single(self, key: tuple[str, Path], fetch: Callable[[], Awaitable[T]]) -> T:
        """Run ``fetch`` once for all concurrent askers of ``key``."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise FsError(flight.error.errno, flight.error.message)
            if flight.result is not _NOTHING:
                return flight.result  # type: ignore[return-value]
            # The first asker was cancelled: ask again.
        flight = self._flights[key] = _Flight()
        try:
            result = await fetch()
            flight.result = result
            return result
        except FsError as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _fetch(self, path: Path) -> _Fetched:
        """Type, value (of a file) and, for a guest, permissions of ``path``.
        Stores what it may in the cache."""
        client = self._live()
        xs = _xs(path)
        snap = self._snapshot()
        got = _Fetched()
        try:
            if self.privileged:
                got.kids = await client.directory(xs)
            else:
                got.perms = await self._guest_perms(client, xs)
                try:
                    got.kids = await client.directory(xs)
                except XenStoreError as exc:
                    if exc.errno != errno.EACCES:
                        raise
                    got.unreadable = True
                    return got
            if not got.kids and path not in self._made_dirs:
                got.value = await client.read(xs)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                if self._may_store(snap, path):
                    self._store_absent(path)
                return _ABSENT
            raise fs_error(exc) from None
        if self._may_store(snap, path):
            self._store_kids(path, got.kids)
            if got.value is not None:
                self._ensure(path).value = got.value
        return got

    async def _guest_perms(self, client: XenStoreClient, xs: str) -> tuple[Perm, ...] | None:
        try:
            return tuple(await client.get_perms(xs))
        except XenStoreError as exc:
            if exc.errno == errno.EACCES:
                return None
            raise

    def _access(self, perms: tuple[Perm, ...] | None) -> Access:
        if self.privileged:
            return Access.BOTH
        if not perms:
            return Access.NONE
        domid = self._domid
        if domid is not None and perms[0].domid == domid:
            return Access.BOTH
        for p in perms[1:]:
            if p.domid == domid:
                return p.access
        return perms[0].access

    def _fetched_node(self, path: Path, got: _Fetched) -> Node:
        access = self._access(got.perms)
        writable = bool(access & Access.WRITE) and not self.read_only
        if got.unreadable:
            # Neither its type nor its permissions can be known.  As a directory
            # (mode 0111) it still leads to the nodes below it that the guest may
            # read, as XenStore allows: /local and /local/domain are n0.
            return Node(NodeKind.DIR, writable=False, readable=False)
        readable = bool(access & Access.READ)
        if got.kids or path in self._made_dirs:
            return Node(NodeKind.DIR, writable=writable, readable=readable)
        size = len(got.value) if got.value is not None else 0
        return Node(NodeKind.FILE, size, writable=writable, readable=readable)

    async def _node(self, path: Path, c: _Cached | None) -> Node | None:
        """The node at ``path`` (``c``: its cache entry if the caller has it)."""
        if self._caching:
            if c is not None:
                node = self._node_of(path, c)
                if node is not None:
                    return node
            elif self._known_absent(path):
                return None
        got = await self._single(("node", path), lambda: self._fetch(path))
        if not got.exists:
            return None
        return self._fetched_node(path, got)

    async def _children(self, path: Path) -> list[str]:
        c = self._find(path)
        if c is not None and c.complete and self._caching:
            return list(c.kids) if c.kids else []
        return await self._single(("list", path), lambda: self._fetch_children(path))

    async def _fetch_children(self, path: Path) -> list[str]:
        client = self._live()
        snap = self._snapshot()
        names = await self._ask(client.directory(_xs(path)))
        if self._may_store(snap, path):
            self._store_kids(path, names)
        return names

    # ------------------------------------------------------------------ names

    def _existing(self, path: Path) -> None:
        """A path that cannot name a node is ENOENT (asking would give EINVAL)."""
        if not all(map(_valid_name, path)) or not is_valid_nodename(_xs(path)):
            raise FsError(errno.ENOENT)

    def _new(self, path: Path) -> str:
        """The XenStore path for a node to create, or the errno the caller gets."""
        if not path:
            raise FsError(errno.EEXIST)
        if not _valid_name(path[-1]):
            raise FsError(errno.EINVAL, f"{path[-1]!r}: XenStore names are A-Za-z0-9-_@ only")
        self._existing(path[:-1])
        xs = _xs(path)
        if not is_valid_nodename(xs):
            raise FsError(errno.ENAMETOOLONG)
        if self.read_only:
            raise FsError(errno.EROFS)
        return xs

    # ------------------------------------------------------------------ reading

    async def lookup(self, path: Path) -> Node:
        if not path:
            return Node(NodeKind.DIR, writable=self.privileged and not self.read_only)
        self._live()
        c = self._find(path) if self._caching else None
        if c is not None:
            node = self._node_of(path, c)
            if node is not None:
                # Only attributes ride on this (the kernel caches them anyway and
                # the watch pushes their changes); no need to catch up first.
                return node
        else:
            # Only names that are in the cache are known to be valid.
            self._existing(path)
            # "No such node" must not come from an event not yet taken in.
            await self._ready()
        node = await self._node(path, self._find(path) if self._caching else None)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if path:
            self._existing(path)
        await self._ready()
        names = await self._children(path)
        if not names and path and path not in self._made_dirs:
            raise FsError(errno.ENOTDIR)
        nodes: dict[str, Node | None] = {}
        missing: list[str] = []
        parent = self._find(path) if self._caching else None
        kids = parent.kids if parent is not None else None
        for name in names:
            c = kids.get(name) if kids else None
            node = self._node_of((*path, name), c) if c is not None else None
            if node is None:
                missing.append(name)
            nodes[name] = node
        if missing:
            await self._fetch_many(path, missing, nodes)
        return [(name, node) for name, node in nodes.items() if node is not None]

    async def _fetch_many(
        self, path: Path, names: list[str], nodes: dict[str, Node | None]
    ) -> None:
        """Fetch the children's types (and files' sizes) with many requests in
        flight: a listing costs a few round trips, not one per child."""
        errors: list[FsError] = []
        pending = iter(names)

        async def worker(scope: trio.CancelScope) -> None:
            for name in pending:
                try:
                    nodes[name] = await self._node((*path, name), None)
                except FsError as exc:
                    # One failure fails the listing: the others need not wait
                    # for their own timeouts on a server that stopped answering.
                    errors.append(exc)
                    scope.cancel()
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(len(names), FETCH_CONCURRENCY)):
                nursery.start_soon(worker, nursery.cancel_scope)
        if errors:
            raise errors[0]

    async def read(self, path: Path) -> bytes:
        client = await self._ready()
        c = self._find(path) if self._caching else None
        if c is not None and c.value is not None:
            return c.value
        self._existing(path)
        return await self._single(("read", path), lambda: self._fetch_value(client, path))

    async def _fetch_value(self, client: XenStoreClient, path: Path) -> bytes:
        snap = self._snapshot()
        value = await self._ask(client.read(_xs(path)))
        if self._may_store(snap, path):
            self._ensure(path).value = value
        return value

    async def _perms(self, path: Path) -> tuple[Perm, ...]:
        client = await self._ready()
        c = self._find(path) if self._caching else None
        if c is not None and c.perms is not None:
            return c.perms
        snap = self._snapshot()
        perms = tuple(await self._ask(client.get_perms(_xs(path))))
        if self._may_store(snap, path):
            self._ensure(path).perms = perms
        return perms

    # ------------------------------------------------------------------ xattrs

    async def listxattr(self, path: Path) -> list[str]:
        return list(_XATTRS)

    async def getxattr(self, path: Path, name: str) -> bytes:
        if name == VALUE_XATTR:
            return await self.read(path) if path else await self._root_value()
        if name == PERMS_XATTR:
            if path:
                self._existing(path)
            perms = await self._perms(path)
            return ",".join(str(p) for p in perms).encode()
        # Asked before every write (security.capability): no request for it.
        raise FsError(errno.ENODATA)

    async def _root_value(self) -> bytes:
        client = self._live()
        return await self._ask(client.read("/"))

    async def setxattr(self, path: Path, name: str, value: bytes) -> None:
        if name not in _XATTRS:
            raise FsError(errno.ENOTSUP)
        if path:
            self._existing(path)
        if self.read_only:
            raise FsError(errno.EROFS)
        client = self._live()
        xs = _xs(path)
        try:
            if name == VALUE_XATTR:
                self._check_size(xs, value)
                await self._ask(client.write(xs, value))
            else:
                try:
                    perms = parse_perms_text(value.decode("ascii"))
                except (ProtocolError, UnicodeDecodeError):
                    raise FsError(errno.EINVAL, f"not a permission list: {value!r}") from None
                await self._ask(client.set_perms(xs, perms))
        finally:
            self._changed(path, push=False)

    # ------------------------------------------------------------------ changing

    @staticmethod
    def _check_size(xs: str, value: bytes) -> None:
        if len(xs.encode()) + 1 + len(value) > XENSTORE_PAYLOAD_MAX:
            raise FsError(errno.EFBIG, "a XenStore message holds 4096 bytes with the path")

    async def check_new_name(self, path: Path) -> None:
        self._new(path)
        client = self._live()
        if not self.privileged:
            # Refuse at open() what the commit would refuse anyway.
            perms = await self._guest_perms_of(client, _xs(path[:-1]))
            if not self._access(perms) & Access.WRITE:
                raise FsError(errno.EACCES)

    async def _guest_perms_of(self, client: XenStoreClient, xs: str) -> tuple[Perm, ...] | None:
        try:
            return await self._guest_perms(client, xs)
        except XenStoreError as exc:
            raise fs_error(exc) from None

    async def write(self, path: Path, value: bytes) -> None:
        xs = self._new(path)
        self._check_size(xs, value)
        client = self._live()
        c = self._find(path) if self._caching else None
        known = c is not None and c.complete
        try:
            if known or len(path) == 1 or not self.privileged:
                await self._ask(client.write(xs, value))
            else:
                parent = _xs(path[:-1])

                async def create(tx: Transaction) -> None:
                    # XS_WRITE would re-create a directory someone just removed.
                    await tx.read(parent)
                    await tx.write(xs, value)

                await self._transaction(client, create)
        finally:
            self._changed(path, push=False)

    async def remove(self, path: Path) -> None:
        self._existing(path)
        if self.read_only:
            raise FsError(errno.EROFS)
        client = self._live()
        xs = _xs(path)

        async def rm_leaf(tx: Transaction) -> None:
            # XS_RM takes the whole subtree: only a leaf is a file to unlink.
            if await tx.directory(xs):
                raise FsError(errno.EISDIR)
            await tx.rm(xs)

        try:
            await self._transaction(client, rm_leaf)
            self._keep_parent_a_dir(path)
        finally:
            self._changed(path, push=False)

    def _keep_parent_a_dir(self, path: Path) -> None:
        # Removing its last child would turn the parent into a file, and `rm -r`
        # (or mv's copy-and-delete) would then get ENOTDIR from the kernel for the
        # rmdir that follows: it stays a directory while it exists, as after mkdir.
        if len(path) > 1:
            self._made_dirs.add(path[:-1])

    async def mkdir(self, path: Path) -> None:
        xs = self._new(path)
        client = self._live()
        parent = _xs(path[:-1])

        async def make(tx: Transaction) -> None:
            # XS_MKDIR succeeds on an existing node and creates missing parents.
            if await _exists(tx, xs):
                raise FsError(errno.EEXIST)
            if len(path) > 1 and not await _exists(tx, parent):
                raise FsError(errno.ENOENT)
            await tx.mkdir(xs)

        try:
            await self._transaction(client, make)
            self._made_dirs.add(path)
        finally:
            self._changed(path, push=False)

    async def rmdir(self, path: Path) -> None:
        self._existing(path)
        if self.read_only:
            raise FsError(errno.EROFS)
        client = self._live()
        xs = _xs(path)

        async def rm_empty(tx: Transaction) -> None:
            if await tx.directory(xs):
                raise FsError(errno.ENOTEMPTY)
            await tx.rm(xs)

        try:
            await self._transaction(client, rm_empty)
            self._made_dirs.discard(path)
            self._keep_parent_a_dir(path)
        finally:
            self._changed(path, push=False)

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        self._existing(old)
        if not _valid_name(new[-1]):
            # rename(2)'s EINVAL reads "cannot move k to a subdirectory of itself" in
            # mv; EXDEV makes mv copy instead, and its create says "Invalid argument".
            raise FsError(errno.EXDEV, f"{new[-1]!r}: XenStore names are A-Za-z0-9-_@ only")
        xs_new = self._new(new)
        client = self._live()
        xs_old = _xs(old)
        new_parent = _xs(new[:-1])
        old_is_dir = old in self._made_dirs
        new_is_dir = new in self._made_dirs
        copy_perms = self.privileged

        async def move(tx: Transaction) -> None:
            if await tx.directory(xs_old) or old_is_dir:
                # A subtree move would copy every node; mv copies and deletes itself.
                raise FsError(errno.EXDEV)
            value = await tx.read(xs_old)
            perms = await tx.get_perms(xs_old) if copy_perms else None
            try:
                target_kids = await tx.directory(xs_new)
            except XenStoreError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                if len(new) > 1 and not await _exists(tx, new_parent):
                    raise FsError(errno.ENOENT) from None
            else:
                if not replace:
                    raise FsError(errno.EEXIST)
                if target_kids or new_is_dir:
                    raise FsError(errno.EISDIR)
            await tx.write(xs_new, value)
            if perms is not None:
                await tx.set_perms(xs_new, perms)
            await tx.rm(xs_old)

        try:
            await self._transaction(client, move)
        finally:
            self._changed(old, push=False)
            self._changed(new, push=False)

    async def _transaction(
        self, client: XenStoreClient, fn: Callable[[Transaction], Awaitable[None]]
    ) -> None:
        try:
            await client.run_in_transaction(fn)
        except XenStoreError as exc:
            raise fs_error(exc) from None

    # ------------------------------------------------------------------ introspection

    def cached_nodes(self) -> int:
        """How many nodes the cache holds (for the benchmark)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += 1
            if node.kids:
                stack.extend(node.kids.values())
        return count


async def _exists(tx: Transaction, xs: str) -> bool:
    try:
        await tx.read(xs)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True

