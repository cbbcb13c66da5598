"""The embedded server's transport: framing errors, bounded memory, connection churn,
domain sockets, cancellation and shutdown."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from kvpfs.peers.xenstored import trio_fastpath
from kvpfs.peers.xenstored.server import XenstoredServer, _Client, serve_xenstored
from kvpfs.xenstore.protocol import HEADER, Op

from .conftest import ConnectionClosed, RawConn, ServerPath, header


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    "data",
    [
        header(Op.WRITE, 4097) + b"/t\0",
        header(Op.READ, 0xFFFFFFFF),
        header(Op.READ, 5000)[:16],
    ],
    ids=["4097", "u32-max", "header-only"],
)
def test_oversized_length_drops_only_that_connection(
    xenstored_embedded: ServerPath, data: bytes
) -> None:
    with RawConn(xenstored_embedded) as bystander, RawConn(xenstored_embedded) as c:
        assert bystander.rq(Op.WATCH, z(b"/t", b"tok")) == b"OK\0"
        bystander.recv()
        c.send_raw(data)
        assert c.is_dropped()
        reply, events = bystander.request(Op.WRITE, b"/t\0v")
        assert reply.payload == b"OK\0"
        assert [e.payload for e in events] == [b"/t\0tok\0"]


def test_partial_frame_then_close_is_harmless(xenstored_embedded: ServerPath) -> None:
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(xenstored_embedded)
        s.sendall(header(Op.WRITE, 10) + b"/par")
        s.close()
    with RawConn(xenstored_embedded) as c:
        assert c.rq(Op.READ, z(b"/par")) == b"E:ENOENT"


def test_maximum_payload_accepted(xenstored_embedded: ServerPath) -> None:
    with RawConn(xenstored_embedded) as c:
        payload = b"/m\0" + b"v" * (4096 - 3)
        assert c.rq(Op.WRITE, payload) == b"OK\0"
        assert c.rq(Op.READ, z(b"/m")) == b"v" * 4093


def test_pipelined_requests_answered_in_order(xenstored_embedded: ServerPath) -> None:
    with RawConn(xenstored_embedded) as c:
        frames = [HEADER.pack(Op.WRITE, i, 0, 7) + b"/p\0%04d" % i for i in range(500)]
        frames += [HEADER.pack(Op.READ, 1000 + i, 0, 3) + b"/p\0" for i in range(500)]
        c.send_raw(b"".join(frames))
        ids = [c.recv().req_id for _ in range(1000)]  # type: ignore[union-attr]
        assert ids == list(range(500)) + [1000 + i for i in range(500)]


# --------------------------------------------------------------------------- bounds


def test_reader_that_never_reads_is_dropped_at_the_bound(
    embedded_factory: Callable[..., ServerPath],
) -> None:
    """Events for a client that never reads pile up only to ``max_pending_bytes``;
    past it the server drops that client, and everyone else carries on."""
    path = embedded_factory(guests=(), max_pending_bytes=64 * 1024)
    assert path.embedded is not None
    sleeper = socket.socket(socket.AF_UNIX)
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect(path)
    sleeper.sendall(HEADER.pack(Op.WATCH, 0, 0, 6) + b"/\0tok\0")
    with RawConn(path) as writer:
        value = b"v"
        long_name = b"x" * 1000  # events carry the path, so make them big
        for i in range(2000):
            assert writer.rq(Op.WRITE, b"/k%d%s\0" % (i, long_name) + value) == b"OK\0"
            if path.embedded.call(lambda: path.embedded.server.stats.dropped_backlog):  # type: ignore[union-attr]
                break
        stats = path.embedded.call(lambda: path.embedded.server.stats)  # type: ignore[union-attr]
        assert stats.dropped_backlog == 1
        assert path.embedded.call(lambda: path.embedded.server.connection_count) == 1  # type: ignore[union-attr]
        assert writer.rq(Op.READ, z(b"/k0" + long_name)) == value
    # The dropped client sees the end of the stream after what was sent in time.
    sleeper.settimeout(5)
    received = b""
    while chunk := sleeper.recv(65536):
        received += chunk
    sleeper.close()
    assert len(received) < 64 * 1024 + 4 * 65536


def test_client_that_sends_without_reading_stalls_only_itself(
    xenstored_embedded: ServerPath,
) -> None:
    """Replies are written before more requests are read: a flood of requests from a
    client that never reads its replies stays in the kernel buffers."""
    flood = socket.socket(socket.AF_UNIX)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood.connect(xenstored_embedded)
    flood.setblocking(False)
    frame = HEADER.pack(Op.READ, 0, 0, 6) + b"/tool\0"
    sent = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            sent += flood.send(frame * 256)
        except BlockingIOError:
            time.sleep(0.01)
            try:
                sent += flood.send(frame * 256)
            except BlockingIOError:
                break
    assert sent < 50 * 1024 * 1024  # the server stopped reading
    with RawConn(xenstored_embedded) as other:
        assert other.rq(Op.READ, z(b"/tool")) == b""
    flood.close()


def test_thousands_of_connections_no_fd_or_memory_leak(
    xenstored_embedded_process: ServerPath,
) -> None:
    path = xenstored_embedded_process
    assert path.pid is not None

    def cycle(n: int) -> None:
        for i in range(n):
            with RawConn(path) as c:
                if i % 3 == 0:
                    c.send(Op.WATCH, z(b"/churn", b"t%d" % i))
                    c.recv()
                    c.recv()
                if i % 5 == 0:
                    c.send(Op.TRANSACTION_START, b"\0")
                    c.recv()
                assert c.rq(Op.WRITE, b"/churn\0%d" % i) == b"OK\0"

    cycle(300)  # warm up allocator pools
    fds, rss = _fd_count(path.pid), _rss_kib(path.pid)
    cycle(3000)
    deadline = time.monotonic() + 5
    while _fd_count(path.pid) > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count(path.pid) <= fds
    assert _rss_kib(path.pid) < rss + 4096
    with RawConn(path) as c:
        # no watch or transaction of a closed connection survives
        assert c.rq(Op.CONTROL, z(b"quota", b"0")).startswith(b"Domain 0:\n")
        assert c.rq(Op.WRITE, b"/churn\0last") == b"OK\0"
        assert c.recv(timeout=0.1) is None


# --------------------------------------------------------------------------- event merging


def test_unsent_identical_events_merged_distinct_ones_kept(xenstored_embedded: ServerPath) -> None:
    """XSA-326: while an event waits unsent, an identical one is not queued; distinct
    events all are, and once the queue has drained the same event is sent again."""
    watcher = RawConn(xenstored_embedded, timeout=10)
    watcher.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with watcher, RawConn(xenstored_embedded) as writer:
        watcher.send(Op.WATCH, z(b"/bp", b"p"))
        for _ in range(2000):
            assert writer.rq(Op.WRITE, b"/bp/k\0v") == b"OK\0"
        for i in range(100):
            assert writer.rq(Op.WRITE, b"/bp/d%d\0v" % i) == b"OK\0"
        for _ in range(2000):
            assert writer.rq(Op.WRITE, b"/bp/k\0v") == b"OK\0"
        got = [m.payload for m in watcher.sync()[1:]]
        distinct = [p for p in got if p.startswith(b"/bp/d")]
        assert distinct == [b"/bp/d%d\0p\0" % i for i in range(100)]
        assert got.count(b"/bp/k\0p\0") < 1000
        assert writer.rq(Op.WRITE, b"/bp/k\0v") == b"OK\0"
        assert [m.payload for m in watcher.sync()] == [b"/bp/k\0p\0"]


def test_event_counts_as_queued_until_its_last_byte_is_sent() -> None:
    """The merge bookkeeping follows the stream once a send leaves bytes behind: an
    event partly handed to the kernel is still queued, a wholly sent one is not; @
    events are never tracked."""

    def event(payload: bytes) -> bytes:
        return HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload

    a, b = socket.socketpair()
    with a, b:
        client = _Client(1, 0, a)
        ev1, ev2, special = event(z(b"/a", b"t")), event(z(b"/b", b"t")), event(z(b"@x", b"t"))
        reply = HEADER.pack(Op.WRITE, 1, 0, 3) + b"OK\0"
        data = reply + ev1 + special + reply + ev2
        client.events.update((ev1, ev2))
        # The kernel took the reply and all of ev1 but its last byte.
        sent = len(reply) + len(ev1) - 1
        client.block(data, sent)
        client.out += data[sent:]
        client.blocked = True
        assert list(client.marks) == [(1, ev1), (len(data) - sent, ev2)]
        ev3 = event(z(b"/c", b"t"))
        client.events.add(ev3)
        client.queue_blocked(reply + ev3 + special)
        client.out += reply + ev3 + special
        assert client.marks[-1] == (len(client.out) - len(special), ev3)
        client.advance(1)
        assert client.events == {ev2, ev3}
        client.advance(len(special) + len(reply) + len(ev2) - 1)
        assert client.events == {ev2, ev3}
        client.advance(1)
        assert client.events == {ev3}
        client.unblock()
        assert client.events == set() and not client.marks and not client.blocked


# --------------------------------------------------------------------------- trio fast path


@pytest.mark.parametrize(
    ("value", "version", "on"),
    [
        ("0", sorted(trio_fastpath.TESTED_TRIO_VERSIONS)[0], False),
        ("1", "99.0.0", True),
        (None, sorted(trio_fastpath.TESTED_TRIO_VERSIONS)[0], True),
        ("", sorted(trio_fastpath.TESTED_TRIO_VERSIONS)[0], True),
        (None, "99.0.0", False),
    ],
)
def test_fast_path_switch(value: str | None, version: str, on: bool) -> None:
    assert trio_fastpath.decide(value, version) is on


def test_fast_path_switch_rejects_other_values() -> None:
    with pytest.warns(RuntimeWarning, match="neither 0 nor 1"):
        assert trio_fastpath.decide("yes", "99.0.0") is False


async def test_server_waits_as_the_switch_says(tmp_path: Path) -> None:
    """Read once from the environment: a suite run with KVPFS_TRIO_FASTPATH=0 runs
    every server without trio internals, and with 1 with them."""
    switch = os.environ.get(trio_fastpath.ENV)
    assert trio_fastpath.ENABLED is trio_fastpath.decide(switch, trio.__version__)
    sock = str(tmp_path / "xs.sock")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_xenstored(sock, task_status=task_status)
        )
        assert (server._idle is not None) is trio_fastpath.ENABLED
        if switch == "1":
            assert server._idle is not None
        elif switch == "0":
            assert server._idle is None
        assert await trio.to_thread.run_sync(_read_tool, sock) == b""
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- domains


def test_domain_socket_speaks_as_the_guest(xenstored_guests: ServerPath) -> None:
    dom1 = xenstored_guests.domain_sockets[1]
    with RawConn(xenstored_guests) as dom0, RawConn(dom1) as guest:
        assert dom0.rq(Op.IS_DOMAIN_INTRODUCED, z(b"1")) == b"T\0"
        assert guest.rq(Op.WRITE, b"x\0v") == b"E:EACCES"
        assert dom0.rq(Op.MKDIR, z(b"/local/domain/1")) == b"OK\0"
        assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1", b"n1", b"r0")) == b"OK\0"
        assert guest.rq(Op.WRITE, b"x\0v") == b"OK\0"
        assert guest.rq(Op.GET_PERMS, z(b"x")) == b"n1\0r0\0"
        assert dom0.rq(Op.READ, z(b"/local/domain/1/x")) == b"v"
        assert guest.rq(Op.READ, z(b"/tool")) == b"E:EACCES"
        assert guest.rq(Op.INTRODUCE, z(b"9", b"1", b"1")) == b"E:EACCES"
        assert guest.rq(Op.GET_DOMAIN_PATH, z(b"1")) == b"/local/domain/1\0"


def test_domain_zero_cannot_be_a_domain_socket(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        XenstoredServer(str(tmp_path / "s"), {0: str(tmp_path / "d0")})


# --------------------------------------------------------------------------- lifecycle


async def test_in_process_start_shutdown_closes_clients_and_removes_sockets(
    tmp_path: Path,
) -> None:
    sock = str(tmp_path / "xs.sock")
    dom = str(tmp_path / "d5.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server: XenstoredServer = await nursery.start(
                lambda task_status: serve_xenstored(
                    sock, {5: dom}, initial="domains", task_status=task_status
                )
            )
            assert os.path.exists(sock) and os.path.exists(dom)
            client = trio.socket.socket(socket.AF_UNIX)
            await client.connect(sock)
            request = b"/local/domain/1/name\0"
            await client.send(HEADER.pack(Op.READ, 1, 0, len(request)) + request)
            reply = await client.recv(100)
            assert reply[16:] == b"guest1"
            assert server.connection_count == 1
            nursery.cancel_scope.cancel()
        assert await client.recv(100) == b""  # closed by the shutdown
        client.close()
    assert not os.path.exists(sock) and not os.path.exists(dom)


async def test_print_path_and_stale_socket_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "xs.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_xenstored(sock, print_path=True, task_status=task_status)
        )
        nursery.cancel_scope.cancel()
    assert capsys.readouterr().out == f"XENSTORED_PATH={sock}\n"
    assert not os.path.exists(sock)


async def test_second_server_on_a_live_socket_fails_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    sock = str(tmp_path / "xs.sock")
    dom = str(tmp_path / "d3.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_xenstored(sock, task_status=task_status))
            inode = os.stat(sock).st_ino
            with pytest.raises(OSError) as caught:
                await serve_xenstored(sock)
            assert caught.value.errno == errno.EADDRINUSE
            assert os.strerror(caught.value.errno) == "Address already in use"
            # Nor when the busy path is not the first one it binds: what it bound
            # before is removed, the first server's socket is not.
            with pytest.raises(OSError) as caught:
                await serve_xenstored(dom, {3: sock})
            assert caught.value.errno == errno.EADDRINUSE
            assert not os.path.exists(dom)
            assert os.stat(sock).st_ino == inode
            assert await trio.to_thread.run_sync(_read_tool, sock) == b""
            nursery.cancel_scope.cancel()
    assert not os.path.exists(sock)


def _read_tool(path: str) -> bytes:
    with RawConn(path) as c:
        return c.rq(Op.READ, z(b"/tool"))


async def test_stale_socket_replaced_other_files_kept(tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_xenstored(sock, task_status=task_status))
            assert await trio.to_thread.run_sync(_read_tool, sock) == b""
            nursery.cancel_scope.cancel()
    assert not os.path.exists(sock)
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(OSError) as caught:
        await serve_xenstored(str(plain))
    assert caught.value.errno == errno.EADDRINUSE
    assert plain.read_text() == "not a socket"


async def test_exit_removes_only_the_socket_it_created(tmp_path: Path) -> None:
    """A socket file put in place of ours (after ours was removed) stays."""
    sock = str(tmp_path / "xs.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_xenstored(sock, task_status=task_status))
            os.unlink(sock)
            other = socket.socket(socket.AF_UNIX)
            other.bind(sock)
            nursery.cancel_scope.cancel()
    assert os.path.exists(sock)
    other.close()


async def test_bind_failure_raises_and_leaves_nothing(tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    bad = str(tmp_path / "missing-dir" / "d.sock")
    with pytest.raises(FileNotFoundError):
        await serve_xenstored(sock, {3: bad})
    assert not os.path.exists(sock)


async def test_cancelled_while_clients_are_mid_request(tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_xenstored(sock, task_status=task_status))
            clients = []
            for _ in range(20):
                c = trio.socket.socket(socket.AF_UNIX)
                await c.connect(sock)
                await c.send(header(Op.WRITE, 20))  # header only: server waits for more
                clients.append(c)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    for c in clients:
        assert await c.recv(10) == b""
        c.close()


def test_server_process_stops_on_sigterm(xenstored_embedded_process: ServerPath) -> None:
    with RawConn(xenstored_embedded_process) as c:
        assert c.rq(Op.READ, z(b"/tool")) == b""
    assert xenstored_embedded_process.pid is not None
    os.kill(xenstored_embedded_process.pid, 15)
    deadline = time.monotonic() + 10
    while os.path.exists(xenstored_embedded_process) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(xenstored_embedded_process)
    with pytest.raises((ConnectionClosed, OSError)):
        RawConn(xenstored_embedded_process, timeout=0.2).rq(Op.READ, z(b"/tool"))
