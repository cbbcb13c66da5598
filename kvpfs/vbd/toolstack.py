"""The toolstack's half of vbd attach and detach, over a :class:`XenStoreClient`.

Attach (``xl block-attach``): the nodes of :func:`kvpfs.vbd.layout.attach_ops` in
one transaction (retried on ``EAGAIN``), after checking in the same transaction
that the guest exists and the device does not; then a wait, bounded by
``attach_timeout``, for the backend to reach InitWait and ``hotplug-status`` to be
``connected``.  With a :class:`HotplugRunner` the backend's ``script`` is run with
``add`` once the backend is in InitWait, as libxl does on Linux; without one the
backend side (the simulated xbdback in embedded mode) plays the script's part.

Any failure after the transaction removes what it wrote (the same clean-up as a
detach), so a refused attach leaves the tree as it was.

Detach (``xl block-detach``): ``online=0`` and ``state=5`` in one transaction,
a wait for Closed (``detach_timeout``), then, if the backend did not close, the
forced path of libxl: remove the frontend and ask again.  Finally the frontend,
``/libxl`` and backend paths and their empty parents go in one transaction.

Every error is a :class:`VbdError` with the errno a caller should return.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import trio

from kvpfs.vbd.diskspec import DiskSpec, DiskSpecError, parse_disk_spec
from kvpfs.vbd.hotplug import HotplugRunner
from kvpfs.vbd.layout import (
    DEFAULT_PROTOCOL,
    DEFAULT_SCRIPT_DIR,
    MKDIR,
    RM,
    SET_PERMS,
    WRITE,
    DevicePaths,
    XsOp,
    attach_ops,
    cleanup_parents_stop,
    closing_ops,
    device_paths,
    dom0_ops,
    domain_creation_ops,
    unsupported_reason,
)
from kvpfs.vbd.states import XenbusState, parse_state, state_name
from kvpfs.xenstore.client import Transaction, WatchGap, XenStoreClient, XenStoreError
from kvpfs.xenstore.errnos import fs_errno

log = logging.getLogger(__name__)

__all__ = ["Toolstack", "VbdError", "parse_domid"]

T = TypeVar("T")

#: Xen's DOMID_FIRST_RESERVED: ids from here on are never guests.
DOMID_FIRST_RESERVED = 0x7FF0
_CLEANUP_TIMEOUT = 5.0


class VbdError(Exception):
    """An attach or detach failed; ``errno`` is what the caller should get."""

    def __init__(
        self,
        err: int,
        reason: str,
        *,
        paths: DevicePaths | None = None,
        snapshot: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__(f"[{errno.errorcode.get(err, err)}] {reason}")
        self.errno = err
        self.reason = reason
        #: The device, when the failure happened after its nodes were written.
        self.paths = paths
        #: View nodes as they were just before the clean-up.
        self.snapshot = snapshot or {}


def parse_domid(text: str) -> int | None:
    """A decimal domain id, or None if ``text`` is not one (it may be a name)."""
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return None
    value = int(text)
    return value if value < DOMID_FIRST_RESERVED else None


@dataclass(slots=True)
class _BackendView:
    exists: bool = False
    state: int | None = None
    hotplug_status: bytes | None = None
    nodes: dict[str, bytes] = field(default_factory=dict)


#: View nodes kept for the view when an attach fails.
SNAPSHOT_KEYS = ("state", "params", "mode", "dev", "hotplug-status", "hotplug-error")


class Toolstack:
    """attach/detach for guests whose vbds a backend domain serves (default dom0)."""

    def __init__(
        self,
        client: XenStoreClient,
        *,
        backend_domid: int = 0,
        attach_timeout: float = 10.0,
        detach_timeout: float = 10.0,
        hotplug: HotplugRunner | None = None,
        script_dir: str = DEFAULT_SCRIPT_DIR,
        protocol: str | None = DEFAULT_PROTOCOL,
        retries: int = 16,
    ) -> None:
        self.client = client
        self.backend_domid = backend_domid
        self.attach_timeout = attach_timeout
        self.detach_timeout = detach_timeout
        self.hotplug = hotplug
        self.script_dir = script_dir
        self.protocol = protocol
        self.retries = retries

    # ------------------------------------------------------------------ helpers

    async def _tx(self, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        try:
            return await self.client.run_in_transaction(fn, retries=self.retries)
        except XenStoreError as exc:
            raise VbdError(fs_errno(exc.errno), f"xenstore: {exc.strerror or exc}") from None

    async def resolve_domain(self, text: str) -> int:
        """A domain id from a number or a name (``/local/domain/*/name``)."""
        domid = parse_domid(text)
        if domid is not None:
            return domid
        try:
            for entry in await self.client.directory("/local/domain"):
                try:
                    name = await self.client.read(f"/local/domain/{entry}/name")
                except XenStoreError as exc:
                    if exc.errno == errno.ENOENT:
                        continue
                    raise
                if name == text.encode("utf-8", "surrogateescape") and entry.isdigit():
                    return int(entry)
        except XenStoreError as exc:
            if exc.errno != errno.ENOENT:
                raise VbdError(fs_errno(exc.errno), f"xenstore: {exc.strerror}") from None
        raise VbdError(errno.ENOENT, f"no domain named {text!r}")

    async def _read(self, path: str) -> bytes | None:
        try:
            return await self.client.read(path)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def snapshot(self, paths: DevicePaths) -> dict[str, bytes]:
        """The backend's summary nodes that exist (for a failure record)."""
        out: dict[str, bytes] = {}
        for key in SNAPSHOT_KEYS:
            value = await self._read(f"{paths.backend}/{key}")
            if value is not None:
                out[key] = value
        fe_state = await self._read(f"{paths.frontend}/state")
        if fe_state is not None:
            out["frontend-state"] = fe_state
        return out

    # ------------------------------------------------------------------ attach

    def parse(self, spec: DiskSpec | str) -> DiskSpec:
        if isinstance(spec, str):
            try:
                spec = parse_disk_spec(spec)
            except DiskSpecError as exc:
                raise VbdError(errno.EINVAL, f"bad disk spec: {exc}") from None
        reason = unsupported_reason(spec)
        if reason is not None:
            raise VbdError(errno.EINVAL, reason)
        return spec

    async def attach(self, domid: int, spec: DiskSpec | str) -> DevicePaths:
        """Attach ``spec`` to guest ``domid``; returns once the backend is ready."""
        spec = self.parse(spec)
        bdom = self.backend_domid
        if spec.backend is not None:
            bdom = await self.resolve_domain(spec.backend)
        paths = device_paths(domid, bdom, spec.devid)
        ops = attach_ops(
            domid, bdom, spec.devid, spec, protocol=self.protocol, script_dir=self.script_dir
        )

        async def write_nodes(tx: Transaction) -> None:
            if await _tx_read(tx, f"/local/domain/{domid}") is None:
                raise VbdError(errno.ENOENT, f"domain {domid} does not exist")
            for path in (paths.frontend, paths.backend, paths.libxl):
                if await _tx_read(tx, path) is not None:
                    raise VbdError(
                        errno.EEXIST,
                        f"vdev {spec.vdev} ({spec.devid}) of domain {domid} is in use "
                        f"({paths.name})",
                    )
            for op in ops:
                await apply_op(tx, op)

        await self._tx(write_nodes)
        log.info("vbd %s: attaching %s", paths.name, spec.target)
        try:
            with trio.fail_after(self.attach_timeout):
                await self._wait_ready(paths)
        except BaseException as exc:
            await self._undo_attach(paths, exc)
        log.info("vbd %s: attached (hotplug connected)", paths.name)
        return paths

    async def _undo_attach(self, paths: DevicePaths, exc: BaseException) -> NoReturn:
        """Remove the device's nodes and re-raise ``exc`` as a VbdError."""
        if isinstance(exc, trio.TooSlowError):
            error = VbdError(
                errno.ETIMEDOUT,
                f"the backend did not get ready within {self.attach_timeout:g} s",
            )
        elif isinstance(exc, VbdError):
            error = exc
        elif isinstance(exc, XenStoreError):
            error = VbdError(fs_errno(exc.errno), f"xenstore: {exc.strerror or exc}")
        else:
            error = None
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT):
            snapshot: dict[str, bytes] = {}
            try:
                snapshot = await self.snapshot(paths)
                if error is not None and error.errno == errno.ETIMEDOUT:
                    error.reason += _timeout_detail(snapshot)
                await self.destroy(paths)
            except (XenStoreError, VbdError) as cleanup_exc:
                log.error("vbd %s: clean-up after a failed attach: %s", paths.name, cleanup_exc)
        if error is None:
            raise exc
        log.error("vbd %s: attach failed: %s", paths.name, error.reason)
        raise VbdError(error.errno, error.reason, paths=paths, snapshot=snapshot) from None

    async def _backend_view(self, paths: DevicePaths) -> _BackendView:
        view = _BackendView()
        state = await self._read(f"{paths.backend}/state")
        view.exists = state is not None or await self._read(paths.backend) is not None
        view.state = parse_state(state)
        view.hotplug_status = await self._read(f"{paths.backend}/hotplug-status")
        return view

    async def _wait_ready(self, paths: DevicePaths) -> None:
        be = paths.backend
        interesting = {be, f"{be}/state", f"{be}/hotplug-status"}
        script_ran = self.hotplug is None
        async with self.client.watch(be) as watch:
            async for item in watch:
                if not isinstance(item, WatchGap) and item.path not in interesting:
                    continue
                view = await self._backend_view(paths)
                if not view.exists:
                    raise VbdError(errno.EIO, "the backend directory was removed")
                await self._check_hotplug(paths, view.hotplug_status)
                if view.state in (XenbusState.CLOSING, XenbusState.CLOSED):
                    raise VbdError(errno.EIO, f"the backend went {state_name(view.state)}")
                ready = view.state is not None and view.state >= XenbusState.INIT_WAIT
                if ready and not script_ran:
                    script_ran = True
                    await self._run_hotplug(paths, "add")
                    view = await self._backend_view(paths)
                    await self._check_hotplug(paths, view.hotplug_status)
                if ready and view.hotplug_status == b"connected":
                    return

    async def _check_hotplug(self, paths: DevicePaths, status: bytes | None) -> None:
        if status not in (b"error", b"busy"):
            return
        detail = await self._read(f"{paths.backend}/hotplug-error")
        message = (detail or b"").decode("utf-8", "replace") or "no hotplug-error given"
        if status == b"busy":
            raise VbdError(errno.EBUSY, f"hotplug: device in use: {message}")
        raise VbdError(errno.EIO, f"hotplug: {message}")

    async def _run_hotplug(self, paths: DevicePaths, action: str) -> None:
        assert self.hotplug is not None
        script = await self._read(f"{paths.backend}/script")
        if script is None:
            return
        result = await self.hotplug.run(
            script.decode("utf-8", "surrogateescape"), action, paths.domid, paths.devid
        )
        if action == "add" and not result.ok:
            status = await self._read(f"{paths.backend}/hotplug-status")
            await self._check_hotplug(paths, status)
            raise VbdError(errno.EIO, f"hotplug script exited {result.returncode}")

    # ------------------------------------------------------------------ detach

    async def detach(self, domid: int, devid: int) -> bool:
        """Detach device ``devid`` of ``domid``; True if it had to be forced."""
        paths = device_paths(domid, self.backend_domid, devid)
        state = await self._tx(lambda tx: self._close_tx(tx, paths, force=False))
        forced = False
        if state is not None:
            if not await self._wait_closed(paths):
                forced = True
                log.warning(
                    "vbd %s: the backend did not close within %g s; removing the frontend",
                    paths.name,
                    self.detach_timeout,
                )
                state = await self._tx(lambda tx: self._close_tx(tx, paths, force=True))
                if state is not None and not await self._wait_closed(paths):
                    log.error("vbd %s: the backend still did not close; removing it", paths.name)
            if self.hotplug is not None:
                await self._run_hotplug(paths, "remove")
        await self.destroy(paths)
        log.info("vbd %s: detached%s", paths.name, " (forced)" if forced else "")
        return forced

    async def _close_tx(self, tx: Transaction, paths: DevicePaths, *, force: bool) -> int | None:
        if force:
            await cleanup(tx, paths.frontend)
        raw = await _tx_read(tx, f"{paths.backend}/state")
        if raw is None:
            if not force:
                others = (paths.backend, paths.frontend, paths.libxl)
                if all([await _tx_read(tx, p) is None for p in others]):
                    raise VbdError(errno.ENOENT, f"{paths.name} does not exist")
            return None  # the backend is gone: only the clean-up is left
        state = parse_state(raw)
        for op in closing_ops(paths, state):
            await apply_op(tx, op)
        return state if state is not None else XenbusState.UNKNOWN

    async def _wait_closed(self, paths: DevicePaths) -> bool:
        be = paths.backend
        interesting = {be, f"{be}/state"}
        with trio.move_on_after(self.detach_timeout):
            async with self.client.watch(f"{be}/state") as watch:
                async for item in watch:
                    if not isinstance(item, WatchGap) and item.path not in interesting:
                        continue
                    raw = await self._read(f"{be}/state")
                    if raw is None or parse_state(raw) == XenbusState.CLOSED:
                        return True
        return False

    async def destroy(self, paths: DevicePaths) -> None:
        """Remove the frontend, ``/libxl`` and backend paths and their empty parents."""

        async def remove(tx: Transaction) -> None:
            for path in (paths.frontend, paths.libxl, paths.backend):
                await cleanup(tx, path)

        await self._tx(remove)


def _timeout_detail(snapshot: dict[str, bytes]) -> str:
    state = parse_state(snapshot.get("state"))
    status = snapshot.get("hotplug-status")
    if state is None or state < XenbusState.INIT_WAIT:
        return f" (backend state {state_name(state)}: no backend driver answered)"
    if status is None:
        return " (no hotplug-status)"
    return f" (hotplug-status {status.decode('utf-8', 'replace')})"


async def _tx_read(tx: Transaction, path: str) -> bytes | None:
    try:
        return await tx.read(path)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


async def apply_op(tx: Transaction | XenStoreClient, op: XsOp) -> None:
    """Send one layout operation; a removal of what is not there is no error."""
    if op.op == WRITE:
        await tx.write(op.path, op.value)
    elif op.op == SET_PERMS:
        await tx.set_perms(op.path, op.perms)
    elif op.op == MKDIR:
        await tx.mkdir(op.path)
    elif op.op == RM:
        try:
            await tx.rm(op.path)
        except XenStoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
    else:
        raise ValueError(f"unknown operation {op.op!r}")


async def cleanup(tx: Transaction, path: str) -> None:
    """Remove ``path``, then each parent that is left empty (no value, no children),
    up to the domain's own directory (libxl's ``libxl__xs_path_cleanup``)."""
    try:
        await tx.rm(path)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    parent = path.rpartition("/")[0]
    while parent and not cleanup_parents_stop(parent):
        value = await _tx_read(tx, parent)
        if value is None or value != b"" or await tx.directory(parent):
            return
        await tx.rm(parent)
        parent = parent.rpartition("/")[0]


async def create_domain(client: XenStoreClient, domid: int, name: str) -> None:
    """Lay out ``domid``'s home as libxl's domain creation does, unless it exists
    (one transaction; dom0's home too when it is missing)."""

    async def fn(tx: Transaction) -> None:
        try:
            await tx.read(f"/local/domain/{domid}")
            return
        except XenStoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
        ops = domain_creation_ops(domid, name)
        if domid != 0:
            try:
                await tx.read("/local/domain/0/name")
            except XenStoreError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                ops = dom0_ops() + ops
        for op in ops:
            await apply_op(tx, op)
        log.info("created domain %d (%s)", domid, name)

    await client.run_in_transaction(fn)
