"""The Hyper-V host, simulated: SET, DELETE, GET, ENUMERATE and IP requests via the device.

:class:`KvpHost` sends what an administrator's ``Add-VMKvpItem`` /
``Remove-VMKvpItem`` or the host's own KVP component would send, one request at
a time (the host never has two in flight), through a :class:`KvpDevice` to
whatever daemon has registered with it.

The host's own rules come first and never reach the guest:

* only pools 0 (``External``) and 3 (``Guest\\Parameter``) are written by the
  host; SET and DELETE on the guest pool (1), the synthesised auto pool (2) and
  pool 4 are refused with EROFS;
* a key longer than its UTF-16 field (255 units plus NUL) is ENAMETOOLONG, a
  value longer than 1023 units EFBIG, a string with NUL in it EINVAL.

Everything else is the guest's answer: a status code, turned into an errno by
:func:`status_errno` and raised as :class:`HostError` (which keeps the status).
A request waits for a registered daemon for at most ``connect_timeout`` seconds
(ENOTCONN, status ``HV_ERROR_DEVICE_NOT_CONNECTED``); the kernel's own timeout
(:attr:`KvpDevice.timeout`, 30 s) turns a silent daemon into ``HV_E_FAIL`` (EIO).

Strings are Python ``str`` on the host side, as the host's UTF-16 is.  What the
daemon stores may differ: the kernel cuts host strings to 511/2047 UTF-8 bytes
(:func:`kvpfs.peers.hyperv.message.delivered` tells in advance), and the host reads back
at most 254/1022 UTF-16 units.

IP requests (:meth:`KvpHost.get_ip_info`, :meth:`KvpHost.set_ip_info`) follow the
same rules: one at a time with the others, the same waits.  The host knows its
adapters (:attr:`KvpHost.adapters`: MAC and VMBus device GUID, as Hyper-V does);
the guest may not have them.  The host's own rule: each list must fit its
UTF-16 field (EINVAL).  The daemon's statuses become errnos by the same table:

=====================  ========  ===============================================
status                 errno     when (IP requests)
=====================  ========  ===============================================
``HV_E_FAIL``          EIO       GET: no interface has that MAC (or its addresses
                                 do not fit); SET: the ifcfg file could not be
                                 written or ``hv_set_ifconfig`` failed; the kernel:
                                 no answer within its timeout
``HV_GUID_NOTFOUND``   ENODEV    SET: no interface has that device GUID
``HV_INVALIDARG``      EINVAL    SET: an item is not an IP address
(no daemon)            ENOTCONN  no hv_kvp_daemon registered within ``connect_timeout``
=====================  ========  ===============================================
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from kvpfs.errors import FsError
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import Exchange, KvpDevice
from kvpfs.peers.hyperv.ipconfig import (
    ConfigError,
    IpConfig,
    check_sizes,
    from_value,
    host_guid,
    host_mac,
    normalize_guid,
    normalize_mac,
    to_value,
)

log = logging.getLogger(__name__)

#: Pools the host writes (SET and DELETE); the others are refused before sending.
HOST_WRITABLE_POOLS = frozenset({m.Pool.EXTERNAL, m.Pool.AUTO_EXTERNAL})
CONNECT_TIMEOUT = 10.0

_NAMES = {
    m.Pool.EXTERNAL: "external",
    m.Pool.GUEST: "guest",
    m.Pool.AUTO: "auto",
    m.Pool.AUTO_EXTERNAL: "auto_external",
    m.Pool.AUTO_INTERNAL: "auto_internal",
}

_STATUS_ERRNO: dict[int, int] = {
    m.Status.E_FAIL: errno.EIO,
    m.Status.NOT_SUPPORTED: errno.EOPNOTSUPP,
    m.Status.MACHINE_LOCKED: errno.EBUSY,
    m.Status.DEVICE_NOT_CONNECTED: errno.ENOTCONN,
    m.Status.INVALIDARG: errno.EINVAL,
    m.Status.GUID_NOTFOUND: errno.ENODEV,
    m.Status.ALREADY_EXISTS: errno.EEXIST,
    m.Status.DISK_FULL: errno.ENOSPC,
}


def status_errno(op: int, status: int) -> int:
    """The errno for a status code the host got back (0 for ``HV_S_OK``).

    ``HV_S_CONT`` means "no such item" for GET, DELETE and ENUMERATE (ENOENT); for a
    SET it is the daemon refusing the message's key or value size (EMSGSIZE).
    """
    if status == m.Status.OK:
        return 0
    if status == m.Status.S_CONT:
        return errno.EMSGSIZE if op == m.Op.SET else errno.ENOENT
    return _STATUS_ERRNO.get(status, errno.EIO)


def op_name(op: int) -> str:
    try:
        return m.Op(op).name
    except ValueError:
        return f"operation {op}"


def status_name(status: int) -> str:
    try:
        return f"HV_{m.Status(status).name}"
    except ValueError:
        return f"0x{status:08x}"


class HostError(FsError):
    """A request failed: refused by the host itself, or answered with a status."""

    def __init__(self, err: int, message: str, *, status: int | None = None) -> None:
        super().__init__(err, message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Enumeration:
    """The items of a pool in the order the host received them (duplicates included)."""

    items: list[tuple[str, str]]
    #: The status that ended the enumeration: HV_S_CONT at the end of the pool;
    #: anything else means the host saw only the items before ``len(items)``.
    end_status: int
    #: Why the kernel ended it by itself ("timeout", "closed", ...); "" if the daemon did.
    failure: str = ""

    @property
    def complete(self) -> bool:
        return self.end_status == m.Status.S_CONT


def _pool(pool: int) -> m.Pool:
    try:
        return m.Pool(pool)
    except ValueError:
        raise HostError(errno.EINVAL, f"there is no pool {pool}") from None


def _host_string(text: str, limit: int, err: int, what: str) -> None:
    if "\0" in text:
        raise HostError(errno.EINVAL, f"the {what} contains NUL")
    units = len(m.utf16_units(text))
    if units > limit:
        raise HostError(err, f"the {what} is {units} UTF-16 units, the host sends at most {limit}")


@dataclass(frozen=True, slots=True)
class Adapter:
    """A network adapter the host gave the VM: its MAC and its VMBus device GUID
    (both normalised: lower case, colons, no braces)."""

    mac: str
    guid: str

    @classmethod
    def of(cls, mac: str, guid: str) -> Adapter:
        return cls(normalize_mac(mac), normalize_guid(guid))


class KvpHost:
    """The host's side of KVP over one device."""

    def __init__(
        self,
        device: KvpDevice,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        initial_items: Mapping[int, Mapping[str, str]] | None = None,
        adapters: Sequence[Adapter] = (),
    ) -> None:
        self.device = device
        self.connect_timeout = connect_timeout
        #: The VM's network adapters by MAC, as the host knows them.
        self.adapters = {adapter.mac: adapter for adapter in adapters}
        #: Called before each IP request (hostsim brings the guest's sysfs up to date).
        self.before_ip_request: list[Callable[[], None]] = []
        #: Items the host sets once, after the daemon's first registration, as
        #: Hyper-V fills pool 3 when the VM starts (it does not resend them later).
        self.initial_items = {pool: dict(items) for pool, items in (initial_items or {}).items()}
        #: Set once the initial items were sent (or there were none).
        self.provisioned = trio.Event()
        self._lock = trio.Lock()
        #: Requests sent, for statistics and tests.
        self.requests = 0
        #: Called with (pool, key, value) after each successful SET and with
        #: (pool, key, None) after each DELETE: the host knows what it changed.
        self.listeners: list[Callable[[int, str, str | None], None]] = []

    def _changed(self, pool: int, key: str, value: str | None) -> None:
        for listener in self.listeners:
            try:
                listener(pool, key, value)
            except Exception:
                log.exception("host: change listener failed")

    # -- one request ---------------------------------------------------------------------

    async def exchange(
        self,
        request: m.HostRequest | m.HostIpRequest | None = None,
        *,
        raw: bytes | None = None,
        op: int | None = None,
    ) -> Exchange:
        """Send one request (or a ``raw`` daemon-side message) and return the outcome.

        No status checking: this is what the host's channel sees.  Waits for the
        other requests of this host first, then for a registered daemon.
        """
        async with self._lock:
            with trio.move_on_after(self.connect_timeout):
                await self.device.wait_registered()
            if not self.device.registered:
                raise HostError(
                    errno.ENOTCONN,
                    f"no hv_kvp_daemon registered within {self.connect_timeout:g} s",
                    status=int(m.Status.DEVICE_NOT_CONNECTED),
                )
            self.requests += 1
            return await self.device.transact(request, raw=raw, op=op)

    async def _checked(self, request: m.HostRequest | m.HostIpRequest) -> m.HostReply:
        reply = (await self.exchange(request)).reply
        err = status_errno(request.op, reply.status)
        if err:
            if isinstance(request, m.HostIpRequest):
                what = f"{op_name(request.op)} for adapter {request.value.adapter_id}"
            else:
                what = f"{op_name(request.op)} on pool {request.pool}"
            raise HostError(err, f"{what}: {status_name(reply.status)}", status=reply.status)
        return reply

    # -- the operations ------------------------------------------------------------------

    async def set(self, pool: int, key: str, value: str | int) -> None:
        """Add or modify ``key``; an ``int`` value goes as REG_U32 (or REG_U64)."""
        number = _pool(pool)
        if number not in HOST_WRITABLE_POOLS:
            raise HostError(errno.EROFS, f"the host does not write the {_NAMES[number]} pool")
        _host_string(key, m.HOST_FIELD_KEY_UNITS, errno.ENAMETOOLONG, "key")
        if isinstance(value, int):
            if not 0 <= value < 1 << 64:
                raise HostError(errno.EINVAL, "an integer value is a u32 or a u64")
            value_type = m.REG_U32 if value < 1 << 32 else m.REG_U64
        else:
            _host_string(value, m.HOST_FIELD_VALUE_UNITS, errno.EFBIG, "value")
            value_type = m.REG_SZ
        await self._checked(m.HostRequest(m.Op.SET, number, key, value, value_type))
        stored, text = m.delivered(m.HostRequest(m.Op.SET, number, key, value, value_type))
        # What the host reads back is what the daemon stored, as the kernel converts it.
        self._changed(
            number,
            m.units_to_str(m.utf8_to_utf16(stored, m.HOST_MAX_KEY_UNITS)),
            m.units_to_str(m.utf8_to_utf16(text, m.HOST_MAX_VALUE_UNITS)),
        )

    async def delete(self, pool: int, key: str) -> None:
        number = _pool(pool)
        if number not in HOST_WRITABLE_POOLS:
            raise HostError(errno.EROFS, f"the host does not write the {_NAMES[number]} pool")
        _host_string(key, m.HOST_FIELD_KEY_UNITS, errno.ENAMETOOLONG, "key")
        await self._checked(m.HostRequest(m.Op.DELETE, number, key))
        stored, _ = m.delivered(m.HostRequest(m.Op.DELETE, number, key))
        self._changed(number, m.units_to_str(m.utf8_to_utf16(stored, m.HOST_MAX_KEY_UNITS)), None)

    async def get(self, pool: int, key: str) -> str:
        """A GET as the kernel carries it: the value comes back empty (see the module doc
        of :mod:`kvpfs.peers.hyperv.message`); ENOENT tells whether the key exists."""
        number = _pool(pool)
        _host_string(key, m.HOST_FIELD_KEY_UNITS, errno.ENAMETOOLONG, "key")
        reply = await self._checked(m.HostRequest(m.Op.GET, number, key))
        return reply.value or ""

    async def enumerate(self, pool: int, index: int) -> tuple[str, str] | None:
        """Item ``index`` of the pool; None past the end (``HV_S_CONT``)."""
        number = _pool(pool)
        if not 0 <= index <= 0xFFFFFFFF:
            raise HostError(errno.EINVAL, f"index {index} is not a u32")
        reply = (await self.exchange(m.HostRequest(m.Op.ENUMERATE, number, index=index))).reply
        if reply.status == m.Status.S_CONT:
            return None
        err = status_errno(m.Op.ENUMERATE, reply.status)
        if err:
            raise HostError(
                err,
                f"ENUMERATE {index} of pool {pool}: {status_name(reply.status)}",
                status=reply.status,
            )
        return reply.key or "", reply.value or ""

    async def items(self, pool: int, *, until: str | None = None) -> Enumeration:
        """Enumerate from index 0 until the pool ends or a request fails.

        As the host, stop at the first failure (an item that does not convert, a
        timeout) and keep what came before.  With ``until``, stop after the first
        item with that key.
        """
        number = _pool(pool)
        found: list[tuple[str, str]] = []
        while True:
            request = m.HostRequest(m.Op.ENUMERATE, number, index=len(found))
            exchange = await self.exchange(request)
            reply = exchange.reply
            if reply.status != m.Status.OK:
                return Enumeration(found, reply.status, exchange.failure)
            item = (reply.key or "", reply.value or "")
            found.append(item)
            if until is not None and item[0] == until:
                return Enumeration(found, int(m.Status.OK))

    async def find(self, pool: int, key: str) -> str | None:
        """The value of the first item called ``key``, as the host enumerates it."""
        result = await self.items(pool, until=key)
        if result.items and result.items[-1][0] == key:
            return result.items[-1][1]
        if not result.complete:
            raise HostError(
                status_errno(m.Op.ENUMERATE, result.end_status),
                f"enumeration of pool {pool} failed at item {len(result.items)}: "
                f"{status_name(result.end_status)}",
                status=result.end_status,
            )
        return None

    # -- IP information ------------------------------------------------------------------

    def _prepare_ip(self, request: m.HostIpRequest) -> None:
        try:
            m.encode_host_ip(request)
        except m.MessageError as exc:
            raise HostError(errno.EINVAL, str(exc)) from None
        for hook in self.before_ip_request:
            hook()

    async def ip_request(self, request: m.HostIpRequest) -> m.HostReply:
        """Send an IP request as it is (the adapter id as given); raise on failure."""
        self._prepare_ip(request)
        return await self._checked(request)

    async def get_ip_info(self, mac: str) -> IpConfig:
        """GET_IP_INFO: the configuration of the guest's adapter with MAC ``mac``."""
        try:
            adapter_id = host_mac(mac)
        except ConfigError as exc:
            raise HostError(errno.EINVAL, str(exc)) from None
        reply = await self.ip_request(
            m.HostIpRequest(m.Op.GET_IP_INFO, m.IpValue(adapter_id=adapter_id))
        )
        assert reply.ip is not None
        return from_value(reply.ip)

    async def set_ip_info(self, guid: str, config: IpConfig) -> None:
        """SET_IP_INFO: inject ``config`` into the guest's adapter with device GUID ``guid``.

        Only the host's own limits are checked (each list fits its field): the
        daemon judges the items.
        """
        try:
            adapter_id = host_guid(guid)
            check_sizes(config)
        except ConfigError as exc:
            raise HostError(errno.EINVAL, str(exc)) from None
        await self.ip_request(m.HostIpRequest(m.Op.SET_IP_INFO, to_value(adapter_id, config)))

    # -- background ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the initial items once the first daemon has registered."""
        task_status.started()
        try:
            if any(self.initial_items.values()):
                await self.device.wait_registered()
                for pool, items in self.initial_items.items():
                    for key, value in items.items():
                        try:
                            await self.set(pool, key, value)
                        except FsError as exc:
                            log.warning("host: initial item %s of pool %s: %s", key, pool, exc)
        finally:
            self.provisioned.set()
