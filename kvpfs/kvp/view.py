"""The ``kvp`` directory of the mount: one directory per pool, one file per key.

``kvp/`` holds the five pools by role: ``external`` (pool 0), ``guest`` (1),
``auto`` (2), ``auto_external`` (3) and ``auto_internal`` (4).  Each lists its
keys under their escaped names (:mod:`kvpfs.kvp.names`), once per key even when
the file holds duplicates: the first record is the key's value, as for the
daemon.

The host writes ``external`` and ``auto_external`` and the daemon synthesises
``auto``, so those three are read-only unless ``all_writable`` (a test rig that
plays the host); ``guest``, which the host reads, and the unused
``auto_internal`` are writable.  ``read_only`` (a ``ro`` mount) refuses every
change with EROFS.

Every read and change waits at most ``lock_timeout`` seconds for a lock another
process holds on a pool file (a mount passes its ``timeout=S``); a wait that runs
out fails with EIO and changes nothing, like a store that does not answer.
"""

from __future__ import annotations

import errno
import functools
import logging

import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import ChangeSink, Node, NodeKind, Path, View
from kvpfs.kvp.limits import LimitsMode, check_key, check_value
from kvpfs.kvp.location import pool_path
from kvpfs.kvp.names import MAX_NAME_BYTES, InvalidName, key_to_name, name_to_key
from kvpfs.kvp.pool import LOCK_TIMEOUT, PoolFile, PoolState
from kvpfs.kvp.records import MAX_KEY_BYTES

log = logging.getLogger(__name__)

#: Directory names of the pools, indexed by pool number.
POOL_NAMES = ("external", "guest", "auto", "auto_external", "auto_internal")
#: The pool the host reads; the host's UTF-8 and length rules apply to it.
GUEST_POOL = "guest"
WRITABLE_BY_DEFAULT = frozenset({"guest", "auto_internal"})

POLL_INTERVAL = 0.2

_ROOT = Node(NodeKind.DIR, writable=False)

# Names repeat across lookups and listings; both directions are pure functions.
_name_of = functools.lru_cache(maxsize=16384)(key_to_name)
_key_of = functools.lru_cache(maxsize=16384)(name_to_key)


