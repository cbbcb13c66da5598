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

from kvpfs import __version__
from kvpfs.config import MountConfig
from kvpfs.errors import UsageError
from kvpfs.fs.mount import SHUTDOWN_DEADLINE, Session, fuse_options, serve
from kvpfs.fs.operations import FsOptions, Operations
from kvpfs.fs.view import View
from kvpfs.info.view import InfoView
from kvpfs.kvp.location import (
    PoolDir,
    PoolDirError,
    PoolDirKind,
    create_pools,
    embedded_dir,
    find_pool_dir,
)
from kvpfs.kvp.view import KvpView
from kvpfs.peers.xendrivers import SimulatedXen
from kvpfs.peers.xenstored.server import XenstoredServer, serve_xenstored
from kvpfs.supervise import supervise
from kvpfs.vbd.layout import DEFAULT_SCRIPT_DIR
from kvpfs.vbd.view import VbdView
from kvpfs.xenstore import locate
from kvpfs.xenstore.view import XenStoreView

log = logging.getLogger(__name__)

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
        lines = [f"KVP pools: {self.pools.path} ({_POOL_WORDS[self.pools.kind]})"]
        if self.xen is XenSource.EMBEDDED:
            lines.append(f"embedded xenstored: XENSTORED_PATH={self.xenstored_path}")
        elif self.xen is XenSource.SHARED:
            lines.append(
                f"sharing another kvpfs's embedded xenstored: XENSTORED_PATH={self.xenstored_path}"
            )
        elif self.xen is XenSource.HOST:
            hotplug = "; attach runs the host's hotplug scripts" if self.hotplug else ""
            lines.append(f"XenStore: the host's xenstored at {self.xenstored_path}{hotplug}")
        return lines

    def facts(self) -> dict[str, str]:
        """What ``.kvpfs/`` in the mount shows (see :mod:`kvpfs.info.view`)."""
        facts = {
            "source": self.fsname,
            "kvp-dir": self.pools.path,
            "kvp-source": self.pools.kind.value,
            "xenstore": self.xen.value,
        }
        if self.xenstored_path is not None:
            facts["xenstored-path"] = self.xenstored_path
        facts["pid"] = str(os.getpid())
        facts["version"] = __version__
        return facts

    @property
    def fsname(self) -> str:
        """The mount's source as findmnt shows it: what it serves."""
        xen = {
            XenSource.OFF: "",
            XenSource.HOST: "+xenstore-host",
            XenSource.EMBEDDED: "+xenstore-embedded",
            XenSource.SHARED: "+xenstore-shared",
        }[self.xen]
        kvp = "embedded" if self.pools.kind is PoolDirKind.EMBEDDED else "host"
        if self.pools.kind is PoolDirKind.EXPLICIT:
            kvp = "dir"
        return f"kvpfs:kvp-{kvp}{xen}"


_POOL_WORDS = {
    PoolDirKind.LINUX: "this Hyper-V guest's live pools: kvp/guest writes reach the host",
    PoolDirKind.FREEBSD: "this Hyper-V guest's live pools: kvp/guest writes reach the host",
    PoolDirKind.EMBEDDED: "embedded, kept across mounts",
    PoolDirKind.EXPLICIT: "the directory given",
}


def embedded_socket_path(env: Mapping[str, str] | None = None) -> str:
    """The socket this process serves its embedded xenstored on: one per mount
    (each mount is its own process), under ``$XDG_RUNTIME_DIR/kvpfs`` or else
    beside the embedded pools (``$XDG_STATE_HOME/kvpfs``)."""
    e = os.environ if env is None else env
    runtime = e.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        directory = os.path.join(runtime, "kvpfs")
    else:
        directory = os.path.dirname(embedded_dir(e))
    return os.path.join(directory, f"xenstored-{os.getpid()}.sock")


def _reachable(path: str) -> str | None:
    """Why a xenstored named by the user cannot be used, or None."""
    if locate.find_xenstored({"XENSTORED_PATH": path}) == path:
        return None
    try:
        os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "nothing answers there"


def _pools(config: MountConfig, env: Mapping[str, str] | None) -> PoolDir:
    if config.source == "embedded" and config.kvp_dir is None:
        path = embedded_dir(env)
        create_pools(path, private=True)
        return PoolDir(path, PoolDirKind.EMBEDDED)
    pools = find_pool_dir(config.kvp_dir, env=env)
    if config.source == "host" and pools.kind is PoolDirKind.EMBEDDED:
        raise UsageError("source 'host': this machine has no Hyper-V KVP pools")
    return pools


def make_private_dir(path: str) -> None:
    """``path`` and missing parents as 0700 (a umask cannot widen or narrow it)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror or exc}") from None


def plan_mount(
    config: MountConfig,
    env: Mapping[str, str] | None = None,
    *,
    script_dir: str = DEFAULT_SCRIPT_DIR,
) -> MountPlan:
    """Decide, once, what the mount is made of (see the module's docstring)."""
    try:
        pools = _pools(config, env)
    except PoolDirError as exc:
        raise UsageError(str(exc)) from None
    if config.xenstore == "off":
        return MountPlan(pools, XenSource.OFF, None, hotplug=False)
    if config.xenstore == "auto" and config.source == "embedded":
        return MountPlan(pools, XenSource.EMBEDDED, embedded_socket_path(env), hotplug=False)
    if config.xenstore == "auto":
        found = locate.find_xenstored(env)
        if config.source == "host" and (found is None or locate.is_kvpfs_embedded(found)):
            raise UsageError("source 'host': this machine has no xenstored (use --xenstore off)")
        # Another kvpfs's socket (say, through an exported XENSTORED_PATH) is no
        # sign of a Xen host: this mount serves its own.
        if found is None or locate.is_kvpfs_embedded(found):
            return MountPlan(pools, XenSource.EMBEDDED, embedded_socket_path(env), hotplug=False)
        path = found
    else:
        path = config.xenstore
        why = _reachable(path)
        if why is not None:
            raise UsageError(f"no xenstored at {path}: {why}")
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
            lock_timeout=config.timeout,
        )
    ]
    views.append(InfoView(plan.facts()))
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
        """``await nursery.start(fn)`` in a cancel scope of its own; a failure after
        it started is logged and ``fn`` runs again (:func:`kvpfs.supervise.supervise`)."""
        peer = _Peer(name)

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with peer.scope:
                    await supervise(name, fn, task_status=task_status)
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
    options = fuse_options(
        fsname=config.fsname or plan.fsname,
        allow_other=config.allow_other,
        read_only=config.read_only,
        extra=config.fuse_extra,
    )
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery)
        try:
            xenstored = drivers = None
            if plan.xen is XenSource.EMBEDDED:
                assert plan.xenstored_path is not None
                make_private_dir(os.path.dirname(plan.xenstored_path))
                xenstored = await peers.start(
                    "the embedded xenstored",
                    functools.partial(serve_xenstored, plan.xenstored_path),
                )
                drivers = SimulatedXen(plan.xenstored_path, create_domains=EMBEDDED_GUESTS)
                await peers.start("the simulated Xen drivers", drivers.run)
            session = await nursery.start(
                functools.partial(serve, handle_signals=handle_signals),
                ops,
                config.mountpoint,
                options,
            )
            task_status.started(RunningMount(plan, session, xenstored, drivers))
            await session.done.wait()
        finally:
            await peers.stop()

