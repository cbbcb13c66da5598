"""The mount's ``vbd/``: block devices as the backend domain sees them.

::

    vbd/attach                     write "<domid|name> <disk spec>" to attach
    vbd/xbdback<domid>i<devid>/    one per backend device (xbdback(4)'s names)
        domain devid vdev          the guest, the device number, its name (hda1)
        backend-state[-name]       XenbusState of the backend, number and name
        frontend-state[-name]      the same for the guest's frontend
        target mode                what is attached (``params``), ``w`` or ``r``
        size                       bytes, once the backend is Connected
        hotplug-status             as the hotplug script (or xbdback) wrote it
        hotplug-error              when it failed
        error                      why kvpfs's own attach failed (kept in memory)
        backend frontend           symlinks into ``xenstore/``

``rmdir vbd/xbdback3i51728`` detaches (``xl block-detach``).  An attach that
failed after its nodes were written leaves no node behind, but its directory stays
(with ``error``, the last backend state and the hotplug error) until it is removed
with ``rmdir`` or the same device is attached again.

Everything is read from XenStore when asked; :meth:`VbdView.run` watches
``backend/vbd`` and each device's frontend ``state`` only to push kernel cache
invalidations.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import ChangeSink, Node, NodeKind, Path, Stream, View
from kvpfs.vbd.hotplug import HotplugRunner
from kvpfs.vbd.layout import DEFAULT_SCRIPT_DIR, device_paths, parse_xbdback_name, xbdback_name
from kvpfs.vbd.states import XenbusState, parse_state, state_name
from kvpfs.vbd.toolstack import Toolstack, VbdError
from kvpfs.vbd.vdev import decode
from kvpfs.xenstore.client import WatchEvent, WatchGap, XenStoreClient, XenStoreError, read_many
from kvpfs.xenstore.errnos import fs_error

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["SUMMARY_FILES", "VbdView"]

ATTACH = "attach"
#: The summary files, in listing order (absent ones are skipped).
SUMMARY_FILES = (
    "domain",
    "devid",
    "vdev",
    "backend-state",
    "backend-state-name",
    "frontend-state",
    "frontend-state-name",
    "target",
    "mode",
    "size",
    "hotplug-status",
    "hotplug-error",
    "error",
)
LINKS = ("backend", "frontend")
#: Failed attaches remembered for their summary.
MAX_FAILED = 64
_BACKEND_KEYS = (
    "state",
    "params",
    "mode",
    "dev",
    "sectors",
    "sector-size",
    "hotplug-status",
    "hotplug-error",
    "frontend",
)


def _xenstore_errnos(
    fn: Callable[P, Awaitable[R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A XenStoreError leaving ``fn`` becomes the FsError ``xenstore/`` gives for it
    (one table, kvpfs.xenstore.errnos); the toolstack's VbdError keeps its errno."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except XenStoreError as exc:
            raise fs_error(exc) from None

    return wrapper


@dataclass(frozen=True, slots=True)
class _Failed:
    errno: int
    reason: str
    snapshot: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class _Summary:
    files: dict[str, bytes]
    links: dict[str, str]


class VbdView(View):
    """``vbd/`` over a xenstored (``xenstored_path``; None: where libxenstore looks).

    ``hotplug``: run the block hotplug script from ``script_dir`` as the toolstack
    does.  Whoever plays the backend driver (a real dom0's, or the simulated one
    that the composition root starts beside an embedded xenstored) is not the
    view's business: it only writes the toolstack's half and waits for the answer.
    """

    name = "vbd"
    unwritable_errno = errno.EACCES

    def __init__(
        self,
        xenstored_path: str | None = None,
        *,
        backend_domid: int = 0,
        attach_timeout: float = 10.0,
        detach_timeout: float = 10.0,
        hotplug: bool = False,
        script_dir: str = DEFAULT_SCRIPT_DIR,
        xenstore_dir: str = "xenstore",
        request_timeout: float | None = 10.0,
    ) -> None:
        self.xenstored_path = xenstored_path
        self.backend_domid = backend_domid
        self.attach_timeout = attach_timeout
        self.detach_timeout = detach_timeout
        self.hotplug = hotplug
        self.script_dir = script_dir
        self.xenstore_dir = xenstore_dir
        self.request_timeout = request_timeout
        self.base = f"/local/domain/{backend_domid}/backend/vbd"
        self._device_re = re.compile(rf"{re.escape(self.base)}/(\d+)/(\d+)(/.*)?$")
        self._client: XenStoreClient | None = None
        self._toolstack: Toolstack | None = None
        self._sink: ChangeSink | None = None
        self._failed: OrderedDict[tuple[int, int], _Failed] = OrderedDict()
        self._known: set[tuple[int, int]] = set()

    # ------------------------------------------------------------------ lifetime

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and watch; started once both are up.

        Raises the client's error (ENOENT, ECONNREFUSED, ...) when no xenstored
        answers.
        """
        async with XenStoreClient(self.xenstored_path, timeout=self.request_timeout) as client:
            runner = HotplugRunner(xenstored_path=self.xenstored_path) if self.hotplug else None
            self._toolstack = Toolstack(
                client,
                backend_domid=self.backend_domid,
                attach_timeout=self.attach_timeout,
                detach_timeout=self.detach_timeout,
                hotplug=runner,
                script_dir=self.script_dir,
            )
            self._sink = sink
            self._client = client
            try:
                await self._watch_backends(client, sink, task_status=task_status)
            finally:
                self._client = None
                self._toolstack = None

    @property
    def toolstack(self) -> Toolstack:
        if self._toolstack is None:
            raise FsError(errno.EIO, "the vbd view is not connected to xenstored")
        return self._toolstack

    def _xs(self) -> XenStoreClient:
        if self._client is None:
            raise FsError(errno.EIO, "the vbd view is not connected to xenstored")
        return self._client

    # ------------------------------------------------------------------ change reports

    async def _watch_backends(
        self,
        client: XenStoreClient,
        sink: ChangeSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        frontends: dict[tuple[int, int], trio.CancelScope] = {}
        async with trio.open_nursery() as nursery, client.watch(self.base) as watch:
            task_status.started()
            async for item in watch:
                try:
                    await self._follow(item, sink, nursery, frontends)
                except XenStoreError as exc:
                    # Only the kernel's caches suffer; the next event tries again.
                    log.warning("vbd view: %s", exc)
            nursery.cancel_scope.cancel()

    async def _follow(
        self,
        item: WatchEvent | WatchGap,
        sink: ChangeSink,
        nursery: trio.Nursery,
        frontends: dict[tuple[int, int], trio.CancelScope],
    ) -> None:
        if isinstance(item, WatchGap) or item.path == self.base:
            keys = set(await self._scan())
            for key in keys | self._known:
                self._report(sink, key)
            self._known = keys | set(self._failed)
            for key in keys - frontends.keys():
                frontends[key] = await nursery.start(self._watch_frontend, key, sink)
            for key in frontends.keys() - keys:
                frontends.pop(key).cancel()
            return
        m = self._device_re.match(item.path)
        if m is None:
            return
        key = (int(m.group(1)), int(m.group(2)))
        self._report(sink, key)
        if m.group(3) is None:
            if not await self._backend_exists(key) and key in frontends:
                frontends.pop(key).cancel()
        elif key not in frontends:
            frontends[key] = await nursery.start(self._watch_frontend, key, sink)

    async def _watch_frontend(
        self,
        key: tuple[int, int],
        sink: ChangeSink,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            path = f"{device_paths(key[0], self.backend_domid, key[1]).frontend}/state"
            try:
                async with self._xs().watch(path) as watch:
                    async for _ in watch:
                        self._report(sink, key)
            except (XenStoreError, FsError) as exc:
                log.debug("frontend watch for %s ended: %s", xbdback_name(*key), exc)

    def _report(self, sink: ChangeSink, key: tuple[int, int]) -> None:
        name = xbdback_name(*key)
        sink.entries_changed(self, (), [name])
        sink.entries_changed(self, (name,), [*SUMMARY_FILES, *LINKS])

    # ------------------------------------------------------------------ XenStore reads

    async def _scan(self) -> list[tuple[int, int]]:
        client = self._xs()
        keys: list[tuple[int, int]] = []
        try:
            domains = await client.directory(self.base)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        for d in domains:
            if not d.isdigit():
                continue
            try:
                devids = await client.directory(f"{self.base}/{d}")
            except XenStoreError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            keys += [(int(d), int(i)) for i in devids if i.isdigit()]
        return keys

    async def _backend_exists(self, key: tuple[int, int]) -> bool:
        path = f"{self.base}/{key[0]}/{key[1]}"
        return (await read_many(self._xs(), [path]))[path] is not None

    async def _devices(self) -> list[tuple[int, int]]:
        keys = set(await self._scan()) | set(self._failed)
        self._known |= keys
        return sorted(keys)

    async def _summary(self, key: tuple[int, int]) -> _Summary:
        domid, devid = key
        be = f"{self.base}/{domid}/{devid}"
        nodes = await read_many(self._xs(), [f"{be}/{k}" for k in _BACKEND_KEYS])
        values = {k: nodes[f"{be}/{k}"] for k in _BACKEND_KEYS}
        links: dict[str, str] = {}
        failed = self._failed.get(key)
        if values["state"] is None and not await self._backend_exists(key):
            if failed is None:
                raise FsError(errno.ENOENT)
            values = {k: failed.snapshot.get(k) for k in _BACKEND_KEYS}
            fe_state = failed.snapshot.get("frontend-state")
        else:
            failed = None
            fe = (values["frontend"] or b"").decode("utf-8", "surrogateescape")
            fe = fe or device_paths(domid, self.backend_domid, devid).frontend
            fe_state = (await read_many(self._xs(), [f"{fe}/state"]))[f"{fe}/state"]
            links["backend"] = self._link(be)
            links["frontend"] = self._link(fe)
        self._known.add(key)
        files: dict[str, bytes] = {
            "domain": b"%d" % domid,
            "devid": b"%d" % devid,
            "vdev": _vdev_name(devid, values["dev"]),
        }
        for side, raw in (("backend", values["state"]), ("frontend", fe_state)):
            state = parse_state(raw)
            files[f"{side}-state"] = b"" if state is None else b"%d" % state
            files[f"{side}-state-name"] = state_name(state).encode()
        files["target"] = values["params"] or b""
        files["mode"] = values["mode"] or b""
        size = _size(values)
        if size is not None and failed is None:
            files["size"] = b"%d" % size
        for k in ("hotplug-status", "hotplug-error"):
            if values[k] is not None:
                files[k] = values[k] or b""
        if failed is not None:
            files["error"] = (
                f"{errno.errorcode.get(failed.errno, failed.errno)}: {failed.reason}".encode(
                    "utf-8", "surrogateescape"
                )
            )
        return _Summary(files, links)

    def _link(self, xs_path: str) -> str:
        # The symlink lives in vbd/<name>/: up two levels is the mount's root.
        return f"../../{self.xenstore_dir}{xs_path}"

    # ------------------------------------------------------------------ View API

    @_xenstore_errnos
    async def lookup(self, path: Path) -> Node:
        if path == ():
            return Node(NodeKind.DIR, writable=True)
        if path == (ATTACH,):
            # A STREAM node: the attach runs inside write(2), so its errno reaches
            # every writer, bash's builtin echo included (it ignores close errors).
            return Node(NodeKind.STREAM, 0, writable=True, readable=False)
        key = parse_xbdback_name(path[0])
        if key is None or len(path) > 2:
            raise FsError(errno.ENOENT)
        summary = await self._summary(key)
        if len(path) == 1:
            return Node(NodeKind.DIR)
        return _node(summary, path[1])

    @_xenstore_errnos
    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if path == ():
            entries = [(ATTACH, await self.lookup((ATTACH,)))]
            for device in await self._devices():
                entries.append((xbdback_name(*device), Node(NodeKind.DIR)))
            return entries
        if path == (ATTACH,):
            raise FsError(errno.ENOTDIR)
        key = parse_xbdback_name(path[0])
        if key is None:
            raise FsError(errno.ENOENT)
        if len(path) > 1:
            await self.lookup(path)
            raise FsError(errno.ENOTDIR)
        summary = await self._summary(key)
        names = [*summary.files, *summary.links]
        return [(n, _node(summary, n)) for n in names]

    @_xenstore_errnos
    async def read(self, path: Path) -> bytes:
        if path == (ATTACH,):
            return b""
        key = parse_xbdback_name(path[0]) if path else None
        if key is None or len(path) != 2:
            raise FsError(errno.EISDIR if len(path) == 1 and key is not None else errno.ENOENT)
        summary = await self._summary(key)
        value = summary.files.get(path[1])
        if value is None:
            raise FsError(errno.ENOENT)
        return value

    @_xenstore_errnos
    async def write(self, path: Path, value: bytes) -> None:
        await self.lookup(path)
        raise FsError(errno.EACCES)

    async def open_stream(self, path: Path, flags: int) -> Stream:
        if path != (ATTACH,):
            raise FsError(errno.EPERM)
        return _AttachStream(self)

    async def check_new_name(self, path: Path) -> None:
        raise FsError(errno.EPERM)

    @_xenstore_errnos
    async def remove(self, path: Path) -> None:
        await self.lookup(path)
        raise FsError(errno.EPERM)

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        raise FsError(errno.EPERM)

    @_xenstore_errnos
    async def rmdir(self, path: Path) -> None:
        key = parse_xbdback_name(path[0]) if len(path) == 1 else None
        if key is None:
            node = await self.lookup(path)
            raise FsError(errno.ENOTDIR if node.kind is not NodeKind.DIR else errno.EPERM)
        await self.detach(*key)

    # ------------------------------------------------------------------ operations

    @_xenstore_errnos
    async def attach(self, request: bytes) -> tuple[int, int]:
        """``<domid|name> <disk spec>`` → attach; returns (domid, devid)."""
        text = request.decode("utf-8", "surrogateescape")
        parts = text.split(None, 1)
        if len(parts) != 2 or "\n" in text:
            log.error("vbd attach: expected one line '<domain> <disk spec>', got %r", text)
            raise FsError(errno.EINVAL, "expected '<domain> <disk spec>'")
        domain, spec_text = parts
        toolstack = self.toolstack
        try:
            domid = await toolstack.resolve_domain(domain)
            spec = toolstack.parse(spec_text)
            key = (domid, spec.devid)
            paths = await toolstack.attach(domid, spec)
        except VbdError as exc:
            if exc.paths is not None:
                failed_key = (exc.paths.domid, exc.paths.devid)
                self._failed[failed_key] = _Failed(exc.errno, exc.reason, exc.snapshot)
                self._failed.move_to_end(failed_key)
                while len(self._failed) > MAX_FAILED:
                    self._failed.popitem(last=False)
                if self._sink is not None:
                    self._report(self._sink, failed_key)
            else:
                log.error("vbd attach %r: %s", text, exc.reason)
            raise FsError(exc.errno, exc.reason) from None
        self._failed.pop(key, None)
        if self._sink is not None:
            self._report(self._sink, key)
        return paths.domid, paths.devid

    @_xenstore_errnos
    async def detach(self, domid: int, devid: int) -> None:
        key = (domid, devid)
        if key in self._failed and not await self._backend_exists(key):
            del self._failed[key]
        else:
            try:
                await self.toolstack.detach(domid, devid)
            except VbdError as exc:
                log.error("vbd detach %s: %s", xbdback_name(domid, devid), exc.reason)
                raise FsError(exc.errno, exc.reason) from None
            self._failed.pop(key, None)
        if self._sink is not None:
            self._report(self._sink, key)


class _AttachStream(Stream):
    """An open ``vbd/attach``: each write(2) is one request, "<domain> <disk spec>"
    with or without its newline, and returns only when the attach is done."""

    def __init__(self, backend: VbdView) -> None:
        self._backend = backend

    async def read(self, size: int) -> bytes:
        return b""  # write-only (mode 0200); root may still open it, and sees nothing

    async def write(self, data: bytes) -> int:
        request = data[:-1] if data.endswith(b"\n") else data
        await self._backend.attach(request)
        return len(data)


def _node(summary: _Summary, name: str) -> Node:
    if name in summary.links:
        return Node(NodeKind.SYMLINK, target=summary.links[name])
    value = summary.files.get(name)
    if value is None:
        raise FsError(errno.ENOENT)
    return Node(NodeKind.FILE, len(value))


def _vdev_name(devid: int, dev: bytes | None) -> bytes:
    name = decode(devid)
    if name is not None:
        return name.encode()
    return dev if dev else b"%d" % devid


def _size(values: dict[str, bytes | None]) -> int | None:
    if parse_state(values["state"]) != XenbusState.CONNECTED:
        return None
    try:
        sectors = int(values["sectors"] or b"")
        sector_size = int(values["sector-size"] or b"512")
    except ValueError:
        return None
    return sectors * sector_size