class KvpView(View):
    """The pool files of one directory as the ``kvp`` tree."""

    name = "kvp"
    # Pool I/O is local; the only wait, for another process's lock, ends after
    # lock_timeout (the mount's timeout=S) with EIO, as a store that does not answer.
    bounds_own_calls = True
    #: Longest filename a key can get, for statfs's namemax.
    max_name_bytes = MAX_NAME_BYTES

    def __init__(
        self,
        directory: str,
        *,
        all_writable: bool = False,
        read_only: bool = False,
        limits: LimitsMode = "host",
        poll_interval: float = POLL_INTERVAL,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        if limits not in ("host", "format"):
            raise ValueError(f"unknown limits mode {limits!r}")
        self.directory = directory
        self.read_only = read_only
        self.poll_interval = poll_interval
        self._pools: dict[str, PoolFile] = {}
        self._writable: dict[str, bool] = {}
        self._host_rules: dict[str, bool] = {}
        for number, pool_name in enumerate(POOL_NAMES):
            pool = PoolFile(
                pool_path(directory, number), lock_timeout=lock_timeout, timeout_errno=errno.EIO
            )
            pool.on_change = functools.partial(self._pool_changed, pool_name)
            self._pools[pool_name] = pool
            self._writable[pool_name] = not read_only and (
                all_writable or pool_name in WRITABLE_BY_DEFAULT
            )
            self._host_rules[pool_name] = limits == "host" and pool_name == GUEST_POOL
        self._listings: dict[str, tuple[PoolState, list[tuple[str, Node]]]] = {}
        self._nodes: dict[str, tuple[PoolState, dict[str, Node]]] = {}
        self._sink: ChangeSink | None = None

    def pool(self, pool_name: str) -> PoolFile:
        """The pool file behind directory ``pool_name`` (KeyError if there is none)."""
        return self._pools[pool_name]

    # -- reading ---------------------------------------------------------------------------

    async def lookup(self, path: Path) -> Node:
        if not path:
            return _ROOT
        pool = self._pools.get(path[0])
        if pool is None:
            raise FsError(errno.ENOENT)
        state = await pool.state()
        if len(path) == 1:
            return Node(NodeKind.DIR, writable=self._writable[path[0]], mtime_ns=state.mtime_ns)
        nodes = self._nodes.get(path[0])
        if nodes is None or nodes[0] is not state:
            # Nodes are immutable and depend only on the state: build each once per state.
            nodes = self._nodes[path[0]] = (state, {})
        node = nodes[1].get(path[1])
        if node is None:
            value = state.get(_existing_key(path[1]))
            if value is None:
                raise FsError(errno.ENOENT)
            node = nodes[1][path[1]] = Node(
                NodeKind.FILE,
                size=len(value),
                writable=self._writable[path[0]],
                mtime_ns=state.mtime_ns,
            )
        if len(path) > 2:
            raise FsError(errno.ENOTDIR)
        return node

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if not path:
            return [(pool_name, await self.lookup((pool_name,))) for pool_name in POOL_NAMES]
        if len(path) > 1:
            await self.lookup(path)  # ENOENT or ENOTDIR
            raise FsError(errno.ENOTDIR)
        pool = self._pools.get(path[0])
        if pool is None:
            raise FsError(errno.ENOENT)
        state = await pool.state()
        cached = self._listings.get(path[0])
        if cached is not None and cached[0] is state:
            return list(cached[1])
        writable = self._writable[path[0]]
        mtime_ns = state.mtime_ns
        listing = [
            (
                _name_of(key),
                Node(NodeKind.FILE, size=len(value), writable=writable, mtime_ns=mtime_ns),
            )
            for key, value in state.items()
        ]
        self._listings[path[0]] = (state, listing)
        return list(listing)

    async def read(self, path: Path) -> bytes:
        if len(path) != 2:
            await self.lookup(path)
            raise FsError(errno.EISDIR if len(path) < 2 else errno.ENOTDIR)
        pool = self._pools.get(path[0])
        if pool is None:
            raise FsError(errno.ENOENT)
        value = (await pool.state()).get(_existing_key(path[1]))
        if value is None:
            raise FsError(errno.ENOENT)
        return value

    # -- changing --------------------------------------------------------------------------

    def _split(self, path: Path) -> tuple[str, str]:
        """(pool, filename) of a file path in a pool; the errno of anything else."""
        if not path:
            raise FsError(errno.EISDIR)
        if path[0] not in self._pools:
            if self.read_only:
                raise FsError(errno.EROFS)
            # The five pools are all there is at this level.
            raise FsError(errno.EPERM if len(path) == 1 else errno.ENOENT)
        if len(path) == 1:
            raise FsError(errno.EISDIR)
        if len(path) > 2:
            raise FsError(errno.ENOTDIR)
        return path[0], path[1]

    def _require_writable(self, pool_name: str) -> None:
        if not self._writable[pool_name]:
            raise FsError(errno.EROFS, f"the {pool_name} pool is read-only")

    def _new_key(self, pool_name: str, filename: str) -> bytes:
        try:
            key = _key_of(filename)
        except InvalidName as exc:
            raise FsError(errno.EINVAL, f"{filename!r} is not the name of any key") from exc
        check_key(key, host_rules=self._host_rules[pool_name])
        return key

    async def check_new_name(self, path: Path) -> None:
        pool_name, filename = self._split(path)
        self._require_writable(pool_name)
        self._new_key(pool_name, filename)

    async def write(self, path: Path, value: bytes) -> None:
        pool_name, filename = self._split(path)
        self._require_writable(pool_name)
        key = self._new_key(pool_name, filename)
        check_value(value, host_rules=self._host_rules[pool_name])
        await self._pools[pool_name].set(key, value)

    async def remove(self, path: Path) -> None:
        pool_name, filename = self._split(path)
        self._require_writable(pool_name)
        # No content rules here: a key someone else wrote must stay removable.
        await self._pools[pool_name].delete(_existing_key(filename))

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        if len(old) == 1 and old[0] in self._pools:
            raise FsError(errno.EROFS if self.read_only else errno.EPERM)
        old_pool, old_name = self._split(old)
        new_pool, new_name = self._split(new)
        if old_pool != new_pool:
            raise FsError(errno.EXDEV)
        self._require_writable(old_pool)
        old_key = _existing_key(old_name)
        new_key = self._new_key(new_pool, new_name)
        await self._pools[old_pool].rename(old_key, new_key, replace=replace)

    async def mkdir(self, path: Path) -> None:
        raise FsError(errno.EROFS if self.read_only else errno.EPERM)

    async def rmdir(self, path: Path) -> None:
        raise FsError(errno.EROFS if self.read_only else errno.EPERM)

    # -- changes by others -----------------------------------------------------------------

    def _pool_changed(self, pool_name: str, old: PoolState, new: PoolState) -> None:
        sink = self._sink
        if sink is None:
            return
        before = dict(old.items())
        after = dict(new.items())
        entries = [key for key in before if key not in after]
        entries += [key for key in after if key not in before]
        if entries:
            sink.entries_changed(self, (pool_name,), [_name_of(key) for key in entries])
        for key, value in after.items():
            if key in before and before[key] != value:
                sink.value_changed(self, (pool_name, _name_of(key)))

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll the pool files and report what others change, until cancelled."""
        failures: dict[str, int] = {}
        await self._poll(failures)  # the first read is a baseline, not a change
        self._sink = sink
        task_status.started()
        try:
            while True:
                await trio.sleep(self.poll_interval)
                await self._poll(failures)
        finally:
            self._sink = None

    async def _poll(self, failures: dict[str, int]) -> None:
        for pool_name, pool in self._pools.items():
            try:
                await pool.state()
            except FsError as exc:
                # Once per new errno: a pool that stays unreadable must not flood the log.
                if failures.get(pool_name) != exc.errno:
                    log.warning("kvp: cannot read the %s pool: %s", pool_name, exc)
                failures[pool_name] = exc.errno
            else:
                failures.pop(pool_name, None)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()


def _existing_key(filename: str) -> bytes:
    """The key named ``filename``, for operations on an existing key."""
    try:
        key = _key_of(filename)
    except InvalidName as exc:
        raise FsError(errno.ENOENT) from exc
    if len(key) > MAX_KEY_BYTES:
        raise FsError(errno.ENAMETOOLONG)
    return key
