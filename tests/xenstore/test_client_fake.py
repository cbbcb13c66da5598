"""kvpfs.xenstore.client against a tiny scripted server: the failure paths a real
xenstored does not produce on demand (timeouts, late and out-of-order replies, dropped
connections, refused reconnects, garbage) and the character-device transport."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import tty
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from kvpfs.xenstore import locate
from kvpfs.xenstore.client import (
    Overflow,
    Reconnected,
    WatchEvent,
    XenStoreClient,
    XenStoreError,
)
from kvpfs.xenstore.protocol import (
    Decoder,
    Message,
    Op,
    build_error,
    build_watch_event,
    encode_message,
    parse_watch,
)


class FakeConn:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.held: list[Message] = []
        self.closed = trio.Event()
        self._lock = trio.Lock()

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_message(msg))

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    async def event(self, path: bytes, token: bytes) -> None:
        await self.send(Message(Op.WATCH_EVENT, 0, 0, build_watch_event(path, token)))

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


Handler = Callable[[FakeConn, Message], Awaitable[None]]


class FakeXenstored:
    """Answers every request like a trivial xenstored unless told otherwise.

    ``hold`` lists operations that get no reply (the requests collect in
    ``conn.held``); ``refuse`` makes connection attempts fail.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.log: list[Message] = []
        self.conns: list[FakeConn] = []
        self.hold: set[int] = set()
        self.refuse = 0
        self.attempts = 0
        self.handler: Handler = self.default
        self.received = trio.Event()
        self._tx = 0

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        ours, theirs = socket.socketpair()
        return self.attach(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs)

    def attach(self, server_side: trio.abc.Stream, client_side: socket.socket) -> trio.abc.Stream:
        conn = FakeConn(server_side)
        self.conns.append(conn)
        self.nursery.start_soon(self.serve, conn)
        return trio.SocketStream(trio.socket.from_stdlib_socket(client_side))

    async def serve(self, conn: FakeConn) -> None:
        decoder = Decoder()
        try:
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                decoder.feed(data)
                for msg in decoder:
                    self.log.append(msg)
                    self.received.set()
                    self.received = trio.Event()
                    if msg.type in self.hold:
                        conn.held.append(msg)
                    else:
                        await self.handler(conn, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            conn.closed.set()

    async def default(self, conn: FakeConn, msg: Message) -> None:
        await conn.send(self.answer(msg))
        if msg.type == Op.WATCH:
            await conn.event(*parse_watch(msg.payload))

    def answer(self, msg: Message) -> Message:
        if msg.type == Op.READ:
            return msg.reply(b"value of " + msg.payload[:-1])
        if msg.type == Op.TRANSACTION_START:
            self._tx += 1
            return msg.reply(b"%d\0" % self._tx)
        if msg.type == Op.DIRECTORY_PART:
            return msg.error_reply(errno.ENOSYS)
        if msg.type == Op.DIRECTORY:
            return msg.error_reply(errno.E2BIG)
        return msg.reply()

    def ops(self, op: Op) -> list[Message]:
        return [m for m in self.log if m.type == op]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not predicate():
                await self.received.wait()


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeXenstored:
    return FakeXenstored(nursery)


def client(server: FakeXenstored, **kw: object) -> XenStoreClient:
    kw.setdefault("reconnect_delay", 0.01)
    return XenStoreClient(connect=server.connect, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- matching


async def test_out_of_order_replies_are_matched_by_req_id(server: FakeXenstored) -> None:
    server.hold = {Op.READ}
    async with client(server) as xs:
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await xs.read(f"/r/{i}")

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(read, i)
            conn = server.conns[0]
            await server.wait_for(lambda: len(conn.held) == 10)
            for msg in reversed(conn.held):
                # interleave events for nobody, which must not disturb anything
                await conn.event(b"/nobody", b"unknown-token")
                await conn.send(server.answer(msg))
        assert results == {i: f"value of /r/{i}".encode() for i in range(10)}
        assert len({m.req_id for m in server.log}) == 10


async def test_reply_of_the_wrong_type_is_eio(server: FakeXenstored) -> None:
    async def wrong(conn: FakeConn, msg: Message) -> None:
        await conn.send(Message(Op.WRITE, msg.req_id, 0, b"OK\0"))

    server.handler = wrong
    async with client(server) as xs:
        with pytest.raises(XenStoreError) as info:
            await xs.read("/x")
        assert info.value.errno == errno.EIO


async def test_malformed_watch_event_is_ignored(server: FakeXenstored) -> None:
    async with client(server) as xs, xs.watch("/w", "t") as events:
        assert await events.__anext__() == WatchEvent("/w", "t")
        conn = server.conns[0]
        await conn.send(Message(Op.WATCH_EVENT, 0, 0, b"no-token"))
        await conn.event(b"/w/x", b"t")
        assert await events.__anext__() == WatchEvent("/w/x", "t")


# --------------------------------------------------------------------------- timeouts


async def test_timeout_then_late_reply_is_discarded(server: FakeXenstored) -> None:
    server.hold = {Op.READ}
    async with client(server, timeout=0.1) as xs:
        with trio.fail_after(2), pytest.raises(XenStoreError) as info:
            await xs.read("/slow")
        assert info.value.errno == errno.ETIMEDOUT and info.value.name == "ETIMEDOUT"
        conn = server.conns[0]
        late = conn.held.pop()
        server.hold = set()
        await xs.write("/still", b"works")
        await conn.send(Message(Op.READ, late.req_id, 0, b"late"))
        assert await xs.read("/fresh") == b"value of /fresh"
        assert xs.connections == 1


async def test_late_transaction_start_is_aborted(server: FakeXenstored) -> None:
    server.hold = {Op.TRANSACTION_START}
    async with client(server, timeout=0.1) as xs:
        with pytest.raises(XenStoreError) as info:
            async with xs.transaction():
                pass
        assert info.value.errno == errno.ETIMEDOUT
        conn = server.conns[0]
        await conn.send(conn.held[0].reply(b"42\0"))
        await server.wait_for(lambda: bool(server.ops(Op.TRANSACTION_END)))
        (end,) = server.ops(Op.TRANSACTION_END)
        assert (end.tx_id, end.payload) == (42, b"F\0")


async def test_cancelled_watch_is_unwatched_when_the_reply_comes(server: FakeXenstored) -> None:
    server.hold = {Op.WATCH}
    async with client(server) as xs:
        with trio.move_on_after(0.05):
            async with xs.watch("/cw", "tok"):
                pytest.fail("the watch cannot be set while the server holds it")
        conn = server.conns[0]
        await conn.send(conn.held[0].reply())
        await server.wait_for(lambda: bool(server.ops(Op.UNWATCH)))
        assert server.ops(Op.UNWATCH)[0].payload == b"/cw\0tok\0"


# --------------------------------------------------------------------------- reconnect


async def test_reconnect_fails_pending_and_reregisters_watches(server: FakeXenstored) -> None:
    async with client(server) as xs, xs.watch("/rw", "tok") as events:
        assert await events.__anext__() == WatchEvent("/rw", "tok")
        tx_cm = xs.transaction()
        tx = await tx_cm.__aenter__()
        server.hold = {Op.READ}
        errors: list[int] = []

        async def read() -> None:
            try:
                await xs.read("/pending")
            except XenStoreError as exc:
                errors.append(exc.errno or 0)

        server.refuse = 2  # the first two reconnection attempts fail
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(read)
            await server.wait_for(lambda: len(server.conns[0].held) == 3)
            with trio.fail_after(1):  # pending callers learn at once
                await server.conns[0].close()
        assert errors == [errno.ECONNRESET] * 3
        server.hold = set()
        with trio.fail_after(5):
            await xs.wait_connected()
        assert server.attempts == 4 and xs.connections == 2
        # the transaction belonged to the lost connection: requests and commit fail
        with pytest.raises(XenStoreError) as info:
            await tx.write("/rw/x", b"")
        assert info.value.errno == errno.ECONNRESET
        with pytest.raises(XenStoreError) as info:
            await tx_cm.__aexit__(None, None, None)
        assert info.value.errno == errno.ECONNRESET
        assert not server.ops(Op.TRANSACTION_END)
        # the watch was registered on the new connection before it was published
        second = server.conns[1]
        assert [parse_watch(m.payload) for m in server.ops(Op.WATCH)] == [(b"/rw", b"tok")] * 2
        # the marker follows the re-registration's reply; its initial event may come
        # before or after the marker
        got = {await events.__anext__(), await events.__anext__()}
        assert got == {WatchEvent("/rw", "tok"), Reconnected()}
        await second.event(b"/rw/new", b"tok")
        assert await events.__anext__() == WatchEvent("/rw/new", "tok")


async def test_requests_while_disconnected(server: FakeXenstored) -> None:
    async with client(server, reconnect_delay=0.2) as xs:
        server.refuse = 1
        await server.conns[0].close()
        with trio.fail_after(1):
            while xs.connected:
                await trio.sleep(0.005)
        with pytest.raises(XenStoreError) as info:
            await xs.read("/x")
        assert info.value.errno == errno.ENOTCONN
        with trio.fail_after(5):
            await xs.wait_connected()
        assert await xs.read("/x") == b"value of /x"


async def test_failed_reregistration_ends_that_watch(server: FakeXenstored) -> None:
    async with client(server) as xs, xs.watch("/a", "t") as events:
        await events.__anext__()

        async def refuse_watch(conn: FakeConn, msg: Message) -> None:
            if msg.type == Op.WATCH:
                await conn.send(msg.error_reply(errno.EACCES))
            else:
                await server.default(conn, msg)

        server.handler = refuse_watch
        await server.conns[0].close()
        with trio.fail_after(5), pytest.raises(XenStoreError) as info:
            await events.__anext__()
        assert info.value.errno == errno.EACCES
        await xs.wait_connected()


async def test_oversized_frame_from_server_drops_the_connection(server: FakeXenstored) -> None:
    async with client(server) as xs:
        await server.conns[0].send_raw(struct.pack("=IIII", Op.READ, 1, 0, 5000))
        with trio.fail_after(5):
            while xs.connections < 2:
                await trio.sleep(0.005)
        assert server.conns[0].closed.is_set()
        assert await xs.read("/ok") == b"value of /ok"


async def test_backoff_from_a_server_that_keeps_dropping_us(server: FakeXenstored) -> None:
    async def hang_up(conn: FakeConn, msg: Message) -> None:
        await conn.close()

    server.handler = hang_up
    real_connect = server.connect

    async def connect_and_drop() -> trio.abc.Stream:
        stream = await real_connect()
        await server.conns[-1].close()
        return stream

    async with XenStoreClient(connect=connect_and_drop, reconnect_delay=0.01) as xs:
        await trio.sleep(0.5)
        # 0.01 s doubling: about six attempts, not a busy loop
        assert 2 <= server.attempts <= 10
        assert not xs.connected or xs.connections > 1


async def test_without_reconnect_everything_ends(server: FakeXenstored) -> None:
    async with client(server, reconnect=False) as xs, xs.watch("/w") as events:
        await events.__anext__()
        await server.conns[0].close()
        with trio.fail_after(2), pytest.raises(XenStoreError) as info:
            await events.__anext__()
        assert info.value.errno == errno.ECONNRESET
        with pytest.raises(XenStoreError) as info:
            await xs.read("/x")
        assert info.value.errno == errno.ESHUTDOWN
        assert server.attempts == 1


# --------------------------------------------------------------------------- watches


async def test_slow_consumer_never_blocks_the_connection(server: FakeXenstored) -> None:
    async with client(server) as xs, xs.watch("/f", "t", capacity=2) as events:
        conn = server.conns[0]
        for i in range(1000):
            await conn.event(b"/f/%d" % i, b"t")
        with trio.fail_after(2):
            assert await xs.read("/x") == b"value of /x"
        assert [await events.__anext__() for _ in range(3)] == [
            WatchEvent("/f", "t"),
            WatchEvent("/f/0", "t"),
            Overflow(999),
        ]
        assert events.pending() == 0


async def test_directory_without_directory_part_raises_e2big(server: FakeXenstored) -> None:
    async with client(server) as xs:
        with pytest.raises(XenStoreError) as info:
            await xs.directory("/huge")
        assert info.value.errno == errno.E2BIG
        assert [m.type for m in server.log] == [Op.DIRECTORY, Op.DIRECTORY_PART]


# --------------------------------------------------------------------------- lifetime


async def test_closing_wakes_pending_callers(server: FakeXenstored) -> None:
    server.hold = {Op.READ}
    async with trio.open_nursery() as nursery:
        xs = client(server, nursery=nursery)
        async with xs:
            errors: list[int] = []

            async def read() -> None:
                try:
                    await xs.read("/x")
                except XenStoreError as exc:
                    errors.append(exc.errno or 0)

            async with trio.open_nursery() as callers:
                callers.start_soon(read)
                await server.wait_for(lambda: bool(server.conns[0].held))
                await xs.aclose()
            assert errors == [errno.ESHUTDOWN]
        assert not nursery.child_tasks  # the client's tasks ended with the block
    with trio.fail_after(1):
        await server.conns[0].closed.wait()


async def test_cancelling_the_owner_cancels_the_client(server: FakeXenstored) -> None:
    with trio.move_on_after(0.1) as scope:
        async with client(server) as xs, xs.watch("/w") as events:
            async for _ in events:
                pass
    assert scope.cancelled_caught
    with pytest.raises(XenStoreError) as info:
        await xs.read("/x")
    assert info.value.errno == errno.ESHUTDOWN


async def test_client_cannot_be_entered_twice(server: FakeXenstored) -> None:
    xs = client(server)
    async with xs:
        with pytest.raises(RuntimeError):
            await xs.__aenter__()


# --------------------------------------------------------------------------- transports


async def test_fd_stream_over_socketpair(server: FakeXenstored) -> None:
    """The xenbus device path uses the same framing over a plain descriptor."""

    async def connect() -> trio.abc.Stream:
        ours, theirs = socket.socketpair()
        conn = FakeConn(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        server.conns.append(conn)
        server.nursery.start_soon(server.serve, conn)
        return trio.lowlevel.FdStream(theirs.detach())

    async with XenStoreClient(connect=connect) as xs:
        assert await xs.read("/fd") == b"value of /fd"


@pytest.fixture
def pty_device() -> Iterator[tuple[str, int]]:
    """A character device whose other end we serve: a raw pseudo-terminal."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield os.ttyname(slave), master
    finally:
        os.close(slave)
        os.close(master)


async def test_character_device_is_opened_read_write(
    server: FakeXenstored, pty_device: tuple[str, int]
) -> None:
    path, master = pty_device
    conn = FakeConn(trio.lowlevel.FdStream(os.dup(master)))
    server.conns.append(conn)
    server.nursery.start_soon(server.serve, conn)
    async with XenStoreClient(path) as xs:
        assert xs.endpoint == path
        assert await xs.read("/dev") == b"value of /dev"
        async with xs.watch("/dev/w", "t") as events:
            assert await events.__anext__() == WatchEvent("/dev/w", "t")
        await xs.write("/dev/bin", bytes(range(256)) * 4)
        assert server.log[-1].payload == b"/dev/bin\0" + bytes(range(256)) * 4
    await conn.close()


def test_locate_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.path.exists", lambda p: p == "/dev/xen/xenbus")
    assert locate.candidates({}) == ["/var/run/xenstored/socket", "/dev/xen/xenbus"]
    assert locate.candidates({"XENSTORED_RUNDIR": "/r"}) == ["/r/socket", "/dev/xen/xenbus"]
    assert locate.candidates({"XENSTORED_PATH": "/p", "XENSTORED_RUNDIR": "/r"}) == ["/p"]
    monkeypatch.setattr("os.path.exists", lambda p: False)
    assert locate.candidates({}) == ["/var/run/xenstored/socket", "/proc/xen/xenbus"]


async def test_open_default_tries_candidates_in_order(
    tmp_path: os.PathLike[str], pty_device: tuple[str, int]
) -> None:
    path, _ = pty_device
    missing = os.path.join(tmp_path, "run")
    stream, where = await locate.open_default({"XENSTORED_PATH": path})
    assert where == path and isinstance(stream, trio.lowlevel.FdStream)
    await stream.aclose()
    with pytest.raises(OSError) as info:
        await locate.open_default({"XENSTORED_RUNDIR": missing})
    assert info.value.errno == errno.ENOENT
    assert missing in str(info.value)


async def test_unix_socket_path_is_connected(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen()
    stream = await locate.open_path(path)
    assert isinstance(stream, trio.SocketStream)
    accepted, _ = await listener.accept()
    accepted.close()
    listener.close()
    await stream.aclose()
    with pytest.raises(OSError):
        await locate.open_path(os.path.join(tmp_path, "absent"))


async def test_unix_connect_waits_for_a_full_backlog(tmp_path: os.PathLike[str]) -> None:
    """cxenstored listens with a backlog of 1: a connect must wait, not come back
    unconnected (a non-blocking AF_UNIX connect fails with EAGAIN then)."""
    path = os.path.join(tmp_path, "sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        got: list[trio.abc.Stream] = []

        async def connect() -> None:
            got.append(await locate.open_path(path))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await trio.sleep(0.05)
            assert not got  # still waiting for a slot
            listener.accept()[0].close()  # frees one
        with trio.fail_after(2):
            await got[0].send_all(b"ping")
        listener.setblocking(False)
        found = False
        with trio.fail_after(5):
            while not found:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    await trio.sleep(0.01)
                    continue
                conn.settimeout(0.2)
                with conn, contextlib.suppress(TimeoutError):
                    found = conn.recv(4) == b"ping"
        await got[0].aclose()
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_error_names_for_local_errors() -> None:
    assert XenStoreError(errno.ETIMEDOUT).name == "ETIMEDOUT"
    assert XenStoreError(errno.ENOENT).name == "ENOENT"
    assert str(XenStoreError(errno.EAGAIN)).startswith("[EAGAIN]")
    assert build_error(errno.ECONNRESET) == b"EINVAL\0"
