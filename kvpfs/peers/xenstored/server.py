"""An embedded xenstored: the :class:`~kvpfs.peers.xenstored.store.Store` behind unix sockets.

:func:`serve_xenstored` runs until cancelled.  It listens on

* the privileged socket (``XENSTORED_PATH``): every client there is a local socket
  connection of dom0, exactly like cxenstored's ``<rundir>/socket``;
* optional domain sockets (``{domid: path}``): every client there speaks as that
  unprivileged domain (home ``/local/domain/<domid>``, permission checks, quotas),
  standing in for the shared-memory ring a real guest would use.

Wire behaviour follows cxenstored 4.17: requests on one connection are answered in
order; watch events may come between; a header announcing more than 4096 payload
bytes drops the connection.

Memory bounds, per connection:

* replies: after a batch of requests the connection's task writes the replies itself
  before it reads more, so a client that sends without reading stalls only itself
  (the kernel socket buffers fill, then it stops being read);
* watch events: as in cxenstored 4.17 (XSA-326), an event is not queued for a
  connection while a byte-identical one (same ``path\0token\0``) is still waiting
  there unsent; events on ``@`` paths are exempt.  A client that does not read thus
  gets one event per distinct change, not one per write, once it reads again;
* watch events caused by other connections are queued for the connection's writer.
  If the unsent bytes of a connection exceed ``max_pending_bytes`` (default
  2.5 MiB, cxenstored's hard per-domain memory quota, past which cxenstored stops
  talking to a domain) the connection is dropped: silently losing events would leave
  a client's cache wrong without telling it, a dropped connection is noticed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket as _stdsocket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from kvpfs.peers.xenstored.store import Quotas, Store
from kvpfs.peers.xenstored.trio_fastpath import IdleLoop
from kvpfs.xenstore.protocol import HEADER, XENSTORE_PAYLOAD_MAX, Op

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "XenstoredServer",
    "serve_xenstored",
]

#: cxenstored 4.17's hard memory quota per domain (``-Q memory=``).
DEFAULT_MAX_PENDING_BYTES = 2621440

_RECV_SIZE = 65536
#: Longest busy-poll for a client's next request (see :class:`_Spin`).
_SPIN_SECONDS = 50e-6
#: Waits between two reviews of the spinning policy.
_SPIN_WINDOW = 32
_POLLIN = select.POLLIN
# What _serve_input found.
_ENDED = 0
_EMPTY = 1
_DONE = 2
_MORE = 3
_now = time.perf_counter
_HEADER_SIZE = HEADER.size
#: First byte of a watch event frame (its type; every reply type is below 256).
_EVENT = int(Op.WATCH_EVENT)
#: First payload byte of a special event (``@introduceDomain``...), never merged.
_AT = ord("@")
_unpack_header = HEADER.unpack_from


@dataclass
class ServerStats:
    """Counters for tests and diagnostics."""

    accepted: int = 0
    closed: int = 0
    dropped_oversized: int = 0
    dropped_backlog: int = 0


class _Spin:
    """Whether to busy-poll for a client's next request before sleeping in poll(2).

    A request/reply client sends its next request some 20 us after our reply.
    Sleeping costs the kernel's sleep and wake-up (about 5 us of CPU here) and the
    wake-up latency on top; polling without sleeping for up to 50 us catches the
    request at once.  That only pays while a CPU is free for the client: when the
    client (or anything else) must share ours, spinning keeps it from running and
    the server ends up preempted, several times slower than sleeping.  So the
    policy looks back every 32 waits: spinning stays on only if it did not get the
    server preempted (involuntary context switches, from getrusage), rarely missed
    (a miss is a spin that saw no request: the client is not sending back to back),
    and the process has no other thread (polling would contend for the GIL with
    it).  After a bad look back spinning stays off for twice as many windows as
    the last time, up to 1024 windows, then it is tried again.
    """

    __slots__ = ("_backoff", "_csw", "_off", "_waits", "misses", "seconds")

    def __init__(self) -> None:
        #: Spin budget per wait, 0 while off.
        self.seconds = 0.0
        self.misses = 0
        self._waits = 0
        self._off = 0
        self._backoff = 1
        self._csw = 0

    def review(self) -> None:
        """Called once per wait; acts every ``_SPIN_WINDOW`` waits."""
        self._waits += 1
        if self._waits < _SPIN_WINDOW:
            return
        self._waits = 0
        if self.seconds:
            preempted = _involuntary_switches() - self._csw
            if preempted > 1 or self.misses > _SPIN_WINDOW // 4 or threading.active_count() > 1:
                self.seconds = 0.0
                self._off = self._backoff
                self._backoff = min(self._backoff * 2, 1024)
            else:
                self._backoff = 1
                self._csw += preempted
        elif self._off > 1:
            self._off -= 1
        elif threading.active_count() == 1:
            self.seconds = _SPIN_SECONDS
            self._csw = _involuntary_switches()
        self.misses = 0


def _involuntary_switches() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


class _Client:
    __slots__ = (
        "blocked",
        "buf",
        "cancel",
        "closing",
        "conn_id",
        "domid",
        "drained",
        "events",
        "marks",
        "out",
        "sent",
        "sock",
        "wake",
    )

    def __init__(self, conn_id: int, domid: int, sock: _stdsocket.socket) -> None:
        self.conn_id = conn_id
        self.domid = domid
        self.sock = sock
        #: Bytes accepted for this client and not yet taken by the kernel.
        self.out = bytearray()
        #: Watch events accepted and not yet wholly handed to the kernel (XSA-326:
        #: an identical one is not queued again); ``@`` events are not kept here.
        #: Until a send leaves bytes behind, every batch's bytes go at once and this
        #: is just emptied; while ``blocked``, ``marks`` says when each one leaves.
        self.events: set[bytes] = set()
        #: While ``blocked``: ``(end, frame)`` of each event in ``events``, in
        #: order; it has left once ``sent`` reaches ``end``.
        self.marks: deque[tuple[int, bytes]] = deque()
        #: While ``blocked``: bytes sent since the block began (``out[0]`` is
        #: byte ``sent`` of what was left then).
        self.sent = 0
        #: The start of a request whose rest has not arrived yet.
        self.buf = b""
        #: The socket would block: the writer task owns sending until ``out`` drains.
        self.blocked = False
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.cancel = trio.CancelScope()
        #: ``cancel`` was called (cheaper to test than ``cancel.cancel_called``).
        self.closing = False

    def close(self) -> None:
        """End the connection at its tasks' next checkpoint."""
        self.closing = True
        self.cancel.cancel()

    def discard_output(self) -> None:
        """Forget everything unsent (the connection is being dropped)."""
        self.out.clear()
        self.events.clear()
        self.marks.clear()

    def block(self, buf: bytes | bytearray, sent: int) -> None:
        """The kernel took only ``sent`` bytes of ``buf`` (whole frames, holding
        every unsent event): note where the events left behind end."""
        self.sent = 0
        events = self.events
        if events:
            events.clear()
            marks = self.marks
            for end, frame in _mergeable_events(buf, sent):
                marks.append((end, frame))
                events.add(frame)

    def queue_blocked(self, data: bytes) -> None:
        """``data`` (whole frames) goes behind ``out`` while blocked: note where its
        events end."""
        base = self.sent + len(self.out)
        marks = self.marks
        for end, frame in _mergeable_events(data, 0):
            marks.append((base + end, frame))

    def advance(self, sent: int) -> None:
        """While blocked: ``sent`` more bytes left ``out``."""
        self.sent += sent
        done = self.sent
        marks = self.marks
        events = self.events
        while marks and marks[0][0] <= done:
            events.discard(marks.popleft()[1])

    def unblock(self) -> None:
        """``out`` has drained."""
        self.marks.clear()
        self.events.clear()
        self.blocked = False


