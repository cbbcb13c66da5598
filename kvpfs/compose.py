"""The composition root of a mount: what it is made of, decided once, started in order.

:func:`plan_mount` looks at the host once: where the KVP pools are, and where
XenStore comes from: the host's own xenstored (one that libxenstore would find and
that is not a kvpfs embedded one, or the one ``--xenstore PATH`` names), another
kvpfs's embedded xenstored that the user named on purpose, or an embedded
xenstored that this mount serves itself on a socket of its own.

:func:`serve_mount` then starts the peers the plan needs as sibling tasks of one
nursery (the embedded xenstored, then the simulated Xen drivers that answer an
attach), then the views and the kernel mount.  On the way out it stops them in the
reverse order, each within :data:`SHUTDOWN_DEADLINE`.  Views never start peers,
and nothing but a composition root (this module, ``kvpfs hostsim``) imports
:mod:`kvpfs.peers`.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from kvpfs.config import MountConfig
from kvpfs.errors import UsageError
from kvpfs.fs.mount import Session, fuse_options, serve
from kvpfs.fs.operations import FsOptions, Operations
from kvpfs.fs.view import View
from kvpfs.kvp.location import PoolDir, PoolDirError, find_pool_dir
from kvpfs.kvp.view import KvpView
from kvpfs.peers.xendrivers import SimulatedXen
from kvpfs.peers.xenstored.server import XenstoredServer, serve_xenstored
from kvpfs.vbd.layout import DEFAULT_SCRIPT_DIR
from kvpfs.vbd.view import VbdView
from kvpfs.xenstore import locate
from kvpfs.xenstore.view import XenStoreView

log = logging.getLogger(__name__)

#: How long each part may take to stop before it is abandoned.
SHUTDOWN_DEADLINE = 5.0
#: The guests an embedded XenStore starts with (domain creation's layout), so that
#: ``vbd/attach`` has a frontend domain to attach to.
EMBEDDED_GUESTS: tuple[tuple[int, str], ...] = ((1, "guest1"),)


class XenSource(enum.Enum):
    #: ``--xenstore off``: the mount shows ``kvp/`` only.
    OFF = "off"
    #: A xenstored of this host: dom0's socket, a guest's xenbus device, or a
    #: socket named with ``--xenstore PATH`` that is not a kvpfs embedded one.
    HOST = "host"
    #: This mount serves its own embedded xenstored on a socket of its own, and
    #: plays the backend and frontend drivers beside it.
    EMBEDDED = "embedded"
    #: Another kvpfs's embedded xenstored, named on purpose with ``--xenstore PATH``:
    #: used as it is; its owner plays the drivers.
    SHARED = "shared"


@dataclass(frozen=True, slots=True)
class MountPlan:
    pools: PoolDir
    xen: XenSource
    #: The xenstored socket or xenbus device (None with OFF).
    xenstored_path: str | None
    #: Run the host's block hotplug script on attach (a real dom0 only).
    hotplug: bool

    def describe(self) -> list[str]:
        """Where the mount serves data from, one line each, for the user."""
        lines = []
        if self.xen is XenSource.EMBEDDED:
            lines.append(f"embedded xenstored: XENSTORED_PATH={self.xenstored_path}")
        elif self.xen is XenSource.SHARED:
            lines.append(
                f"sharing another kvpfs's embedded xenstored: XENSTORED_PATH={self.xenstored_path}"
            )
        return lines


def embedded_socket_path(env: Mapping[str, str] | None = None) -> str:
    """The socket this process serves its embedded xenstored on: one per mount
    (each mount is its own process), under ``$XDG_RUNTIME_DIR/kvpfs`` or else
    ``$XDG_STATE_HOME/kvpfs`` (``~/.local/state/kvpfs``)."""
    e = os.environ if env is None else env
    runtime = e.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        directory = os.path.join(runtime, "kvpfs")
    else:
        state = e.get("XDG_STATE_HOME") or os.path.join(
            e.get("HOME") or os.path.expanduser("~"), ".local", "state"
        )
        directory = os.path.join(state, "kvpfs")
    return os.path.join(directory, f"xenstored-{os.getpid()}.sock")


def plan_mount(
    config: MountConfig,
    env: Mapping[str, str] | None = None,
    *,
    script_dir: str = DEFAULT_SCRIPT_DIR,
) -> MountPlan:
    """Decide, once, what the mount is made of (see the module's docstring)."""
    try:
        pools = find_pool_dir(config.kvp_dir, env=env)
    except PoolDirError as exc:
        raise UsageError(str(exc)) from None
    if config.xenstore == "off":
        return MountPlan(pools, XenSource.OFF, None, hotplug=False)
    if config.xenstore == "auto":
        found = locate.find_xenstored(env)
        # Another kvpfs's socket (say, through an exported XENSTORED_PATH) is no
        # sign of a Xen host: this mount serves its own.
        if found is None or locate.is_kvpfs_embedded(found):
            return MountPlan(pools, XenSource.EMBEDDED, embedded_socket_path(env), hotplug=False)
        path = found
    else:
        path = config.xenstore
        if locate.is_kvpfs_embedded(path):
            return MountPlan(pools, XenSource.SHARED, path, hotplug=False)
    hotplug = os.path.exists(os.path.join(script_dir, "block"))
    return MountPlan(pools, XenSource.HOST, path, hotplug=hotplug)


def build_views(config: MountConfig, plan: MountPlan) -> list[View]:
    """The views of a mount, in the order of the mount's root directory."""
    views: list[View] = [
        KvpView(
            plan.pools.path,
            all_writable=config.kvp_all_writable,
            read_only=config.read_only,
            limits="format" if config.kvp_limits == "format" else "host",
        )
    ]
    if plan.xen is not XenSource.OFF:
        views.append(
            XenStoreView(plan.xenstored_path, read_only=config.read_only, timeout=config.timeout)
        )
        views.append(
            VbdView(
                plan.xenstored_path,
                attach_timeout=config.vbd_timeout,
                detach_timeout=config.vbd_timeout,
                hotplug=plan.hotplug,
            )
        )
    return views


@dataclass(eq=False)
class RunningMount:
    """What :func:`serve_mount` hands to ``task_status.started``."""

    plan: MountPlan
    session: Session
    #: The embedded xenstored and the simulated drivers (EMBEDDED only).
    xenstored: XenstoredServer | None = None
    drivers: SimulatedXen | None = None


@dataclass(eq=False)
class _Peer:
    name: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Peers:
    """Peers as sibling tasks of one nursery, stopped in the reverse order of start."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._running: list[_Peer] = []

    async def start(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Any:
        """``await nursery.start(fn)`` in a cancel scope of its own."""
        peer = _Peer(name)

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with peer.scope:
                    await fn(task_status=task_status)
            finally:
                peer.done.set()

        value = await self._nursery.start(run)
        self._running.append(peer)
        return value

    async def stop(self, deadline: float = SHUTDOWN_DEADLINE) -> None:
        """Cancel each peer, newest first, waiting for each at most ``deadline``."""
        with trio.CancelScope(shield=True):
            while self._running:
                peer = self._running.pop()
                peer.scope.cancel()
                with trio.move_on_after(deadline):
                    await peer.done.wait()
                if not peer.done.is_set():
                    log.warning("%s did not stop within %.0f s; abandoned", peer.name, deadline)


async def serve_mount(
    config: MountConfig,
    plan: MountPlan,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[RunningMount] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the plan's peers, then mount its views; serve until unmounted."""
    ops = Operations(
        build_views(config, plan),
        FsOptions(
            raw=config.raw,
            uid=config.uid,
            gid=config.gid,
            attr_timeout=config.attr_timeout,
            store_timeout=config.timeout,
        ),
    )
    options = fuse_options(allow_other=config.allow_other, read_only=config.read_only)
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery)
        try:
            xenstored = drivers = None
            if plan.xen is XenSource.EMBEDDED:
                assert plan.xenstored_path is not None
                os.makedirs(os.path.dirname(plan.xenstored_path), mode=0o700, exist_ok=True)
                xenstored = await peers.start(
                    "the embedded xenstored",
                    functools.partial(serve_xenstored, plan.xenstored_path),
                )
                drivers = SimulatedXen(plan.xenstored_path, create_domains=EMBEDDED_GUESTS)
                await peers.start("the simulated Xen drivers", drivers.run)
            try:
                session = await nursery.start(
                    functools.partial(serve, handle_signals=handle_signals),
                    ops,
                    config.mountpoint,
                    options,
                )
            except RuntimeError as exc:
                raise UsageError(f"mounting on {config.mountpoint} failed: {exc}") from None
            task_status.started(RunningMount(plan, session, xenstored, drivers))
            await session.done.wait()
        finally:
            await peers.stop()

