"""The ``host`` directory of the mount: the pools as the Hyper-V host sees them.

``host/`` is the other end of ``kvp/``: every operation here is a request the
host sends through the kernel to hv_kvp_daemon (:class:`kvpfs.peers.hyperv.host.KvpHost`)::

    host/external/        pool 0   written by the host     read-write
    host/guest/           pool 1   written by the guest    read-only
    host/auto/            pool 2   synthesised by the daemon (FQDN, OS, IP addresses)
    host/auto_external/   pool 3   written by the host     read-write
    host/net/<mac>/config          an adapter's IP configuration (GET/SET_IP_INFO)

Listing a directory enumerates the pool from index 0 until the daemon says the
pool ends, and reading a file enumerates until the first item with that key, so
both show what the daemon answers at that moment.  The host sees each key and
value through the kernel's conversion to UTF-16 (254 and 1022 units at most),
and an item that does not convert (invalid UTF-8 in the guest pool) ends the
host's enumeration: the listing shows the items before it, as the host would.

Writing a file sends SET, removing it DELETE, as ``Add-VMKvpItem`` /
``Remove-VMKvpItem`` would; renaming is a SET of the new name, then a DELETE of
the old one (the host has no rename).  The daemon's answer becomes the errno
(:func:`kvpfs.peers.hyperv.host.status_errno`).  A name the host cannot send intact is
refused before anything is sent: a key or value that is not UTF-8 is EILSEQ, a
key the kernel would cut to 511 bytes ENAMETOOLONG, a value it would cut to 2047
bytes EFBIG.

Names are the keys, escaped as in ``kvp/`` (:mod:`kvpfs.kvp.names`).  A lookup
(``stat``, and the lookup before every ``open`` or create) answers from the last
enumeration while it is younger than ``cache_ttl`` seconds, and enumerates
afresh otherwise: one enumeration per second at most, instead of one per file,
which matters because the daemon rereads the whole pool file for every single
request.  Listing and reading always ask the daemon.  What the host itself sets
or deletes (through this view or any other user of the same
:class:`~kvpfs.peers.hyperv.host.KvpHost`) is applied to that enumeration at once; what
the guest changes shows in lookups within ``cache_ttl``, like the kernel's own
attribute cache.

``host/net/`` is the host's view of the guest's network adapters, as Hyper-V's
``Msvm_GuestNetworkAdapterConfiguration`` shows it: one directory per adapter
the host gave the VM (:attr:`KvpHost.adapters`), named by its MAC in lower case
with colons, holding ``config``::

    IPAddresses=192.0.2.10,2001:db8::10
    Subnets=255.255.255.0,/64
    DefaultGateways=192.0.2.1
    DNSServers=192.0.2.53
    DHCPEnabled=false

Reading ``config`` sends a GET_IP_INFO and shows the answer (IPv6 subnets as
the daemon writes them, ``/64``).  Writing it, in the same format, sends a
SET_IP_INFO to the adapter's device GUID.  Like ``vbd/attach`` it is a stream
whose write(2) returns only once the daemon has answered, so its errno is the
daemon's status (:mod:`kvpfs.peers.hyperv.host` has the table):

* every write(2) sends the configuration made of the current one (a GET first,
  unless all five properties were written) and every property written since
  the file was opened.  So a file written line by line, as bash's ``echo`` and
  ``printf`` do (one write(2) per line), is sent as it grows, and its last line
  sends it whole; a line must not be split between two writes;
* a write that is not well formed (unknown name, an item that is no address) is
  EINVAL and sends nothing;
* properties that do not fit together yet (new ``IPAddresses`` before their
  ``Subnets``: one subnet per address, a dotted netmask for IPv4, a prefix
  length for IPv6) are EINVAL when the write holds more than one line; a
  single line waits for the next write instead, and if the file is closed
  before they fit, nothing is sent and the reason is logged.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import ChangeSink, Node, NodeKind, Path, Stream, View
from kvpfs.kvp.names import InvalidName, key_to_name, name_to_key
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import DEVICE_NAME, DeviceHandle, KvpDevice
from kvpfs.peers.hyperv.host import HostError, KvpHost, status_name
from kvpfs.peers.hyperv.ipconfig import (
    ConfigError,
    Inconsistent,
    IpConfig,
    format_config,
    is_complete,
    merge,
    parse_properties,
    validate,
)

log = logging.getLogger(__name__)

POOL_DIRS: dict[str, m.Pool] = {
    "external": m.Pool.EXTERNAL,
    "guest": m.Pool.GUEST,
    "auto": m.Pool.AUTO,
    "auto_external": m.Pool.AUTO_EXTERNAL,
}
WRITABLE_DIRS = frozenset({"external", "auto_external"})
NET_DIR = "net"
CONFIG = "config"
CACHE_TTL = 1.0

_ROOT = Node(NodeKind.DIR, writable=False)
_DIR = Node(NodeKind.DIR, writable=False)
_name_of = functools.lru_cache(maxsize=4096)(key_to_name)


@dataclass(eq=False)
class _Snapshot:
    taken: float
    values: dict[str, bytes] = field(default_factory=dict)


def _host_key(name: str, missing: int) -> str:
    """The host string behind a filename; ``missing`` is the errno if there is none."""
    try:
        raw = name_to_key(name)
    except InvalidName as exc:
        raise FsError(missing, f"{name!r} is not the name of any key") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FsError(
            errno.EILSEQ if missing != errno.ENOENT else errno.ENOENT,
            "the host speaks UTF-16: a key that is not UTF-8 cannot be sent",
        ) from exc


def _host_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class HostView(View):
    """The host's view of the pools, through a :class:`KvpHost`."""

    name = "host"

    def __init__(
        self, host: KvpHost, *, read_only: bool = False, cache_ttl: float = CACHE_TTL
    ) -> None:
        self.host = host
        self.read_only = read_only
        self.cache_ttl = cache_ttl
        self._snapshots: dict[str, _Snapshot] = {}
        self._warned: dict[str, int] = {}
        self._dirs = {int(pool): directory for directory, pool in POOL_DIRS.items()}
        host.listeners.append(self._host_changed)

    def _host_changed(self, pool: int, key: str, value: str | None) -> None:
        snapshot = self._snapshots.get(self._dirs.get(pool, ""))
        if snapshot is None:
            return
        name = _name_of(_host_bytes(key))
        if value is None:
            snapshot.values.pop(name, None)
        else:
            snapshot.values[name] = _host_bytes(value)

    # -- enumeration -----------------------------------------------------------------------

    def _pool(self, directory: str) -> m.Pool:
        pool = POOL_DIRS.get(directory)
        if pool is None:
            raise FsError(errno.ENOENT)
        return pool

    def _writable(self, directory: str) -> bool:
        return not self.read_only and directory in WRITABLE_DIRS

    async def _enumerate(self, directory: str) -> _Snapshot:
        pool = self._pool(directory)
        result = await self.host.items(pool)
        if result.failure:
            raise HostError(
                errno.EIO,
                f"enumeration of pool {int(pool)} failed: {result.failure}",
                status=result.end_status,
            )
        if not result.complete and self._warned.get(directory) != len(result.items):
            # The host's own behaviour: what follows a failing item stays invisible.
            log.warning(
                "host: enumeration of pool %d stops at item %d: %s",
                pool,
                len(result.items),
                status_name(result.end_status),
            )
        self._warned[directory] = len(result.items) if not result.complete else -1
        snapshot = _Snapshot(trio.current_time())
        for key, value in result.items:
            snapshot.values.setdefault(_name_of(_host_bytes(key)), _host_bytes(value))
        self._snapshots[directory] = snapshot
        return snapshot

    async def _find(self, directory: str, name: str) -> bytes:
        """The value of ``name`` as the host reads it now; ENOENT if the host sees none."""
        pool = self._pool(directory)
        key = _host_key(name, errno.ENOENT)
        value = await self.host.find(pool, key)
        snapshot = self._snapshots.get(directory)
        if value is None:
            if snapshot is not None:
                snapshot.values.pop(name, None)
            raise FsError(errno.ENOENT)
        data = _host_bytes(value)
        if snapshot is not None:
            snapshot.values[name] = data
        return data

    # -- reading ---------------------------------------------------------------------------

    async def lookup(self, path: Path) -> Node:
        if not path:
            return _ROOT
        if path[0] == NET_DIR:
            return self._net_node(path)
        self._pool(path[0])
        writable = self._writable(path[0])
        if len(path) == 1:
            return Node(NodeKind.DIR, writable=writable)
        snapshot = self._snapshots.get(path[0])
        if snapshot is None or trio.current_time() - snapshot.taken >= self.cache_ttl:
            snapshot = await self._enumerate(path[0])
        value = snapshot.values.get(path[1])
        if value is None:
            raise FsError(errno.ENOENT)
        if len(path) > 2:
            raise FsError(errno.ENOTDIR)
        return Node(NodeKind.FILE, size=len(value), writable=writable)

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if not path:
            return [
                (directory, await self.lookup((directory,)))
                for directory in (*POOL_DIRS, NET_DIR)
            ]
        if path[0] == NET_DIR:
            if self._net_node(path).kind is not NodeKind.DIR:
                raise FsError(errno.ENOTDIR)
            if len(path) == 1:
                return [(mac, _DIR) for mac in sorted(self.host.adapters)]
            return [(CONFIG, self._config_node())]
        if len(path) > 1:
            await self.lookup(path)
            raise FsError(errno.ENOTDIR)
        snapshot = await self._enumerate(path[0])
        writable = self._writable(path[0])
        return [
            (name, Node(NodeKind.FILE, size=len(value), writable=writable))
            for name, value in snapshot.values.items()
        ]

    async def read(self, path: Path) -> bytes:
        if path[:1] == (NET_DIR,):
            if self._net_node(path).kind is NodeKind.DIR:
                raise FsError(errno.EISDIR)
            return (await self.config_text(path[1])).encode()
        if len(path) != 2:
            await self.lookup(path)
            raise FsError(errno.EISDIR if len(path) < 2 else errno.ENOTDIR)
        return await self._find(path[0], path[1])

    # -- changing --------------------------------------------------------------------------

    def _target(self, path: Path) -> tuple[str, m.Pool, str]:
        if not path:
            raise FsError(errno.EISDIR)
        if path[0] == NET_DIR:
            if len(path) > 1:
                self._net_node(path[:-1])  # ENOENT for a directory that is not there
            raise FsError(errno.EROFS if self.read_only else errno.EPERM)
        if path[0] not in POOL_DIRS:
            raise FsError(errno.EROFS if self.read_only else errno.EPERM)
        if len(path) == 1:
            raise FsError(errno.EISDIR)
        if len(path) > 2:
            raise FsError(errno.ENOTDIR)
        if not self._writable(path[0]):
            raise FsError(errno.EROFS, f"the host does not write host/{path[0]}")
        return path[0], POOL_DIRS[path[0]], path[1]

    def _new_key(self, pool: m.Pool, name: str) -> str:
        key = _host_key(name, errno.EINVAL)
        units = len(m.utf16_units(key))
        if units > m.HOST_FIELD_KEY_UNITS:
            raise FsError(
                errno.ENAMETOOLONG,
                f"key is {units} UTF-16 units, the host sends at most {m.HOST_FIELD_KEY_UNITS}",
            )
        stored, _ = m.delivered(m.HostRequest(m.Op.SET, pool, key))
        if stored != _host_bytes(key):
            raise FsError(
                errno.ENAMETOOLONG,
                f"the kernel would store only {len(stored)} of the key's bytes",
            )
        return key

    async def check_new_name(self, path: Path) -> None:
        _, pool, name = self._target(path)
        self._new_key(pool, name)

    async def write(self, path: Path, value: bytes) -> None:
        _, pool, name = self._target(path)
        key = self._new_key(pool, name)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FsError(errno.EILSEQ, "the host sends UTF-16: the value is not UTF-8") from exc
        if "\0" in text:
            raise FsError(errno.EINVAL, "the value contains NUL")
        units = len(m.utf16_units(text))
        if units > m.HOST_FIELD_VALUE_UNITS:
            raise FsError(
                errno.EFBIG,
                f"value is {units} UTF-16 units, the host sends at most {m.HOST_FIELD_VALUE_UNITS}",
            )
        _, stored = m.delivered(m.HostRequest(m.Op.SET, pool, key, text))
        if stored != value:
            raise FsError(
                errno.EFBIG, f"the kernel would store only {len(stored)} of the value's bytes"
            )
        await self.host.set(pool, key, text)

    async def remove(self, path: Path) -> None:
        _, pool, name = self._target(path)
        await self.host.delete(pool, _host_key(name, errno.ENOENT))

    async def rename(self, old: Path, new: Path, *, replace: bool) -> None:
        if len(old) == 2 and len(new) == 2 and old[0] != new[0]:
            raise FsError(errno.EXDEV)
        directory, pool, old_name = self._target(old)
        _, _, new_name = self._target(new)
        value = await self._find(directory, old_name)
        new_key = self._new_key(pool, new_name)
        if not replace:
            try:
                await self._find(directory, new_name)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise FsError(errno.EEXIST)
        await self.host.set(pool, new_key, value.decode("utf-8"))
        await self.host.delete(pool, _host_key(old_name, errno.ENOENT))

    async def mkdir(self, path: Path) -> None:
        raise FsError(errno.EROFS if self.read_only else errno.EPERM)

    # -- host/net ---------------------------------------------------------------------------

    def _config_node(self) -> Node:
        return Node(NodeKind.STREAM, writable=not self.read_only)

    def _net_node(self, path: Path) -> Node:
        if len(path) == 1:
            return _DIR
        if path[1] not in self.host.adapters:
            raise FsError(errno.ENOENT)
        if len(path) == 2:
            return _DIR
        if path[2] != CONFIG or len(path) > 3:
            raise FsError(errno.ENOENT)
        return self._config_node()

    async def config_text(self, mac: str) -> str:
        """GET_IP_INFO for the adapter ``mac``, as ``config`` shows it."""
        return format_config(await self.host.get_ip_info(mac))

    async def write_config(
        self, mac: str, data: bytes, written: dict[str, object]
    ) -> tuple[dict[str, object], bool]:
        """One write(2) to ``net/<mac>/config`` after the properties ``written`` so
        far in that open file: SET_IP_INFO for the adapter.

        Returns every property written so far, and whether they were sent (False:
        they wait for a write that makes them fit together).
        """
        adapter = self.host.adapters.get(mac)
        if adapter is None:
            raise FsError(errno.ENOENT)
        if self.read_only:
            raise FsError(errno.EROFS)
        try:
            text = data.decode("utf-8")
            # Form first: a malformed write sends nothing at all.
            found = {**written, **parse_properties(text)}
        except (UnicodeDecodeError, ConfigError) as exc:
            log.error("host/net/%s/config: %s", mac, exc)
            raise FsError(errno.EINVAL, str(exc)) from None
        current = IpConfig() if is_complete(found) else await self.host.get_ip_info(mac)
        config = merge(current, found)
        try:
            validate(config)
        except Inconsistent as exc:
            if len([line for line in text.split("\n") if line.strip()]) <= 1:
                log.info("host/net/%s/config: waiting for more: %s", mac, exc)
                return found, False
            log.error("host/net/%s/config: %s", mac, exc)
            raise FsError(errno.EINVAL, str(exc)) from None
        try:
            await self.host.set_ip_info(adapter.guid, config)
        except HostError as exc:
            log.error("host/net/%s/config: %s", mac, exc)
            raise
        return found, True

    async def open_stream(self, path: Path, flags: int) -> Stream:
        node = await self.lookup(path)
        if node.kind is not NodeKind.STREAM:
            raise FsError(errno.EISDIR if node.kind is NodeKind.DIR else errno.EPERM)
        return _ConfigStream(self, path[1])

    async def rmdir(self, path: Path) -> None:
        raise FsError(errno.EROFS if self.read_only else errno.EPERM)

    # -- background ------------------------------------------------------------------------

    async def run(
        self, sink: ChangeSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The host's own work (the initial items), for as long as the mount lives."""
        await self.host.run(task_status=task_status)


@dataclass(eq=False)
class DeviceStream(Stream):
    """One open of ``vmbus/hv_kvp``: the FUSE layer's handle on a device opener."""

    handle: DeviceHandle

    async def read(self, size: int) -> bytes:
        return await self.handle.read(size)

    async def write(self, data: bytes) -> int:
        return await self.handle.write(data)

    def poll(self, wake: Callable[[], None] | None) -> int:
        return self.handle.poll(wake)

    async def release(self) -> None:
        await self.handle.release()


_DEVICE = Node(NodeKind.STREAM, writable=True)


class _ConfigStream(Stream):
    """An open ``net/<mac>/config``: the first read sends GET_IP_INFO and the text is
    read from there to its end; each write(2) is one SET_IP_INFO, answered before
    write(2) returns."""

    def __init__(self, view: HostView, mac: str) -> None:
        self._view = view
        self._mac = mac
        self._text: bytes | None = None
        self._offset = 0
        #: Every property written through this open file.
        self._written: dict[str, object] = {}
        #: Whether the last of them are still waiting to fit together.
        self._waiting = False

    async def read(self, size: int) -> bytes:
        if self._text is None:
            self._text = (await self._view.config_text(self._mac)).encode()
        chunk = self._text[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk

    async def write(self, data: bytes) -> int:
        self._written, sent = await self._view.write_config(self._mac, data, self._written)
        self._waiting = not sent
        return len(data)

    async def release(self) -> None:
        if self._waiting:
            log.error(
                "host/net/%s/config closed with properties that never fitted together: "
                "nothing was sent for them",
                self._mac,
            )


class VmbusView(View):
    """``vmbus/hv_kvp``: the emulated device in a kvpfs mount."""

    name = "vmbus"

    def __init__(self, device: KvpDevice | None = None) -> None:
        self.device = device or KvpDevice()

    async def lookup(self, path: Path) -> Node:
        if path == ():
            return _DIR
        if path == (DEVICE_NAME,):
            return _DEVICE
        if len(path) > 1 and path[0] == DEVICE_NAME:
            raise FsError(errno.ENOTDIR)
        raise FsError(errno.ENOENT)

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        if path != ():
            await self.lookup(path)
            raise FsError(errno.ENOTDIR)
        return [(DEVICE_NAME, _DEVICE)]

    async def read(self, path: Path) -> bytes:
        await self.lookup(path)
        raise FsError(errno.EISDIR if path == () else errno.EINVAL)

    async def open_stream(self, path: Path, flags: int) -> Stream:
        if path != (DEVICE_NAME,):
            await self.lookup(path)
            raise FsError(errno.EISDIR)
        return DeviceStream(await self.device.open(flags))

    def terminating(self) -> None:
        # A daemon blocked in read() would hold the unmount until the grace ends.
        self.device.shutdown()

    async def aclose(self) -> None:
        self.device.shutdown()
