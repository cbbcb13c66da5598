"""The host/ tree as a backend, against the stand-in daemon: names, errnos, freshness."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import NodeKind
from kvpfs.kvp.names import key_to_name
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import KvpDevice
from kvpfs.peers.hyperv.host import Adapter, KvpHost
from kvpfs.peers.hyperv.view import HostView

from .fakedaemon import FakeDaemon, FakeNic

MAC = "00:15:5d:00:0a:01"
GUID = "4f4460c2-2666-5cbd-afeb-938c9556ef5e"
LOST_MAC = "00:15:5d:00:0a:09"
LOST_GUID = "11111111-2222-3333-4444-555555555555"


class Rig:
    def __init__(self, nursery: trio.Nursery, *, read_only: bool = False) -> None:
        self.device = KvpDevice(timeout=0.5)
        adapters = [Adapter.of(MAC, GUID), Adapter.of(LOST_MAC, LOST_GUID)]
        self.host = KvpHost(self.device, connect_timeout=0.2, adapters=adapters)
        self.view = HostView(self.host, read_only=read_only, cache_ttl=0.5)
        self.daemon = FakeDaemon(self.device)
        # The guest has the first adapter only.
        self.nic = FakeNic(
            MAC.upper(),
            "{" + GUID + "}",
            b"192.0.2.10",
            b"255.255.255.0",
            b"192.0.2.1",
            b"192.0.2.53",
        )
        self.daemon.nics.append(self.nic)
        self.nursery = nursery

    async def start(self) -> None:
        await self.nursery.start(self.daemon.run)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    r = Rig(nursery)
    await r.start()
    yield r
    nursery.cancel_scope.cancel()


async def errno_of(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except FsError as exc:
        return exc.errno
    return 0


async def test_tree(rig: Rig) -> None:
    view = rig.view
    assert [name for name, _ in await view.listdir(())] == [
        "external",
        "guest",
        "auto",
        "auto_external",
        "net",
    ]
    assert (await view.lookup(("external",))).writable
    assert (await view.lookup(("auto_external",))).writable
    assert not (await view.lookup(("guest",))).writable
    assert not (await view.lookup(("auto",))).writable
    assert await errno_of(view.lookup(("nope",))) == errno.ENOENT
    assert [name for name, _ in await view.listdir(("auto",))] == [
        "FullyQualifiedDomainName",
        "OSName",
    ]
    assert await view.read(("auto", "OSName")) == b"FakeOS"
    assert await errno_of(view.read(("auto",))) == errno.EISDIR
    assert await errno_of(view.listdir(("auto", "OSName"))) == errno.ENOTDIR
    assert await errno_of(view.lookup(("auto", "OSName", "x"))) == errno.ENOTDIR


async def test_set_delete_and_names(rig: Rig) -> None:
    view, daemon = rig.view, rig.daemon
    await view.check_new_name(("external", "New"))
    await view.write(("external", "New"), "välue".encode())
    slashed = key_to_name(b"a/b|c")
    await view.write(("auto_external", slashed), b"x")
    assert daemon.pools[0] == [[b"New", "välue".encode()]]
    assert daemon.pools[3] == [[b"a/b|c", b"x"]]
    node = await view.lookup(("external", "New"))
    assert node.kind is NodeKind.FILE and node.size == len("välue".encode()) and node.writable
    assert await view.listdir(("auto_external",)) == [
        (slashed, await view.lookup(("auto_external", slashed)))
    ]
    await view.remove(("external", "New"))
    assert daemon.pools[0] == []
    assert await errno_of(view.remove(("external", "New"))) == errno.ENOENT
    assert await errno_of(view.lookup(("external", "New"))) == errno.ENOENT
    # Names that are no key: ENOENT to find, EINVAL to create.
    assert await errno_of(view.lookup(("external", "%61"))) == errno.ENOENT
    assert await errno_of(view.write(("external", "%61"), b"v")) == errno.EINVAL


@pytest.mark.parametrize(
    ("path", "value", "err"),
    [
        (("guest", "k"), b"v", errno.EROFS),
        (("auto", "k"), b"v", errno.EROFS),
        (("nope", "k"), b"v", errno.EPERM),
        (("external",), b"v", errno.EISDIR),
        (("external", "k", "x"), b"v", errno.ENOTDIR),
        (("external", "%ff"), b"v", errno.EILSEQ),
        (("external", "k" * 256), b"v", errno.ENAMETOOLONG),
        (("external", "€" * 171), b"v", errno.ENAMETOOLONG),
        (("external", "k"), b"\xff", errno.EILSEQ),
        (("external", "k"), b"a\0b", errno.EINVAL),
        (("external", "k"), b"v" * 1024, errno.EFBIG),
        (("external", "k"), "€".encode() * 683, errno.EFBIG),
    ],
)
async def test_refused_writes_send_nothing(
    rig: Rig, path: tuple[str, ...], value: bytes, err: int
) -> None:
    assert await errno_of(rig.view.write(path, value)) == err
    assert rig.daemon.requests == []


async def test_at_the_limits(rig: Rig) -> None:
    await rig.view.write(("external", "€" * 170), "€".encode() * 682)
    await rig.view.write(("external", "k" * 255), b"v" * 1023)
    assert [len(k) for k, _ in rig.daemon.pools[0]] == [510, 255]
    # What the host reads back is at most 254 / 1022 units.
    listed = dict(await rig.view.listdir(("external",)))
    assert "k" * 254 in listed and listed["k" * 254].size == 1022


async def test_rename(rig: Rig) -> None:
    view, daemon = rig.view, rig.daemon
    await view.write(("external", "a"), b"1")
    await view.write(("external", "b"), b"2")
    assert await errno_of(view.rename(("external", "a"), ("external", "b"), replace=False)) == (
        errno.EEXIST
    )
    await view.rename(("external", "a"), ("external", "b"), replace=True)
    assert daemon.pools[0] == [[b"b", b"1"]]
    await view.rename(("external", "b"), ("external", "c"), replace=False)
    assert daemon.pools[0] == [[b"c", b"1"]]
    assert (
        await errno_of(view.rename(("external", "c"), ("auto_external", "c"), replace=True))
        == errno.EXDEV
    )
    assert await errno_of(view.rename(("external", "zz"), ("external", "y"), replace=True)) == (
        errno.ENOENT
    )
    assert await errno_of(view.mkdir(("external", "d"))) == errno.EPERM
    assert await errno_of(view.rmdir(("external",))) == errno.EPERM


async def test_freshness(rig: Rig) -> None:
    view, daemon = rig.view, rig.daemon
    daemon.pools[1] = [[b"g", b"1"]]
    assert [n for n, _ in await view.listdir(("guest",))] == ["g"]
    # The guest changes its pool behind the host's back.
    daemon.pools[1] = [[b"g", b"22"], [b"h", b"3"]]
    # Lookups answer from the listing while it is younger than the cache time;
    # reads always ask the daemon.
    before = len(daemon.requests)
    assert (await view.lookup(("guest", "g"))).size == 1
    assert await errno_of(view.lookup(("guest", "h"))) == errno.ENOENT
    assert len(daemon.requests) == before
    assert await view.read(("guest", "g")) == b"22"
    assert (await view.lookup(("guest", "g"))).size == 2
    await trio.sleep(0.6)
    # Older than that: one enumeration, then answers from it.
    assert (await view.lookup(("guest", "h"))).size == 1
    before = len(daemon.requests)
    assert (await view.lookup(("guest", "g"))).size == 2
    assert len(daemon.requests) == before
    daemon.pools[1] = []
    assert await errno_of(view.read(("guest", "h"))) == errno.ENOENT
    await trio.sleep(0.6)
    assert await errno_of(view.lookup(("guest", "g"))) == errno.ENOENT


async def test_the_host_knows_its_own_changes(rig: Rig) -> None:
    view, host = rig.view, rig.host
    assert await view.listdir(("external",)) == []
    # Through the view or the host API directly: the listing is updated at once.
    await host.set(0, "api", "1")
    await view.write(("external", "file"), b"2")
    before = len(rig.daemon.requests)
    assert (await view.lookup(("external", "api"))).size == 1
    assert (await view.lookup(("external", "file"))).size == 1
    await host.delete(0, "api")
    assert await errno_of(view.lookup(("external", "api"))) == errno.ENOENT
    assert len(rig.daemon.requests) == before + 1  # only the DELETE
    # What the host reads back is what the kernel delivered: a cut value shows cut.
    await host.set(0, "long", "€" * 700)
    assert (await view.lookup(("external", "long"))).size == 3 * 682


async def test_enumeration_failures(rig: Rig) -> None:
    view, daemon = rig.view, rig.daemon
    daemon.pools[1] = [[b"a", b"1"], [b"bad\xff", b"2"], [b"c", b"3"]]
    # The host's view: what follows an item that does not convert is invisible.
    assert [n for n, _ in await view.listdir(("guest",))] == ["a"]
    assert await errno_of(view.read(("guest", "c"))) == errno.EIO
    # A daemon that stops answering: EIO, not an empty directory.
    daemon.drop_next = True
    assert await errno_of(view.listdir(("external",))) == errno.EIO


async def test_no_daemon_is_enotconn(nursery: trio.Nursery) -> None:
    r = Rig(nursery)
    assert await errno_of(r.view.listdir(("external",))) == errno.ENOTCONN
    assert await errno_of(r.view.write(("external", "k"), b"v")) == errno.ENOTCONN


async def test_read_only(nursery: trio.Nursery) -> None:
    r = Rig(nursery, read_only=True)
    await r.start()
    assert not (await r.view.lookup(("external",))).writable
    for coro in (
        r.view.write(("external", "k"), b"v"),
        r.view.remove(("external", "k")),
        r.view.check_new_name(("external", "k")),
        r.view.mkdir(("x",)),
        r.view.write(("nope", "k"), b"v"),
    ):
        assert await errno_of(coro) == errno.EROFS
    nursery.cancel_scope.cancel()


# -- host/net ------------------------------------------------------------------------------

CONFIG = (
    "IPAddresses=192.0.2.10\n"
    "Subnets=255.255.255.0\n"
    "DefaultGateways=192.0.2.1\n"
    "DNSServers=192.0.2.53\n"
    "DHCPEnabled=false\n"
)


async def read_config(view: HostView, mac: str = MAC, size: int = 7) -> bytes:
    stream = await view.open_stream(("net", mac, "config"), 0)
    chunks = []
    while chunk := await stream.read(size):
        chunks.append(chunk)
    await stream.release()
    return b"".join(chunks)


def ops(daemon: FakeDaemon) -> list[int]:
    return [r.op for r in daemon.requests]


async def test_net_tree(rig: Rig) -> None:
    view = rig.view
    assert [n for n, _ in await view.listdir(("net",))] == [MAC, LOST_MAC]
    assert [n for n, _ in await view.listdir(("net", MAC))] == ["config"]
    node = await view.lookup(("net", MAC, "config"))
    assert node.kind is NodeKind.STREAM and node.writable and node.readable
    assert (await view.lookup(("net", MAC))).kind is NodeKind.DIR
    for path, err in (
        (("net", "00:15:5d:ff:ff:ff"), errno.ENOENT),
        (("net", MAC, "other"), errno.ENOENT),
        (("net", MAC, "config", "x"), errno.ENOENT),
    ):
        assert await errno_of(view.lookup(path)) == err
    assert await errno_of(view.listdir(("net", MAC, "config"))) == errno.ENOTDIR
    assert await errno_of(view.read(("net", MAC))) == errno.EISDIR
    assert await errno_of(view.write(("net", MAC, "config"), b"x")) == errno.EPERM
    assert await errno_of(view.remove(("net", MAC, "config"))) == errno.EPERM
    assert await errno_of(view.check_new_name(("net", MAC, "new"))) == errno.EPERM
    assert rig.daemon.requests == []


async def test_net_read(rig: Rig) -> None:
    assert await read_config(rig.view) == CONFIG.encode()
    assert await rig.view.read(("net", MAC, "config")) == CONFIG.encode()
    # The host asks by MAC, upper case; one GET per open.
    (request, _) = rig.daemon.requests
    assert isinstance(request, m.IpInfoMessage) and request.adapter_id == MAC.upper().encode()
    rig.nic.ip_addr, rig.nic.sub_net = b"192.0.2.10;2001:db8::10", b"255.255.255.0;/64"
    text = (await read_config(rig.view, size=4096)).decode()
    assert "IPAddresses=192.0.2.10,2001:db8::10\nSubnets=255.255.255.0,/64\n" in text
    # The guest has no interface with that MAC: HV_E_FAIL, EIO.
    assert await errno_of(read_config(rig.view, LOST_MAC)) == errno.EIO


async def write_config(view: HostView, *writes: str, mac: str = MAC) -> None:
    stream = await view.open_stream(("net", mac, "config"), 1)
    try:
        for data in writes:
            assert await stream.write(data.encode()) == len(data.encode())
    finally:
        await stream.release()


async def test_net_write(rig: Rig) -> None:
    view, daemon, nic = rig.view, rig.daemon, rig.nic
    # All five properties: one SET, by GUID, nothing read first.
    await write_config(view, CONFIG.replace("192.0.2.10", "192.0.2.20"))
    assert ops(daemon) == [m.Op.SET_IP_INFO]
    request = daemon.requests[0]
    assert isinstance(request, m.IpInfoMessage)
    assert request.adapter_id == b"{" + GUID.encode() + b"}"
    assert (request.ip_addr, request.addr_family, request.dhcp_enabled) == (b"192.0.2.20", 1, 0)
    # Some properties: a GET fills in the rest.
    daemon.requests.clear()
    await write_config(view, "DHCPEnabled=true\n")
    assert ops(daemon) == [m.Op.GET_IP_INFO, m.Op.SET_IP_INFO]
    assert (nic.ip_addr, nic.gate_way, nic.dhcp_enabled) == (b"192.0.2.20", b"192.0.2.1", 1)
    # Line by line, addresses before their subnets: the first line waits.
    daemon.requests.clear()
    await write_config(
        view, "IPAddresses=192.0.2.30,2001:db8::30\n", "Subnets=255.255.255.0,/64\n",
        "DefaultGateways=\n",
    )  # fmt: skip
    get, set_ = m.Op.GET_IP_INFO, m.Op.SET_IP_INFO
    assert ops(daemon) == [get, get, set_, get, set_]
    assert (nic.ip_addr, nic.sub_net, nic.gate_way) == (
        b"192.0.2.30;2001:db8::30",
        b"255.255.255.0;/64",
        b"",
    )


async def test_net_write_refusals(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    view, daemon = rig.view, rig.daemon
    for text in ("IPAddresses=x\n", "DHCPEnabled=1\n", "Foo=1\n", "\xff", "Subnets=/129\n"):
        assert await errno_of(write_config(view, text)) == errno.EINVAL, text
    assert daemon.requests == []
    # Inconsistent in a write of several lines: EINVAL, no SET.
    bad = "IPAddresses=192.0.2.1,192.0.2.2\nSubnets=255.255.255.0\n"
    assert await errno_of(write_config(view, bad)) == errno.EINVAL
    assert ops(daemon) == [m.Op.GET_IP_INFO]
    for subnet in ("24", "/64"):  # an IPv4 address needs a dotted netmask
        text = f"IPAddresses=192.0.2.1\nSubnets={subnet}\n"
        assert await errno_of(write_config(view, text)) == errno.EINVAL
    # A single line that never fits: nothing sent, and the close says so.
    daemon.requests.clear()
    await write_config(view, "IPAddresses=192.0.2.1,192.0.2.2\n")
    assert ops(daemon) == [m.Op.GET_IP_INFO]
    assert "never fitted together" in caplog.text
    # The guest has no interface with that GUID: ENODEV; an item the daemon
    # refuses (the host API sends what it is given): EINVAL.
    assert await errno_of(write_config(view, CONFIG, mac=LOST_MAC)) == errno.ENODEV
    from kvpfs.peers.hyperv.ipconfig import IpConfig

    with pytest.raises(FsError) as info:
        await rig.host.set_ip_info(GUID, IpConfig(("nonsense",), ("255.255.255.0",)))
    assert info.value.errno == errno.EINVAL
    # Fields the host cannot send: EINVAL before anything goes out.
    daemon.requests.clear()
    with pytest.raises(FsError) as info:
        await rig.host.set_ip_info(GUID, IpConfig(dns_servers=("192.0.2.1",) * 200))
    assert info.value.errno == errno.EINVAL and daemon.requests == []


async def test_net_without_daemon(nursery: trio.Nursery) -> None:
    r = Rig(nursery)
    assert await errno_of(read_config(r.view)) == errno.ENOTCONN
    assert await errno_of(write_config(r.view, CONFIG)) == errno.ENOTCONN


async def test_net_read_only(nursery: trio.Nursery) -> None:
    r = Rig(nursery, read_only=True)
    await r.start()
    assert not (await r.view.lookup(("net", MAC, "config"))).writable
    assert await read_config(r.view) == CONFIG.encode()
    assert await errno_of(write_config(r.view, CONFIG)) == errno.EROFS
    nursery.cancel_scope.cancel()
