"""kvpfs.xenstore.client against real servers: every test runs on the embedded server
and on cxenstored 4.17 under the test shim (fixtures of conftest.py; the cxenstored
half skips when xen-utils-4.17, gcc or the Xen headers are missing)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kvpfs.xenstore.client import (
    Overflow,
    Reconnected,
    Transaction,
    TransactionConflict,
    WatchEvent,
    XenStoreClient,
    XenStoreError,
)
from kvpfs.xenstore.protocol import Access, Op, Perm

from .conftest import EmbeddedServer, RealDaemon, ServerPath


class Restartable:
    """A server that can be stopped and started again on the same socket path."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix="xsr-"))  # short: socket paths <= 107 bytes
        self.real: RealDaemon | None = None
        self.embedded: EmbeddedServer | None = None
        if kind == "real":
            self.real = RealDaemon(request.getfixturevalue("fakexen_so"), self.dir)
            self.socket = self.real.socket
        else:
            self.socket = str(self.dir / "xs.sock")

    def start(self) -> None:
        if self.real is not None:
            self.real.start()
        else:
            self.embedded = EmbeddedServer(self.dir, guests=())
            self.embedded.start()

    def stop(self) -> None:
        if self.real is not None:
            self.real.stop()
        elif self.embedded is not None:
            server, self.embedded = self.embedded, None
            server.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["embedded", "real"])
def restartable(request: pytest.FixtureRequest) -> Iterator[Restartable]:
    server = Restartable(request.param, request)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(params=["embedded", "real"])
def server_process(request: pytest.FixtureRequest) -> ServerPath:
    """A server in a process of its own (it can be frozen and killed)."""
    name = "xenstored_embedded_process" if request.param == "embedded" else "xenstored_real"
    path: ServerPath = request.getfixturevalue(name)
    return path


@pytest.fixture
def socket_path(xenstored: ServerPath) -> str:
    return str(xenstored)


# --------------------------------------------------------------------------- basics


