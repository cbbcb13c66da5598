"""A Xen host without Xen: a simulated block backend (NetBSD's xbdback) and the
guests' block frontends (blkfront), each a long-running trio task on a
:class:`XenStoreClient`, so that attach and detach complete end to end.

:class:`SimulatedXbdback` watches ``/local/domain/<bdom>/backend/vbd``.  For each
device (reference §12.5, the NetBSD column):

1. goes to InitWait as soon as the toolstack's nodes appear;
2. plays the hotplug script's part (unless a real script runs, see
   ``play_hotplug``): resolves ``params`` to a regular image file or a block
   device, refuses a target already attached read-write elsewhere (or attached at
   all, for a read-write attach), opens it, and writes ``physical-device`` (decimal
   dev_t; for an image file a simulated ``vnd`` unit and ``vnd=/dev/vndNd``) and
   ``hotplug-status=connected`` — or ``hotplug-error`` and ``hotplug-status``
   ``error``/``busy``;
3. writes ``sectors``, ``info``, ``sector-size`` and ``feature-flush-cache`` in one
   transaction and switches to Connected, without waiting for the frontend;
4. notes the frontend's ring once the frontend is Initialised or Connected;
5. disconnects when the frontend closes (or is removed, or never connected and
   the toolstack asks for Closing) and switches to Closed;
6. forgets the device when its directory is removed.

It logs xbdback(4)'s diagnostics: ``xbd backend: attach device %s (size %d) for
domain %d``, ``xbd backend 0x%x for domain %d using event channel %d, protocol %s``
and ``xbdback %s: can't VOP_OPEN device 0x%x: %d``.

:class:`SimulatedBlkfront` plays every guest's frontend (or those of ``domids``):
once its backend is InitWait or Connected it writes ``ring-ref``,
``event-channel``, ``protocol`` and ``feature-persistent`` and goes Initialised;
when the backend is Connected it reads the disk's size and goes Connected; when
the backend is Closing it goes Closed.

Every write to a device directory is made in a transaction that first checks the
directory still exists, as Linux's xenbus does: a driver must never re-create the
nodes of a device the toolstack just removed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from kvpfs.vbd.layout import xbdback_name
from kvpfs.vbd.states import XenbusState, parse_state, state_name
from kvpfs.vbd.toolstack import create_domain
from kvpfs.xenstore.client import (
    Transaction,
    WatchGap,
    XenStoreClient,
    XenStoreError,
    read_many,
)

log = logging.getLogger(__name__)

__all__ = ["SimulatedBlkfront", "SimulatedXbdback", "SimulatedXen"]

#: blkif.h's ``info`` bits.
VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4
SECTOR_SIZE = 512
#: Block major of NetBSD's vnd(4) on amd64; image files get a simulated unit.
VND_MAJOR = 14
_STATE_RETRIES = 16


#: Changes a driver may have queued before it stops counting and rescans instead.
EVENT_QUEUE_LIMIT = 1 << 12


class ChangeQueue:
    """Paths a driver must look at, bounded.

    A burst of changes (a toolstack writing a thousand domains) must not grow a
    queue without limit nor end the driver: past ``limit`` queued paths, or on a
    gap in a watch (:class:`WatchGap`), the queue becomes one *gap* (None), and
    the consumer rescans everything it watches, as after a watch overflow.
    """

    def __init__(self, limit: int = EVENT_QUEUE_LIMIT) -> None:
        self._limit = limit
        self._paths: deque[str] = deque()
        self._gap = False
        self._wake = trio.Event()
        #: Times the queue collapsed into a gap (for tests and the log).
        self.overflows = 0

    def put(self, path: str | None) -> None:
        if path is None or len(self._paths) >= self._limit:
            if path is not None:
                self.overflows += 1
            self._paths.clear()
            self._gap = True
        elif not self._gap:
            self._paths.append(path)
        self._wake.set()

    def get_nowait(self) -> str | None:
        """The next path, or None for a gap; :class:`trio.WouldBlock` when empty."""
        if self._gap:
            self._gap = False
            return None
        if self._paths:
            return self._paths.popleft()
        raise trio.WouldBlock

    async def get(self) -> str | None:
        while True:
            try:
                return self.get_nowait()
            except trio.WouldBlock:
                self._wake = trio.Event()
                await self._wake.wait()


async def forward_watch(
    client: XenStoreClient,
    path: str,
    queue: ChangeQueue,
    *,
    skip_initial: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Put every event of a watch on ``path`` into ``queue`` (a gap as None)."""
    async with client.watch(path) as watch:
        task_status.started()
        initial = skip_initial
        async for item in watch:
            if initial and not isinstance(item, WatchGap):
                # The registration's own event: the consumer reads everything
                # after registering anyway.
                initial = False
                continue
            initial = False
            queue.put(None if isinstance(item, WatchGap) else item.path)


