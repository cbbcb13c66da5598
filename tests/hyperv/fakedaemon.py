"""A small stand-in for hv_kvp_daemon, for tests that run without root.

It talks to a :class:`kvpfs.peers.hyperv.device.KvpDevice` directly (no FUSE), on the trio
thread, with the daemon's protocol and the daemon's pool semantics on in-memory
pools: first match wins, SET modifies in place or appends, DELETE shifts, the
size check answers ``HV_S_CONT``, pool 2 is synthesised.  Knobs let a test hold
a reply, drop it, or make the daemon go away.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field

import trio

from kvpfs.errors import FsError
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import DeviceHandle, KvpDevice

AUTO_ITEMS = [(b"FullyQualifiedDomainName", b"guest.example"), (b"OSName", b"FakeOS")]


@dataclass
class FakeNic:
    """An interface as the daemon's IP requests see it (lists joined by ";")."""

    mac: str  # upper case with colons, as the daemon compares it
    guid: str  # "{...}" lower case, as sysfs shows it
    ip_addr: bytes = b""
    sub_net: bytes = b""
    gate_way: bytes = b""
    dns_addr: bytes = b""
    dhcp_enabled: int = 0


def _valid(items: bytes) -> bool:
    for item in items.decode().split(";"):
        if item:
            try:
                ipaddress.ip_address(item)
            except ValueError:
                return False
    return True


@dataclass(eq=False)
class FakeDaemon:
    device: KvpDevice
    register_op: int = m.Op.REGISTER1
    pools: dict[int, list[list[bytes]]] = field(default_factory=lambda: {p: [] for p in range(5)})
    #: Every request read, decoded.
    requests: list[m.Message] = field(default_factory=list)
    #: Cleared to make the daemon wait before answering.
    go: trio.Event = field(default_factory=trio.Event)
    #: Read the next request but never answer it.
    drop_next: bool = False
    version: bytes = b""
    stream: DeviceHandle | None = None
    nics: list[FakeNic] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.go.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, register, then answer requests until cancelled (then close)."""
        stream = await self.device.open(0)
        self.stream = stream
        try:
            await stream.write(m.encode(m.RegisterMessage(self.register_op)))
            answer = m.decode_request(await stream.read(m.MSG_SIZE), registration=True)
            assert isinstance(answer, m.RegisterMessage)
            self.version = answer.version
            task_status.started()
            while True:
                try:
                    data = await stream.read(m.MSG_SIZE)
                except FsError as exc:
                    if exc.errno == errno.EBADF:  # released or removed under us
                        return
                    raise
                request = m.decode_request(data)
                self.requests.append(request)
                await self.go.wait()
                if self.drop_next:
                    self.drop_next = False
                    continue
                status, reply = self.handle(request)
                await stream.write(m.encode(reply, error=status))
        finally:
            await stream.release()

    def _find(self, pool: int, key: bytes) -> int | None:
        for i, (k, _) in enumerate(self.pools[pool]):
            if k == key:
                return i
        return None

    def handle(self, request: m.Message) -> tuple[int, m.Message]:
        ok, cont = int(m.Status.OK), int(m.Status.S_CONT)
        if isinstance(request, m.KeyValueMessage) and request.op == m.Op.SET:
            if request.key_size > 512 or request.value_size > 2048:
                return cont, request
            i = self._find(request.pool, request.key)
            if i is None:
                self.pools[request.pool].append([request.key, request.value])
            else:
                self.pools[request.pool][i][1] = request.value
            return ok, request
        if isinstance(request, m.KeyValueMessage):  # GET: nothing is copied (value_size 0)
            return (cont if self._find(request.pool, request.key) is None else ok), request
        if isinstance(request, m.DeleteMessage):
            i = self._find(request.pool, request.key)
            if i is None:
                return cont, request
            del self.pools[request.pool][i]
            return ok, request
        if isinstance(request, m.EnumerateMessage):
            items = AUTO_ITEMS if request.pool == 2 else self.pools[request.pool]
            if request.index >= len(items):
                return cont, request
            key, value = items[request.index]
            return ok, m.EnumerateMessage(request.pool, request.index, key, value)
        if isinstance(request, m.IpInfoMessage):
            return self.handle_ip(request)
        return ok, request

    def handle_ip(self, request: m.IpInfoMessage) -> tuple[int, m.Message]:
        """As the real daemon: GET by MAC (HV_E_FAIL if none), SET by GUID
        (HV_GUID_NOTFOUND), an item that is no address HV_INVALIDARG."""
        if request.op == m.Op.GET_IP_INFO:
            for nic in self.nics:
                if nic.mac.encode() == request.adapter_id:
                    family = 0
                    for item in nic.ip_addr.decode().split(";"):
                        if item:
                            version = ipaddress.ip_address(item).version
                            family |= m.ADDR_FAMILY_IPV4 if version == 4 else m.ADDR_FAMILY_IPV6
                    tail = b";" if nic.ip_addr else b""
                    return int(m.Status.OK), m.IpInfoMessage(
                        request.op,
                        request.pool,
                        request.adapter_id,
                        family,
                        nic.dhcp_enabled if nic.ip_addr else 0,
                        nic.ip_addr,
                        nic.sub_net,
                        nic.gate_way + tail if nic.gate_way else b"",
                        nic.dns_addr + tail if nic.ip_addr and nic.dns_addr else b"",
                    )
            return int(m.Status.E_FAIL), request
        for nic in self.nics:
            if nic.guid.encode() == request.adapter_id:
                if not all(
                    _valid(f) for f in (request.ip_addr, request.gate_way, request.dns_addr)
                ):
                    return int(m.Status.INVALIDARG), request
                nic.ip_addr, nic.sub_net = request.ip_addr, request.sub_net
                nic.gate_way, nic.dns_addr = request.gate_way, request.dns_addr
                nic.dhcp_enabled = request.dhcp_enabled
                return int(m.Status.OK), request
        return int(m.Status.GUID_NOTFOUND), request