async def test_read_write_binary_and_tree_ops(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        await xs.write("/t/x/y", b"a\0b\xff")
        assert await xs.read("/t/x/y") == b"a\0b\xff"
        await xs.write("/t/x/s", "text")
        assert await xs.read(b"/t/x/s") == b"text"
        await xs.mkdir("/t/m/n")
        assert await xs.read("/t/m") == b""
        assert await xs.directory("/t") == ["x", "m"]  # creation order
        assert await xs.directory("/t/m/n") == []
        assert await xs.exists("/t/m/n")
        await xs.rm("/t/m")
        assert not await xs.exists("/t/m/n")
        await xs.rm("/t/nonexistent")  # parent exists: OK
        assert await xs.directory("/") == ["tool", "t"]


async def test_errors_carry_errno_and_wire_name(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        cases = [
            (xs.read("/no/such"), errno.ENOENT, "ENOENT"),
            (xs.read("/bad path"), errno.EINVAL, "EINVAL"),
            (xs.read("/trailing/"), errno.EINVAL, "EINVAL"),
            (xs.rm("/"), errno.EINVAL, "EINVAL"),
            (xs.rm("/no/such"), errno.ENOENT, "ENOENT"),
            (xs.request(Op.TYPE_COUNT, b""), errno.ENOSYS, "ENOSYS"),
            (xs.request(Op.TRANSACTION_END, b"T\0", tx_id=999), errno.ENOENT, "ENOENT"),
            (xs.write("/big", b"v" * 4096), errno.E2BIG, "E2BIG"),  # refused locally
            (xs.read("nul\0inside"), errno.EINVAL, "EINVAL"),
        ]
        for coro, err, name in cases:
            with pytest.raises(XenStoreError) as info:
                await coro
            assert isinstance(info.value, OSError)
            assert (info.value.errno, info.value.name) == (err, name)
        # the connection survived all of that
        assert await xs.read("/tool/xenstored") == b""


async def test_relative_paths_use_dom0_home(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        await xs.write("rel/a", b"1")
        assert await xs.read("/local/domain/0/rel/a") == b"1"
        assert await xs.get_domain_path(7) == "/local/domain/7"


async def test_permissions(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        assert await xs.get_perms("/") == [Perm(Access.NONE, 0)]
        await xs.write("/p/x", b"")
        await xs.set_perms("/p/x", ["n5", "r6", Perm(Access.BOTH, 7)])
        await xs.write("/p/x/new", b"")
        assert await xs.get_perms("/p/x/new") == [
            Perm(Access.NONE, 5),
            Perm(Access.READ, 6),
            Perm(Access.BOTH, 7),
        ]
        await xs.set_perms("/p/x", ["n0x10"])
        assert [str(p) for p in await xs.get_perms("/p/x")] == ["n16"]
        with pytest.raises(XenStoreError) as info:
            await xs.set_perms("/p/x", ["q5"])
        assert info.value.errno == errno.EINVAL
        with pytest.raises(XenStoreError):
            await xs.set_perms("/p/x", [])


async def test_domains_and_control(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        assert await xs.is_domain_introduced(0)
        assert not await xs.is_domain_introduced(3)
        async with xs.watch("@introduceDomain") as intro, xs.watch("@releaseDomain") as rel:
            assert await intro.__anext__() == WatchEvent("@introduceDomain", intro.token)
            assert await rel.__anext__() == WatchEvent("@releaseDomain", rel.token)
            await xs.introduce(3, 12345, 7)
            assert await intro.__anext__() == WatchEvent("@introduceDomain", intro.token)
            assert await xs.is_domain_introduced(3)
            await xs.release(3)
            assert await rel.__anext__() == WatchEvent("@releaseDomain", rel.token)
            assert not await xs.is_domain_introduced(3)
        assert await xs.control("check") == b"OK\0"
        assert b"quota" in await xs.control("help")


async def test_directory_part_fallback(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        names = [f"child-with-a-fairly-long-name-{i:04d}" for i in range(400)]

        async def fill(tx: Transaction) -> None:
            for n in names:
                await tx.write(f"/big/{n}", b"")

        await xs.run_in_transaction(fill)
        with pytest.raises(XenStoreError) as info:
            await xs.request(Op.DIRECTORY, b"/big\0")
        assert info.value.errno == errno.E2BIG
        assert await xs.directory("/big") == names


async def test_directory_part_restarts_when_the_directory_changes(socket_path: str) -> None:
    """A write between two chunks changes the generation: the listing starts over."""
    async with XenStoreClient(socket_path) as xs, XenStoreClient(socket_path) as other:
        names = [f"entry-number-{i:05d}-padding-padding" for i in range(300)]
        for n in names:
            await xs.write(f"/big/{n}", b"")
        calls = 0
        real_request = xs.request

        async def spy(op: Op | int, payload: bytes, tx_id: int = 0) -> bytes:
            nonlocal calls
            if op == Op.DIRECTORY_PART:
                calls += 1
                if calls == 2:
                    await other.write("/big/zz-late", b"")
            return await real_request(op, payload, tx_id)

        xs.request = spy  # type: ignore[method-assign]
        listing = await xs.directory("/big")
        assert listing == [*names, "zz-late"]
        assert calls > 4  # at least one full pass after the restart


# --------------------------------------------------------------------------- concurrency


async def test_many_concurrent_requests_on_one_connection(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        results: dict[int, bytes] = {}

        async def worker(i: int) -> None:
            await xs.write(f"/c/{i}", b"v%d" % i)
            results[i] = await xs.read(f"/c/{i}")

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(worker, i)
        assert results == {i: b"v%d" % i for i in range(200)}
        assert sorted(await xs.directory("/c"), key=int) == [str(i) for i in range(200)]


async def test_cancelled_callers_do_not_break_the_connection(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        await xs.write("/k", b"value")
        for _ in range(20):
            with trio.move_on_after(0.0005):
                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        nursery.start_soon(xs.write, f"/k/{i}", b"x")
                        nursery.start_soon(xs.read, "/k")
        # replies to abandoned requests were discarded; new ones still match
        for i in range(20):
            await xs.write(f"/after/{i}", b"%d" % i)
        assert [await xs.read(f"/after/{i}") for i in range(20)] == [b"%d" % i for i in range(20)]


# --------------------------------------------------------------------------- watches


async def test_watch_initial_event_and_delivery(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs, xs.watch("/w/x", "tok") as events:
        assert await events.__anext__() == WatchEvent("/w/x", "tok")
        await xs.write("/w/x/y", b"1")
        await xs.write("/w/xother", b"2")  # not below /w/x
        await xs.set_perms("/w/x/y", ["n0", "r1"])
        await xs.rm("/w")
        got = [await events.__anext__() for _ in range(3)]
        assert [e.path for e in got if isinstance(e, WatchEvent)] == ["/w/x/y", "/w/x/y", "/w/x"]
        with pytest.raises(XenStoreError) as info:
            async with xs.watch("/w/x", "tok"):
                pass
        assert info.value.errno == errno.EEXIST


async def test_watch_relative_and_shared_tokens(socket_path: str) -> None:
    async with (
        XenStoreClient(socket_path) as xs,
        xs.watch("rel/a", "same") as a,
        xs.watch("/other", "same") as b,
    ):
        assert (await a.__anext__()) == WatchEvent("rel/a", "same")
        assert (await b.__anext__()) == WatchEvent("/other", "same")
        await xs.write("rel/a/b", b"")
        await xs.write("/other/c", b"")
        assert await a.__anext__() == WatchEvent("rel/a/b", "same")
        assert await b.__anext__() == WatchEvent("/other/c", "same")
        assert a.pending() == 0 and b.pending() == 0


async def test_watch_events_between_request_and_reply(socket_path: str) -> None:
    """Events for one task's watch interleave with another task's replies."""
    async with XenStoreClient(socket_path) as xs, xs.watch("/ev") as events:
        await events.__anext__()
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(xs.write, f"/ev/{i}", b"x")
        seen = {(await events.__anext__()).path for _ in range(100)}  # type: ignore[union-attr]
        assert seen == {f"/ev/{i}" for i in range(100)}


async def test_watch_overflow_marker(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs, xs.watch("/o", capacity=4) as events:
        for i in range(10):
            await xs.write(f"/o/{i}", b"")
        await xs.read("/o")  # all events of the writes arrived before this reply
        got = [await events.__anext__() for _ in range(5)]
        assert [g.path for g in got[:4] if isinstance(g, WatchEvent)] == [
            "/o",
            "/o/0",
            "/o/1",
            "/o/2",
        ]
        assert got[4] == Overflow(7)
        await xs.write("/o/late", b"")
        assert await events.__anext__() == WatchEvent("/o/late", events.token)


async def test_unwatch_on_exit(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        async with xs.watch("/u", "t1"):
            pass
        # the server forgot it: the same (path, token) registers again
        async with xs.watch("/u", "t1") as events:
            assert await events.__anext__() == WatchEvent("/u", "t1")
        with pytest.raises(XenStoreError) as info:
            await xs.request(Op.UNWATCH, b"/u\0t1\0")
        assert info.value.errno == errno.ENOENT


async def test_reset_watches_ends_watches(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs, xs.watch("/r") as events:
        await events.__anext__()
        await xs.reset_watches()
        with pytest.raises(XenStoreError) as info:
            await events.__anext__()
        assert info.value.errno == errno.ECANCELED


# --------------------------------------------------------------------------- transactions


async def test_transaction_isolation_commit_and_events(socket_path: str) -> None:
    async with (
        XenStoreClient(socket_path) as xs,
        XenStoreClient(socket_path) as other,
        other.watch("/tx") as events,
    ):
        await events.__anext__()
        async with xs.transaction() as tx:
            await tx.write("/tx/b", b"1")
            assert await tx.read("/tx/b") == b"1"
            with pytest.raises(XenStoreError) as info:
                await other.read("/tx/b")
            assert info.value.errno == errno.ENOENT
            assert events.pending() == 0
        assert await other.read("/tx/b") == b"1"
        assert (await events.__anext__()) == WatchEvent("/tx/b", events.token)


async def test_transaction_aborts_on_exception(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:
        with pytest.raises(KeyError):
            async with xs.transaction() as tx:
                await tx.write("/ab/x", b"1")
                raise KeyError("boom")
        assert tx.ended
        assert not await xs.exists("/ab/x")
        with pytest.raises(XenStoreError) as info:  # the id is gone on the server
            await xs.request(Op.READ, b"/\0", tx_id=tx.id)
        assert info.value.errno == errno.ENOENT


async def test_transaction_conflict_and_retry(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs, XenStoreClient(socket_path) as other:
        await xs.write("/cf/a", b"0")
        with pytest.raises(TransactionConflict) as info:
            async with xs.transaction() as tx:
                await tx.read("/cf/a")
                await other.write("/cf/a", b"changed")
                await tx.write("/cf/b", b"1")
        assert info.value.errno == errno.EAGAIN and isinstance(info.value, XenStoreError)
        assert not await xs.exists("/cf/b")

        attempts = 0

        async def increment(tx: Transaction) -> int:
            nonlocal attempts
            attempts += 1
            value = int(await tx.read("/cf/counter"))
            if attempts < 3:
                await other.write("/cf/counter", b"%d" % (value + 100))
            await tx.write("/cf/counter", b"%d" % (value + 1))
            return value + 1

        await xs.write("/cf/counter", b"0")
        assert await xs.run_in_transaction(increment) == 201
        assert attempts == 3
        assert await xs.read("/cf/counter") == b"201"

        async def always_conflicts(tx: Transaction) -> None:
            await tx.read("/cf/a")
            await other.write("/cf/a", b"again")

        with pytest.raises(TransactionConflict):
            await xs.run_in_transaction(always_conflicts, retries=2)


async def test_concurrent_transactions(socket_path: str) -> None:
    async with XenStoreClient(socket_path) as xs:

        async def bump(tx: Transaction) -> None:
            value = int(await tx.read("/n")) if await tx.exists("/n") else 0
            await trio.sleep(0)
            await tx.write("/n", b"%d" % (value + 1))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(xs.run_in_transaction, bump, 100)
        assert await xs.read("/n") == b"10"


# --------------------------------------------------------------------------- lifetime


async def test_close_ends_watches_and_requests(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        async with XenStoreClient(socket_path, nursery=nursery) as xs:
            async with xs.watch("/z") as events:
                await events.__anext__()
                await xs.aclose()
                with pytest.raises(XenStoreError) as info:
                    await events.__anext__()
                assert info.value.errno == errno.ESHUTDOWN
            with pytest.raises(XenStoreError) as info:
                await xs.read("/")
            assert info.value.errno == errno.ESHUTDOWN
        assert not nursery.child_tasks  # the client's tasks are gone


async def test_connect_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(XenStoreError) as info:
        async with XenStoreClient(str(tmp_path / "nothing-here")):
            pass
    assert info.value.errno == errno.ENOENT


async def test_locates_server_through_environment(xenstored_real: ServerPath) -> None:
    socket_path = str(xenstored_real)
    rundir = str(Path(socket_path).parent)
    for env in ({"XENSTORED_PATH": socket_path}, {"XENSTORED_RUNDIR": rundir}):
        async with XenStoreClient(env=env) as xs:
            assert xs.endpoint == socket_path
            assert await xs.read("/tool") == b""


async def test_reconnect_after_server_restart(restartable: Restartable) -> None:
    daemon = restartable
    async with XenStoreClient(daemon.socket, reconnect_delay=0.01) as xs:
        await xs.write("/before", b"1")
        async with xs.watch("/rw", "tok") as events:
            assert await events.__anext__() == WatchEvent("/rw", "tok")
            tx_cm = xs.transaction()
            tx = await tx_cm.__aenter__()
            await tx.write("/rw/in-tx", b"")

            await trio.to_thread.run_sync(daemon.stop)
            with trio.fail_after(5):
                while xs.connected:
                    await trio.sleep(0.01)
            with pytest.raises(XenStoreError) as info:
                await xs.read("/before")
            assert info.value.errno == errno.ENOTCONN

            await trio.to_thread.run_sync(daemon.start)
            with trio.fail_after(10):
                await xs.wait_connected()
            assert xs.connections == 2
            # the new daemon starts empty; the watch is registered again
            got = {await events.__anext__(), await events.__anext__()}
            assert got == {WatchEvent("/rw", "tok"), Reconnected()}
            await xs.write("/rw/after", b"")
            assert await events.__anext__() == WatchEvent("/rw/after", "tok")
            # the transaction belonged to the lost connection
            with pytest.raises(XenStoreError) as info:
                await tx.read("/rw")
            assert info.value.errno == errno.ECONNRESET
            with pytest.raises(XenStoreError):
                await tx_cm.__aexit__(None, None, None)


async def test_pending_requests_fail_promptly_when_server_dies(server_process: ServerPath) -> None:
    pid = server_process.pid
    assert pid is not None
    async with XenStoreClient(server_process, reconnect=False) as xs, xs.watch("/d") as events:
        await events.__anext__()
        # Hold requests open by freezing the server, then kill it.
        os.kill(pid, signal.SIGSTOP)
        errors: list[int] = []

        async def read() -> None:
            try:
                await xs.read("/tool")
            except XenStoreError as exc:
                errors.append(exc.errno or 0)

        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(read)
                await trio.sleep(0.1)
                assert errors == []
                os.kill(pid, signal.SIGKILL)
        assert errors == [errno.ECONNRESET] * 5
        with pytest.raises(XenStoreError) as info:
            await events.__anext__()
        assert info.value.errno == errno.ECONNRESET