class _Gone(Exception):
    """The device's directory was removed (or re-created underneath us)."""


async def _guarded(
    client: XenStoreClient, directory: str, writes: Iterable[tuple[str, bytes]]
) -> None:
    """Write ``writes`` (keys below ``directory``) only if ``directory/state`` exists,
    in one transaction, so that a removed device is never re-created."""
    items = list(writes)

    async def fn(tx: Transaction) -> None:
        try:
            await tx.read(f"{directory}/state")
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                raise _Gone() from None
            raise
        for key, value in items:
            await tx.write(f"{directory}/{key}", value)

    await client.run_in_transaction(fn, retries=_STATE_RETRIES)


@dataclass(eq=False)
class _Tracker:
    """The few nodes a driver reacts to, kept current from its watches."""

    client: XenStoreClient
    own: str
    peer: str
    #: Whether ``own`` exists; False ends the device.
    exists: bool = True
    own_state: int | None = None
    peer_state: int | None = None
    extra: dict[str, bytes | None] = field(default_factory=dict)
    #: Progress so far: a drop back to Initialising means the device was re-created.
    phase: int = XenbusState.INITIALISING
    changes: ChangeQueue = field(default_factory=ChangeQueue)

    async def start(self, nursery: trio.Nursery, watched: Sequence[str]) -> None:
        for path in watched:
            await nursery.start(
                functools.partial(
                    forward_watch, self.client, path, self.changes, skip_initial=True
                )
            )

    async def refresh_all(self) -> None:
        paths = [f"{self.own}/state", f"{self.peer}/state", *self.extra]
        got = await read_many(self.client, paths)
        self.own_state = parse_state(got[f"{self.own}/state"])
        self.exists = got[f"{self.own}/state"] is not None
        self.peer_state = parse_state(got[f"{self.peer}/state"])
        for key in self.extra:
            self.extra[key] = got[key]
        self._check()

    async def _refresh(self, path: str | None) -> None:
        if path is None:
            await self.refresh_all()
            return
        if path in (self.own, f"{self.own}/state"):
            got = await read_many(self.client, [f"{self.own}/state"])
            raw = got[f"{self.own}/state"]
            self.exists = raw is not None
            self.own_state = parse_state(raw)
        elif path in (self.peer, f"{self.peer}/state"):
            got = await read_many(self.client, [f"{self.peer}/state"])
            self.peer_state = parse_state(got[f"{self.peer}/state"])
        elif path in self.extra:
            self.extra[path] = (await read_many(self.client, [path]))[path]
        self._check()

    def _check(self) -> None:
        if not self.exists:
            raise _Gone()
        if self.own_state == XenbusState.INITIALISING and self.phase > XenbusState.INITIALISING:
            raise _Gone()  # removed and attached again between two of our reads

    async def switch(self, state: XenbusState) -> None:
        """Write our own ``state`` (only while our directory exists)."""
        await _guarded(self.client, self.own, [("state", b"%d" % state)])
        self.own_state = self.phase = state

    async def wait(self, done: Callable[[], bool]) -> None:
        """Process events until ``done()``; raises :class:`_Gone`."""
        self._check()
        while not done():
            await self._refresh(await self.changes.get())
            while True:  # coalesce what is already queued
                try:
                    path = self.changes.get_nowait()
                except trio.WouldBlock:
                    break
                await self._refresh(path)


