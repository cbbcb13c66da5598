"""The host/ tree as a backend, against the stand-in daemon: names, errnos, freshness."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import NodeKind
from kvpfs.kvp.names import key_to_name
from kvpfs.peers.hyperv.device import KvpDevice
from kvpfs.peers.hyperv.host import KvpHost
from kvpfs.peers.hyperv.view import HostView

from .fakedaemon import FakeDaemon


class Rig:
    def __init__(self, nursery: trio.Nursery, *, read_only: bool = False) -> None:
        self.device = KvpDevice(timeout=0.5)
        self.host = KvpHost(self.device, connect_timeout=0.2)
        self.view = HostView(self.host, read_only=read_only, cache_ttl=0.5)
        self.daemon = FakeDaemon(self.device)
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