def _mergeable_events(buf: bytes | bytearray, skip: int) -> list[tuple[int, bytes]]:
    """``(end - skip, frame)`` of each non-``@`` event of ``buf`` (whole frames) that
    ends past byte ``skip``."""
    found = []
    pos = 0
    size = len(buf)
    while pos < size:
        end = pos + _HEADER_SIZE + _unpack_header(buf, pos)[3]
        if (
            end > skip
            and buf[pos] == _EVENT
            and end > pos + _HEADER_SIZE
            and buf[pos + _HEADER_SIZE] != _AT
        ):
            found.append((end - skip, bytes(buf[pos:end])))
        pos = end
    return found


class XenstoredServer:
    """The listeners and connections around one :class:`Store`.

    Use :func:`serve_xenstored` (or ``await nursery.start(server.serve)``); the
    object handed to ``task_status.started()`` is this server, whose ``store`` may
    be inspected between requests.

    Sockets are plain non-blocking sockets driven with ``trio.lowlevel``
    ``wait_readable``/``wait_writable``, not trio's socket wrappers (several
    scheduler passes per request).  With the trio fast path
    (:mod:`~kvpfs.peers.xenstored.trio_fastpath`, ``KVPFS_TRIO_FASTPATH``), while
    nothing else in the run has work, a connection waits for its next request in
    poll(2) instead (:class:`IdleLoop`), busy-polling briefly when that pays
    (:class:`_Spin`): a request then costs poll, recv and send, and no scheduler
    pass at all, which is what lets a Python server keep up with cxenstored.
    Without it every wait goes through trio's public API.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        domain_sockets: Mapping[int, str | os.PathLike[str]] | None = None,
        *,
        store: Store | None = None,
        initial: str = "xenstored",
        quotas: Quotas | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.domain_sockets = {int(d): os.fspath(p) for d, p in (domain_sockets or {}).items()}
        for domid in self.domain_sockets:
            if domid == 0:
                raise ValueError("domain 0 is the privileged socket, not a domain socket")
        self.store = store if store is not None else Store(initial=initial, quotas=quotas)
        self.max_pending_bytes = max_pending_bytes
        self.stats = ServerStats()
        self._clients: dict[int, _Client] = {}
        self._dirty: dict[int, _Client] = {}
        #: (path, st_dev, st_ino) of each socket file this server created.
        self._bound: list[tuple[str, int, int]] = []
        self._idle: IdleLoop | None = None
        #: With _idle: every connection's socket (level-triggered), to find those
        #: with requests waiting (see _serve_others), and trio's epoll fd alone.
        self._connections: select.epoll | None = None
        self._by_fd: dict[int, _Client] = {}
        self._idle_poll: select.poll | None = None
        self._spin = _Spin()
        #: One receive buffer for every connection (a reader parses what it read
        #: before it waits again): receiving into a fresh 64 KiB bytes object each
        #: time cost a malloc, a shrinking realloc and a free big enough to make
        #: glibc consolidate its heap, per request.
        self._rview = memoryview(bytearray(_RECV_SIZE))

    @property
    def connection_count(self) -> int:
        return len(self._clients)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every socket, report started, serve until cancelled.

        On the way out every client connection is closed and the socket files this
        server created are removed (not a file that has replaced one since).  A bind
        error is raised before anything runs: ``EADDRINUSE`` when a server answers
        on a path already.
        """
        listeners: list[tuple[_stdsocket.socket, int]] = []
        self._idle = IdleLoop.install()
        if self._idle is not None:
            self._connections = select.epoll()
            self._idle_poll = select.poll()
            self._idle_poll.register(self._idle.epoll_fd, _POLLIN)
        try:
            listeners.append((self._bind(self.socket_path), 0))
            for domid, path in self.domain_sockets.items():
                listeners.append((self._bind(path), domid))
                self.store.introduce(domid)
            async with trio.open_nursery() as nursery:
                for sock, domid in listeners:
                    nursery.start_soon(self._accept_loop, nursery, sock, domid)
                task_status.started(self)
        finally:
            if self._idle is not None:
                self._idle.uninstall()
                self._idle = None
            if self._connections is not None:
                self._connections.close()
                self._connections = None
                self._idle_poll = None
            for sock, _ in listeners:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            for path, dev, ino in self._bound:
                _unlink_if_same(path, dev, ino)
            self._bound.clear()

    def _bind(self, path: str) -> _stdsocket.socket:
        """A listening socket on ``path``.  A socket file nobody answers on (left by
        a run that ended) is replaced; one a server answers on is not taken over
        (``EADDRINUSE``), nor is any other kind of file."""
        sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            try:
                sock.bind(path)  # a local path: never blocks
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not _stale_socket(path):
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                sock.bind(path)
            st = os.lstat(path)
            self._bound.append((path, st.st_dev, st.st_ino))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept_loop(
        self, nursery: trio.Nursery, sock: _stdsocket.socket, domid: int
    ) -> None:
        while True:
            try:
                client_sock, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: wait for connections to go away.
                    await trio.sleep(0.05)
                    continue
                raise
            client_sock.setblocking(False)
            self.stats.accepted += 1
            nursery.start_soon(self._run_client, client_sock, domid)
            await trio.lowlevel.checkpoint()

    async def _run_client(self, sock: _stdsocket.socket, domid: int) -> None:
        conn_id = self.store.connect(domid)
        client = _Client(conn_id, domid, sock)
        self._clients[conn_id] = client
        fd = sock.fileno()
        if self._connections is not None:
            self._connections.register(fd, select.EPOLLIN)
            self._by_fd[fd] = client
        try:
            with client.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, client)
                    await self._reader(client)
                    nursery.cancel_scope.cancel()
        finally:
            del self._clients[conn_id]
            self._dirty.pop(conn_id, None)
            if self._connections is not None:
                self._connections.unregister(fd)
                del self._by_fd[fd]
            self.store.disconnect(conn_id)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self.stats.closed += 1

    async def _reader(self, client: _Client) -> None:
        sock = client.sock
        fd = sock.fileno()
        # Batches read without asking whether anyone else is waiting (see below).
        unchecked = 0
        idle = self._idle
        if idle is not None:
            poller = select.poll()
            poller.register(fd, _POLLIN)
            poller.register(idle.epoll_fd, _POLLIN)
            budget = idle.budget_ms
            poll = poller.poll
            ours = [(fd, _POLLIN)]
            spin = self._spin
        more = False
        while True:
            if client.blocked:
                # Our own replies are not being read: stop reading requests until
                # they drain (the client stalls only itself).
                await client.drained.wait()
            if client.closing:
                await trio.lowlevel.checkpoint()
            if more:
                unchecked += 1
                if unchecked == 16:
                    # A client that always has input never waits: let others run.
                    unchecked = 0
                    await trio.lowlevel.checkpoint()
            else:
                # Input is awaited without trio when it is safe (see IdleLoop);
                # ready for us alone: read it in this same turn of the loop.  Either
                # way nobody else was kept waiting.
                unchecked = 0
                ready = False
                ms = budget() if idle is not None else 0
                while ms:
                    if spin.seconds:
                        until = _now() + spin.seconds
                        got = poll(0)
                        while not got and _now() < until:
                            got = poll(0)
                        if not got:
                            spin.misses += 1
                            got = poll(ms)
                    else:
                        got = poll(ms)
                    spin.review()
                    if got == ours:
                        ready = True
                        break
                    if not got:
                        break
                    if any(f != fd for f, _ in got) and not self._serve_others(client):
                        break
                    if any(f == fd for f, _ in got):
                        ready = True
                        break
                    ms = budget()
                if not ready:
                    await trio.lowlevel.wait_readable(sock)
                if client.blocked:
                    continue
            state = self._serve_input(client)
            if state == _ENDED:
                return
            more = state == _MORE

    def _serve_others(self, me: _Client) -> bool:
        """Answer the requests waiting on other connections, from ``me``'s reader.

        Called when a reader's poll(2) wait sees I/O for other tasks: if that is
        only other connections' requests, answering them here costs a read and a
        send each instead of a scheduler pass (their readers stay parked in trio;
        their sockets are drained).  True if nothing else is pending in the run.
        """
        by_fd = self._by_fd
        assert self._connections is not None and self._idle_poll is not None
        for fd, _ in self._connections.poll(0):
            other = by_fd.get(fd)
            if other is None or other is me or other.blocked or other.closing:
                continue
            if self._serve_input(other) == _ENDED:
                other.close()
        return not self._idle_poll.poll(0)

    def _serve_input(self, client: _Client) -> int:
        """Read what ``client`` sent and answer every complete request in it.

        Returns ``_ENDED`` when the connection is over (end of stream, an error, an
        oversized header), ``_EMPTY`` when nothing was there, ``_MORE`` when the
        read filled the buffer (more may be waiting), else ``_DONE``.
        """
        rview = self._rview
        try:
            end = client.sock.recv_into(rview)
        except BlockingIOError:
            return _EMPTY
        except OSError:
            return _ENDED
        if not end:
            return _ENDED
        state = _MORE if end == _RECV_SIZE else _DONE
        if client.buf:
            # Behind the start of a frame left over from the last read.
            view = memoryview(client.buf + rview[:end])
            end = len(view)
        else:
            view = rview
        store_handle = self.store.handle_frame
        clients = self._clients
        dirty = self._dirty
        conn_id = client.conn_id
        max_pending = self.max_pending_bytes
        pos = 0
        own: list[bytes] = []
        while end - pos >= _HEADER_SIZE:
            mtype, req_id, tx_id, length = _unpack_header(view, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                # cxenstored drops a connection announcing an oversized payload.
                self.stats.dropped_oversized += 1
                self._send_batch(client, own)
                return _ENDED
            stop = pos + _HEADER_SIZE + length
            if stop > end:
                break
            payload = view[pos + _HEADER_SIZE : stop].tobytes()
            pos = stop
            for target, frame in store_handle(conn_id, mtype, req_id, tx_id, payload):
                if target == conn_id:
                    if frame[0] == _EVENT:
                        # XSA-326: not queued again while an identical one waits.
                        events = client.events
                        if frame in events:
                            continue
                        if frame[_HEADER_SIZE] != _AT:
                            events.add(frame)
                    if not own and dirty:
                        # Sent after the connections queued before it.
                        dirty[conn_id] = client
                    own.append(frame)
                    continue
                other = clients.get(target)
                if other is None:
                    continue
                # Only events go to other connections.
                events = other.events
                if frame in events:
                    continue
                out = other.out
                out += frame
                if frame[_HEADER_SIZE] != _AT:
                    events.add(frame)
                    if other.blocked:
                        other.marks.append((other.sent + len(out), frame))
                if len(out) > max_pending:
                    self._drop_backlogged(other)
                else:
                    dirty[target] = other
        # The receive buffer is shared by all connections: keep the leftover.
        client.buf = view[pos:end].tobytes() if pos < end else b""
        self._send_batch(client, own)
        return state

    def _send_batch(self, client: _Client, own: list[bytes]) -> None:
        """Send what a batch of ``client``'s requests produced (``own``: the frames
        for ``client``), in the order the connections got their first bytes, so
        that the events a request causes elsewhere go before its reply."""
        if own and client.conn_id not in self._dirty:
            # Its first frame came before any other connection's.
            self._send_frames(client, own)
        if self._dirty:
            self._flush_dirty(client, own)

    def _drop_backlogged(self, client: _Client) -> None:
        self.stats.dropped_backlog += 1
        client.discard_output()
        self._dirty.pop(client.conn_id, None)
        client.close()

    def _flush_dirty(self, me: _Client | None = None, own: list[bytes] | None = None) -> None:
        """Hand every queued byte to the kernel without blocking, a connection at a
        time in the order they were queued; a socket that is full is passed to its
        writer task.  ``own`` holds the frames for ``me``, whose batch this is:
        joined, they are sent as they are unless bytes are queued before them."""
        dirty = self._dirty
        for client in list(dirty.values()):
            if client is me and own:
                self._send_frames(client, own)
            elif not client.blocked:
                self._send(client, client.out)
        dirty.clear()

    def _send_frames(self, client: _Client, frames: list[bytes]) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if client.out or client.blocked:
            # Behind bytes already queued: keep the order.
            if client.blocked and client.events:
                client.queue_blocked(data)
            client.out += data
            if not client.blocked:
                self._send(client, client.out)
        else:
            self._send(client, data)

    def _send(self, client: _Client, data: bytes | bytearray) -> None:
        """Send ``data`` (``client.out`` itself, or bytes with nothing queued before
        them); what the kernel does not take is left to the writer task."""
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            client.discard_output()
            client.close()
            return
        out = client.out
        if data is out:
            if sent == len(out):
                out.clear()
                if client.events:
                    client.events.clear()  # all sent
                return
            client.block(out, sent)
            del out[:sent]
        elif sent == len(data):
            if client.events:
                client.events.clear()  # all sent: nothing was queued before data
            return
        else:
            client.block(data, sent)
            out += memoryview(data)[sent:]
        client.blocked = True
        client.drained = trio.Event()
        client.wake.set()

    async def _writer(self, client: _Client) -> None:
        sock = client.sock
        while True:
            await client.wake.wait()
            client.wake = trio.Event()
            out = client.out
            while out:
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except OSError:
                    client.close()
                    return
                del out[:sent]
                client.advance(sent)
            client.unblock()
            client.drained.set()


def _stale_socket(path: str) -> bool:
    """Whether ``path`` is a socket file that no server answers on (or is gone)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return True
    probe = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog must not block us: it means in use
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # busy (EAGAIN), another socket type, no access: not ours
    finally:
        probe.close()
    return False


def _unlink_if_same(path: str, dev: int, ino: int) -> None:
    """Remove ``path`` if it still is the file (device, inode) this server created."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (dev, ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def serve_xenstored(
    socket_path: str | os.PathLike[str],
    domain_sockets: Mapping[int, str | os.PathLike[str]] | None = None,
    *,
    initial: str = "xenstored",
    store: Store | None = None,
    quotas: Quotas | None = None,
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    print_path: bool = False,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an embedded xenstored until cancelled.

    ``socket_path`` is the privileged socket; ``domain_sockets`` maps a guest domain
    id to the socket whose clients speak as that domain.  ``initial`` picks the
    starting tree (``"xenstored"``: as cxenstored starts; ``"domains"``: plus dom0's
    home and guest domain 1 as domain creation leaves them).  With ``print_path``
    the line ``XENSTORED_PATH=<socket_path>`` goes to stdout once the sockets accept
    connections (for a shell to ``eval`` or a parent process to wait for).
    ``task_status.started()`` receives the :class:`XenstoredServer`.
    """
    server = XenstoredServer(
        socket_path,
        domain_sockets,
        store=store,
        initial=initial,
        quotas=quotas,
        max_pending_bytes=max_pending_bytes,
    )
    # No nursery of our own: a bind error reaches the caller as the plain OSError.
    await server.serve(task_status=_Started(task_status, print_path))


class _Started:
    """Forwards ``started()`` after printing the socket paths if asked to."""

    def __init__(self, task_status: Any, print_path: bool) -> None:
        self._task_status = task_status
        self._print = print_path

    def started(self, server: XenstoredServer) -> None:
        if self._print:
            print(f"XENSTORED_PATH={server.socket_path}", flush=True)
            for domid, path in server.domain_sockets.items():
                print(f"XENSTORED_DOMAIN_PATH_{domid}={path}", flush=True)
        self._task_status.started(server)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvpfs.peers.xenstored.server SOCKET [DOMID:PATH ...]``: for tests and
    scripts that want an embedded xenstored in a separate process."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(
            "usage: python -m kvpfs.peers.xenstored.server"
            " SOCKET [--initial NAME] [DOMID:PATH ...]",
            file=sys.stderr,
        )
        return 2
    initial = "xenstored"
    if "--initial" in args:
        i = args.index("--initial")
        initial = args[i + 1]
        del args[i : i + 2]
    socket_path, rest = args[0], args[1:]
    domains: dict[int, str] = {}
    for item in rest:
        domid, _, path = item.partition(":")
        domains[int(domid)] = path
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main_async, socket_path, domains, initial)
    return 0


async def _main_async(socket_path: str, domains: dict[int, str], initial: str) -> None:
    with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_xenstored(
                    socket_path, domains, initial=initial, print_path=True, task_status=task_status
                )
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