async def _run_tracked(
    t: _Tracker, watched: Sequence[str], lifecycle: Coroutine[Any, Any, None]
) -> None:
    """Run a device's ``lifecycle`` with ``t``'s watches.  :class:`_Gone` and
    XenStore errors come out as themselves, not wrapped in an exception group."""
    error: _Gone | XenStoreError | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await t.start(nursery, watched)
                await t.refresh_all()
                await lifecycle
            except (_Gone, XenStoreError) as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        lifecycle.close()
    if error is not None:
        raise error


@dataclass(eq=False)
class _Device:
    key: tuple[int, int]
    #: Bumped for every event about the device (see ``_Driver._device_task``).
    kicks: int = 0


class _Driver:
    """Discovery of devices from one watch, one task per device, restart when a
    device is re-created while its task is ending."""

    _pattern: re.Pattern[str]
    _what = "driver"

    def __init__(self, client: XenStoreClient) -> None:
        self.client = client
        self._devices: dict[tuple[int, int], _Device] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def _watch_paths(self) -> list[str]:
        raise NotImplementedError

    async def _scan(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    async def _serve_once(self, key: tuple[int, int]) -> None:
        raise NotImplementedError

    def _release(self, key: tuple[int, int]) -> None:
        """Free what the device held (called on every exit of ``_serve_once``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            changes = ChangeQueue()
            for watched in self._watch_paths():
                await nursery.start(forward_watch, self.client, watched, changes)
            for key in await self._scan():
                self._kick(key, start=True)
            task_status.started()
            overflows = 0
            while True:
                event = await changes.get()
                if event is None:
                    if changes.overflows != overflows:
                        overflows = changes.overflows
                        log.info("%s: more changes than queued; rescanning", self._what)
                    for key in await self._scan():
                        self._kick(key, start=True)
                    continue
                m = self._pattern.match(event)
                if m is not None:
                    self._kick((int(m.group(1)), int(m.group(2))), start=bool(m.group(3)))

    def _kick(self, key: tuple[int, int], *, start: bool) -> None:
        dev = self._devices.get(key)
        if dev is not None:
            dev.kicks += 1
        elif start and self._nursery is not None:
            self._devices[key] = _Device(key)
            self._nursery.start_soon(self._device_task, key)

    async def _device_task(self, key: tuple[int, int]) -> None:
        dev = self._devices[key]
        try:
            while True:
                try:
                    await self._serve_once(key)
                except _Gone:
                    pass
                except XenStoreError as exc:
                    log.error("%s %s: %s", self._what, key, exc)
                except Exception:
                    # One device's trouble must not take the others (or the mount) down.
                    log.exception("%s %s failed", self._what, key)
                finally:
                    self._release(key)
                # A kick that arrives while we check means the device may have been
                # created again after our read: look once more.
                seen = dev.kicks
                try:
                    present = await self._present(key)
                except XenStoreError as exc:
                    log.error("%s %s: %s", self._what, key, exc)
                    present = False
                if present:
                    continue
                if dev.kicks == seen:
                    break
        finally:
            del self._devices[key]

    async def _present(self, key: tuple[int, int]) -> bool:
        raise NotImplementedError


@dataclass(eq=False)
class _Opened:
    """A target the backend holds open."""

    fd: int
    path: str
    size: int
    busy_key: tuple[str, int, int]
    readwrite: bool
    physical_device: int
    vnd_unit: int | None = None

    @property
    def device_name(self) -> str:
        return f"vnd{self.vnd_unit}d" if self.vnd_unit is not None else self.path


class _Refused(Exception):
    def __init__(self, status: bytes, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SimulatedXbdback(_Driver):
    """NetBSD's xbdback for every vbd of backend domain ``backend_domid``.

    ``play_hotplug=False`` leaves ``physical-device`` and ``hotplug-status`` to a
    real hotplug script (the toolstack runs it) and opens the target once
    ``physical-device`` appears.
    """

    _what = "xbdback"

    def __init__(
        self,
        client: XenStoreClient,
        *,
        backend_domid: int = 0,
        play_hotplug: bool = True,
    ) -> None:
        super().__init__(client)
        self.backend_domid = backend_domid
        self.play_hotplug = play_hotplug
        self.base = f"/local/domain/{backend_domid}/backend/vbd"
        self._pattern = re.compile(rf"{re.escape(self.base)}/(\d+)/(\d+)(/.+)?$")
        self._opened: dict[tuple[int, int], _Opened] = {}
        #: (kind, dev, ino) of an open target → {device: read-write}.
        self._users: dict[tuple[str, int, int], dict[tuple[int, int], bool]] = {}

    @property
    def open_targets(self) -> int:
        return len(self._opened)

    def _watch_paths(self) -> list[str]:
        return [self.base]

    def _backend(self, key: tuple[int, int]) -> str:
        return f"{self.base}/{key[0]}/{key[1]}"

    async def _scan(self) -> list[tuple[int, int]]:
        keys: list[tuple[int, int]] = []
        try:
            domains = await self.client.directory(self.base)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        for d in domains:
            try:
                devids = await self.client.directory(f"{self.base}/{d}")
            except XenStoreError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            keys += [(int(d), int(i)) for i in devids if d.isdigit() and i.isdigit()]
        return keys

    async def _present(self, key: tuple[int, int]) -> bool:
        got = await read_many(self.client, [f"{self._backend(key)}/state"])
        return next(iter(got.values())) is not None

    def _release(self, key: tuple[int, int]) -> None:
        opened = self._opened.pop(key, None)
        if opened is None:
            return
        users = self._users.get(opened.busy_key)
        if users is not None:
            users.pop(key, None)
            if not users:
                del self._users[opened.busy_key]
        os.close(opened.fd)
        log.debug("%s: closed %s", xbdback_name(*key), opened.path)

    async def _serve_once(self, key: tuple[int, int]) -> None:
        be = self._backend(key)
        name = xbdback_name(*key)
        nodes = await read_many(
            self.client,
            [f"{be}/{k}" for k in ("frontend", "params", "mode", "device-type", "removable")],
        )
        frontend = nodes[f"{be}/frontend"]
        fe = (
            frontend.decode("utf-8", "surrogateescape")
            if frontend
            else f"/local/domain/{key[0]}/device/vbd/{key[1]}"
        )
        t = _Tracker(self.client, be, fe, extra={f"{be}/physical-device": None})
        await _run_tracked(t, [be, f"{fe}/state"], self._lifecycle(key, name, be, fe, t, nodes))

    async def _lifecycle(
        self,
        key: tuple[int, int],
        name: str,
        be: str,
        fe: str,
        t: _Tracker,
        nodes: dict[str, bytes | None],
    ) -> None:
        if t.own_state == XenbusState.INITIALISING:
            await t.switch(XenbusState.INIT_WAIT)
        t.phase = XenbusState.INIT_WAIT
        params = (nodes[f"{be}/params"] or b"").decode("utf-8", "surrogateescape")
        readwrite = nodes[f"{be}/mode"] != b"r"
        pdev_path = f"{be}/physical-device"

        def closing() -> bool:
            return t.own_state in (XenbusState.CLOSING, XenbusState.CLOSED)

        if self.play_hotplug and t.extra[pdev_path] is None:
            try:
                opened = self._open(key, name, params, readwrite)
            except _Refused as refused:
                log.error("%s: hotplug: %s", name, refused.message)
                await _guarded(
                    self.client,
                    be,
                    [
                        ("hotplug-error", refused.message.encode("utf-8", "surrogateescape")),
                        ("hotplug-status", refused.status),
                    ],
                )
                await self._close_when_asked(be, t, connected=lambda: False)
                return
            writes: list[tuple[str, bytes]] = []
            if opened.vnd_unit is not None:
                writes.append(("vnd", b"/dev/vnd%dd" % opened.vnd_unit))
            writes.append(("physical-device", b"%d" % opened.physical_device))
            writes.append(("hotplug-status", b"connected"))
            await _guarded(self.client, be, writes)
        else:
            await t.wait(lambda: t.extra[pdev_path] is not None or closing())
            if closing():
                await self._close_when_asked(be, t, connected=lambda: False)
                return
            try:
                self._open(key, name, params, readwrite)
            except _Refused:
                # NetBSD stays in InitWait after a failed open; the log says why.
                await self._close_when_asked(be, t, connected=lambda: False)
                return
        opened = self._opened[key]
        info = 0 if readwrite else VDISK_READONLY
        if nodes[f"{be}/device-type"] == b"cdrom":
            info |= VDISK_CDROM
        if nodes[f"{be}/removable"] == b"1":
            info |= VDISK_REMOVABLE
        await _guarded(
            self.client,
            be,
            [
                ("sectors", b"%d" % (opened.size // SECTOR_SIZE)),
                ("info", b"%d" % info),
                ("sector-size", b"%d" % SECTOR_SIZE),
                ("feature-flush-cache", b"1"),
            ],
        )
        log.info(
            "xbd backend: attach device %s (size %d) for domain %d",
            opened.device_name,
            opened.size,
            key[0],
        )
        await t.switch(XenbusState.CONNECTED)

        def fe_connected() -> bool:
            return t.peer_state in (XenbusState.INITIALISED, XenbusState.CONNECTED)

        await t.wait(lambda: fe_connected() or self._should_close(t, fe_connected))
        if fe_connected():
            ring = await read_many(
                self.client, [f"{fe}/ring-ref", f"{fe}/event-channel", f"{fe}/protocol"]
            )
            evtchn = _int(ring[f"{fe}/event-channel"])
            protocol = (ring[f"{fe}/protocol"] or b"").decode("ascii", "replace")
            log.info(
                "xbd backend 0x%x for domain %d using event channel %d, protocol %s",
                key[1],
                key[0],
                evtchn,
                protocol,
            )
        await self._close_when_asked(be, t, connected=fe_connected)

    @staticmethod
    def _should_close(t: _Tracker, connected: Callable[[], bool]) -> bool:
        if t.peer_state in (XenbusState.CLOSING, XenbusState.CLOSED, None):
            return True
        return t.own_state == XenbusState.CLOSING and not connected()

    async def _close_when_asked(
        self, be: str, t: _Tracker, connected: Callable[[], bool]
    ) -> None:
        """Disconnect once the frontend closes (or is gone, or never connected and the
        toolstack asks to close), switch to Closed, then wait for the removal."""
        key = _key_of(be)
        await t.wait(lambda: self._should_close(t, connected))
        self._release(key)
        if t.own_state != XenbusState.CLOSED:
            await t.switch(XenbusState.CLOSED)
        t.phase = XenbusState.CLOSED
        log.debug("%s: disconnected (frontend %s)", xbdback_name(*key), state_name(t.peer_state))
        await t.wait(lambda: False)

    def _open(self, key: tuple[int, int], name: str, params: str, readwrite: bool) -> _Opened:
        """Resolve and open the target (the hotplug script's and VOP_OPEN's part)."""
        if not params:
            raise _Refused(b"error", "params is empty")
        try:
            st = os.stat(params)
        except OSError as exc:
            raise _Refused(b"error", f"{params} does not exist: {exc.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            busy_key = ("blk", st.st_rdev, 0)
            dev_t = st.st_rdev
            vnd_unit = None
        elif stat.S_ISREG(st.st_mode):
            busy_key = ("file", st.st_dev, st.st_ino)
            vnd_unit = self._free_vnd_unit()
            dev_t = os.makedev(VND_MAJOR, vnd_unit * 8 + 3)
        else:
            raise _Refused(b"error", f"{params} is not a block device or regular file")
        users = self._users.get(busy_key, {})
        clash = [other for other, rw in users.items() if rw or readwrite]
        if clash:
            other = xbdback_name(*clash[0])
            log.error("xbdback %s: can't VOP_OPEN device 0x%x: %d", name, dev_t, errno.EBUSY)
            raise _Refused(
                b"busy",
                f"{params} is already attached "
                f"{'read-write' if users[clash[0]] else 'read-only'} as {other}",
            )
        flags = (os.O_RDWR if readwrite else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(params, flags)
        except OSError as exc:
            log.error(
                "xbdback %s: can't VOP_OPEN device 0x%x: %d", name, dev_t, exc.errno or errno.EIO
            )
            raise _Refused(b"error", f"cannot open {params}: {exc.strerror}") from None
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            size = 0
        opened = _Opened(fd, params, size, busy_key, readwrite, dev_t, vnd_unit)
        self._opened[key] = opened
        self._users.setdefault(busy_key, {})[key] = readwrite
        return opened

    def _free_vnd_unit(self) -> int:
        used = {o.vnd_unit for o in self._opened.values() if o.vnd_unit is not None}
        unit = 0
        while unit in used:
            unit += 1
        return unit


def _int(raw: bytes | None) -> int:
    try:
        return int(raw or b"")
    except ValueError:
        return -1


def _key_of(path: str) -> tuple[int, int]:
    parts = path.rsplit("/", 2)
    return int(parts[1]), int(parts[2])


class SimulatedBlkfront(_Driver):
    """The guests' blkfront for every vbd frontend (or those of ``domids``)."""

    _what = "blkfront"

    def __init__(
        self,
        client: XenStoreClient,
        *,
        domids: Iterable[int] | None = None,
        protocol: str = "x86_64-abi",
    ) -> None:
        super().__init__(client)
        self.domids = None if domids is None else sorted(set(domids))
        self.protocol = protocol
        self._pattern = re.compile(r"/local/domain/(\d+)/device/vbd/(\d+)(/.+)?$")
        self._next_ref = 8
        self._next_evtchn = 12

    def _watch_paths(self) -> list[str]:
        if self.domids is None:
            return ["/local/domain"]
        return [f"/local/domain/{d}/device/vbd" for d in self.domids]

    @staticmethod
    def _frontend(key: tuple[int, int]) -> str:
        return f"/local/domain/{key[0]}/device/vbd/{key[1]}"

    async def _scan(self) -> list[tuple[int, int]]:
        if self.domids is None:
            try:
                listed = await self.client.directory("/local/domain")
                domids = [int(d) for d in listed if d.isdigit()]
            except XenStoreError as exc:
                if exc.errno == errno.ENOENT:
                    return []
                raise
        else:
            domids = list(self.domids)
        keys: list[tuple[int, int]] = []
        for d in domids:
            try:
                devids = await self.client.directory(f"/local/domain/{d}/device/vbd")
            except XenStoreError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    continue
                raise
            keys += [(d, int(i)) for i in devids if i.isdigit()]
        return keys

    async def _present(self, key: tuple[int, int]) -> bool:
        got = await read_many(self.client, [f"{self._frontend(key)}/state"])
        return next(iter(got.values())) is not None

    async def _serve_once(self, key: tuple[int, int]) -> None:
        fe = self._frontend(key)
        got = await read_many(self.client, [f"{fe}/backend", f"{fe}/state"])
        backend = got[f"{fe}/backend"]
        if got[f"{fe}/state"] is None or not backend:
            raise _Gone()
        be = backend.decode("utf-8", "surrogateescape")
        t = _Tracker(self.client, fe, be)
        await _run_tracked(t, [fe, f"{be}/state"], self._lifecycle(key, fe, be, t))

    async def _lifecycle(self, key: tuple[int, int], fe: str, be: str, t: _Tracker) -> None:
        def backend_closing() -> bool:
            return t.peer_state in (XenbusState.CLOSING, XenbusState.CLOSED, None)

        await t.wait(
            lambda: t.peer_state in (XenbusState.INIT_WAIT, XenbusState.CONNECTED)
            or backend_closing()
            or t.own_state != XenbusState.INITIALISING
        )
        if not backend_closing() and t.own_state == XenbusState.INITIALISING:
            ring_ref, evtchn = self._next_ref, self._next_evtchn
            self._next_ref += 1
            self._next_evtchn += 1
            await _guarded(
                self.client,
                fe,
                [
                    ("ring-ref", b"%d" % ring_ref),
                    ("event-channel", b"%d" % evtchn),
                    ("protocol", self.protocol.encode()),
                    ("feature-persistent", b"1"),
                ],
            )
            await t.switch(XenbusState.INITIALISED)
            log.debug("xbd: domain %d device %d: using event channel %d", key[0], key[1], evtchn)
        await t.wait(lambda: t.peer_state == XenbusState.CONNECTED or backend_closing())
        if not backend_closing() and t.own_state == XenbusState.INITIALISED:
            disk = await read_many(
                self.client, [f"{be}/sectors", f"{be}/sector-size", f"{be}/info"]
            )
            sectors = max(_int(disk[f"{be}/sectors"]), 0)
            sector_size = _int(disk[f"{be}/sector-size"])
            log.debug(
                "xbd: domain %d device %d: %s MB, %d bytes/sect x %u sectors",
                key[0],
                key[1],
                sectors * max(sector_size, 0) // (1 << 20),
                sector_size,
                sectors,
            )
            await t.switch(XenbusState.CONNECTED)
        await t.wait(backend_closing)
        if t.own_state != XenbusState.CLOSED:
            await t.switch(XenbusState.CLOSED)
        t.phase = XenbusState.CLOSED
        await t.wait(lambda: False)


class SimulatedXen:
    """The simulated xbdback and blkfront, each on its own connection to xenstored
    (``path`` as :class:`XenStoreClient` takes it; None for the default location)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        backend_domid: int = 0,
        play_hotplug: bool = True,
        frontend_domids: Iterable[int] | None = None,
        frontend_path: str | None = None,
        create_domains: Sequence[tuple[int, str]] = (),
    ) -> None:
        self.path = path
        #: Guests to lay out as domain creation does, if their home is missing.
        self.create_domains = tuple(create_domains)
        self.backend_domid = backend_domid
        self.play_hotplug = play_hotplug
        self.frontend_domids = frontend_domids
        #: Where the frontend connects (a guest's domain socket), default ``path``.
        self.frontend_path = frontend_path
        self.backend: SimulatedXbdback | None = None
        self.frontend: SimulatedBlkfront | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started once both drivers watch their trees."""
        fe_path = self.frontend_path or self.path
        async with (
            XenStoreClient(self.path) as be_client,
            XenStoreClient(fe_path) as fe_client,
            trio.open_nursery() as nursery,
        ):
            for domid, name in self.create_domains:
                await create_domain(be_client, domid, name)
            self.backend = SimulatedXbdback(
                be_client, backend_domid=self.backend_domid, play_hotplug=self.play_hotplug
            )
            self.frontend = SimulatedBlkfront(fe_client, domids=self.frontend_domids)
            await nursery.start(self.backend.run)
            await nursery.start(self.frontend.run)
            task_status.started()
