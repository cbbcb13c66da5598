"""A trio XenStore client: one connection, many concurrent requests, watches,
transactions, and automatic reconnection.

Usage::

    async with XenStoreClient() as xs:            # or XenStoreClient(nursery=n)
        await xs.write("/local/domain/0/name", b"dom0")
        async with xs.watch("/local/domain") as events:
            async for ev in events:
                if isinstance(ev, WatchGap):       # Reconnected / Overflow
                    ...rescan...
                else:
                    ...ev.path changed...
        await xs.run_in_transaction(fn)

Design notes (why, not what):

* Requests are matched to replies by ``req_id`` (cxenstored echoes any value), so any
  number of tasks can share one connection.  ``WATCH_EVENT`` frames may arrive between
  a request and its reply and are routed by type.
* A single writer task owns the stream's send side.  A caller that is cancelled while
  its frame is being written would otherwise leave half a frame on the wire and
  desynchronise the connection; with the writer, cancellation only ever drops a whole
  frame that was not queued yet, or abandons a reply that will be discarded.
* A reply that arrives after its caller gave up (cancelled, timed out) is discarded,
  except that a late ``TRANSACTION_START`` is aborted and a late successful ``WATCH``
  is unwatched, so the server keeps no state nobody owns.
* Connection loss fails every pending request at once with ``ECONNRESET``; requests
  made while disconnected fail immediately with ``ENOTCONN`` (``wait_connected()``
  exists for callers that prefer to wait).  Meanwhile a background task reconnects with
  exponential backoff, re-registers every active watch and then puts a
  :class:`Reconnected` marker into each watch's stream (the server's initial event
  for the re-registered watch may come just before or just after the marker).
  Transactions of the lost connection fail with ``ECONNRESET``; they are never
  silently moved.
* Each watch has a bounded buffer (``watch_capacity`` events).  The reader never waits
  for a slow consumer (that would stall every request on the connection): when a
  watch's buffer is full further events for it are dropped and a single
  :class:`Overflow` marker (with the count dropped) is queued after the buffered events.
  A consumer that sees any :class:`WatchGap` must treat its view of the watched
  subtree as stale and re-read it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from kvpfs.xenstore import locate
from kvpfs.xenstore.protocol import (
    Decoder,
    Message,
    Op,
    Perm,
    ProtocolError,
    XenStoreError,
    build_control,
    build_directory_part,
    build_domid,
    build_introduce,
    build_path,
    build_set_perms,
    build_set_target,
    build_transaction_end,
    build_transaction_start,
    build_watch,
    build_write,
    encode_message,
    is_child,
    parse_bool,
    parse_directory_part_reply,
    parse_domain_path,
    parse_error,
    parse_perm,
    parse_strings,
    parse_transaction_id,
    parse_watch,
    parse_watch_event,
)

__all__ = [
    "Overflow",
    "Reconnected",
    "Transaction",
    "TransactionConflict",
    "Watch",
    "WatchEvent",
    "WatchGap",
    "XenStoreClient",
    "XenStoreError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Connector = Callable[[], Awaitable[trio.abc.Stream]]

#: How many abandoned request ids a connection remembers (to discard late replies).
_MAX_ORPHANS = 4096
#: A connection that lasted this long (seconds) was fine: reconnect without delay.
_STABLE_CONNECTION = 1.0
#: DIRECTORY_PART restarts (the directory kept changing) before giving up with EAGAIN.
_MAX_DIRECTORY_RESTARTS = 64


class TransactionConflict(XenStoreError):
    """The commit failed with ``EAGAIN``: something the transaction read changed.

    None of the transaction's writes were applied; run it again.
    """

    def __init__(self, message: str = "transaction conflict, retry") -> None:
        super().__init__(errno.EAGAIN, message, name="EAGAIN")


def _error(err: int, message: str | None = None) -> XenStoreError:
    return XenStoreError(err, message)


def _copy(err: XenStoreError) -> XenStoreError:
    """A fresh exception per caller: one instance raised in several tasks would
    collect all their tracebacks."""
    return XenStoreError(err.errno or errno.EIO, err.strerror, name=err.name)


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _s(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- watches


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """``path`` changed (or, for the first event after registering, the watch is set).

    ``path`` is relative when the watch path was.
    """

    path: str
    token: str


class WatchGap:
    """Events may have been missed: re-read everything the watch covers."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reconnected(WatchGap):
    """The connection was lost and re-established; the watch is registered again."""


@dataclass(frozen=True, slots=True)
class Overflow(WatchGap):
    """The consumer fell behind; ``dropped`` events were discarded before this point."""

    dropped: int


WatchItem = WatchEvent | Reconnected | Overflow


@dataclass(slots=True)
class _OverflowSlot:
    dropped: int = 0


class Watch:
    """An active watch: an async iterator of :data:`WatchItem`.

    Iteration ends with an exception if the watch dies underneath the consumer:
    ``ECONNRESET`` when the connection is lost for good (``reconnect=False``),
    ``ESHUTDOWN`` when the client closes, ``ECANCELED`` after ``reset_watches()``, or the
    server's error if re-registration after a reconnect fails.
    """

    def __init__(self, path: bytes, token: bytes, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("watch capacity must be at least 1")
        self.raw_path = path
        self.raw_token = token
        self.path = _s(path)
        self.token = _s(token)
        self._capacity = capacity
        self._queue: deque[WatchEvent | Reconnected | _OverflowSlot] = deque()
        self._events = 0  # WatchEvents in the queue; markers do not count
        self._lot = trio.lowlevel.ParkingLot()
        self._error: XenStoreError | None = None
        self._done = False

    def __repr__(self) -> str:
        return f"<Watch {self.path!r} token={self.token!r}>"

    def _put(self, item: WatchEvent | Reconnected) -> None:
        if self._done:
            return
        if isinstance(item, WatchEvent) and self._events >= self._capacity:
            last = self._queue[-1] if self._queue else None
            if isinstance(last, _OverflowSlot):
                last.dropped += 1
            else:
                self._queue.append(_OverflowSlot(1))
        else:
            self._queue.append(item)
            if isinstance(item, WatchEvent):
                self._events += 1
        self._lot.unpark_all()

    def _close(self, error: XenStoreError | None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._lot.unpark_all()

    def pending(self) -> int:
        """Items waiting to be consumed (events and markers)."""
        return len(self._queue)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchItem:
        while True:
            if self._queue:
                item = self._queue.popleft()
                if isinstance(item, _OverflowSlot):
                    return Overflow(item.dropped)
                if isinstance(item, WatchEvent):
                    self._events -= 1
                return item
            if self._done:
                if self._error is not None:
                    raise _copy(self._error)
                raise StopAsyncIteration
            await self._lot.park()


# --------------------------------------------------------------------------- operations


class _Ops:
    """The node and domain operations, shared by the client and transactions."""

    async def request(self, op: Op | int, payload: bytes) -> bytes:
        raise NotImplementedError

    async def read(self, path: str | bytes) -> bytes:
        return await self.request(Op.READ, _build(build_path, path))

    async def exists(self, path: str | bytes) -> bool:
        try:
            await self.read(path)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    async def write(self, path: str | bytes, value: bytes | str) -> None:
        await self.request(Op.WRITE, _build(build_write, path, _b(value)))

    async def mkdir(self, path: str | bytes) -> None:
        await self.request(Op.MKDIR, _build(build_path, path))

    async def rm(self, path: str | bytes) -> None:
        await self.request(Op.RM, _build(build_path, path))

    async def directory(self, path: str | bytes) -> list[str]:
        """Child names, in the server's order.

        When the list does not fit one reply (``E2BIG``) it is fetched with
        ``DIRECTORY_PART``, restarting whenever the node's generation changes between
        chunks, as libxenstore does.
        """
        try:
            payload = await self.request(Op.DIRECTORY, _build(build_path, path))
        except XenStoreError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return await self._directory_part(path, exc)
        return [_s(c) for c in _parse(parse_strings, payload)]

    async def _directory_part(self, path: str | bytes, too_big: XenStoreError) -> list[str]:
        for _ in range(_MAX_DIRECTORY_RESTARTS):
            children: list[bytes] = []
            generation: int | None = None
            offset = 0
            while True:
                try:
                    payload = await self.request(
                        Op.DIRECTORY_PART, _build(build_directory_part, path, offset)
                    )
                except XenStoreError as exc:
                    if exc.errno == errno.ENOSYS:  # server without DIRECTORY_PART
                        raise too_big from None
                    raise
                part = _parse(parse_directory_part_reply, payload)
                if generation is None:
                    generation = part.generation
                elif part.generation != generation:
                    break  # changed between chunks: start over
                children += part.children
                offset += part.size
                if part.final:
                    return [_s(c) for c in children]
                if part.size == 0:
                    raise _error(errno.EIO, "DIRECTORY_PART made no progress")
        raise _error(errno.EAGAIN, "directory kept changing while being listed")

    async def get_perms(self, path: str | bytes) -> list[Perm]:
        payload = await self.request(Op.GET_PERMS, _build(build_path, path))
        return [_parse(parse_perm, p) for p in _parse(parse_strings, payload)]

    async def set_perms(self, path: str | bytes, perms: Iterable[Perm | str | bytes]) -> None:
        await self.request(Op.SET_PERMS, _build(build_set_perms, path, perms))

    async def get_domain_path(self, domid: int) -> str:
        payload = await self.request(Op.GET_DOMAIN_PATH, _build(build_domid, domid))
        return _s(_parse(parse_domain_path, payload))

    async def is_domain_introduced(self, domid: int) -> bool:
        payload = await self.request(Op.IS_DOMAIN_INTRODUCED, _build(build_domid, domid))
        return _parse(parse_bool, payload)

    async def introduce(self, domid: int, gfn: int, evtchn: int) -> None:
        await self.request(Op.INTRODUCE, _build(build_introduce, domid, gfn, evtchn))

    async def release(self, domid: int) -> None:
        await self.request(Op.RELEASE, _build(build_domid, domid))

    async def resume(self, domid: int) -> None:
        await self.request(Op.RESUME, _build(build_domid, domid))

    async def set_target(self, domid: int, target: int) -> None:
        await self.request(Op.SET_TARGET, _build(build_set_target, domid, target))

    async def control(self, command: str | bytes, *args: str | bytes | int) -> bytes:
        """``CONTROL``; the reply as sent (usually ``OK\\0`` or text ending in NUL)."""
        return await self.request(Op.CONTROL, _build(build_control, command, *args))


def _build(fn: Callable[..., bytes], *args: Any) -> bytes:
    """A request payload; bad arguments (a NUL inside a path, no permissions) are
    EINVAL before anything is sent."""
    try:
        return fn(*args)
    except ProtocolError as exc:
        raise _error(exc.errno, str(exc)) from None


def _parse(fn: Callable[[Any], T], payload: Any) -> T:
    try:
        return fn(payload)
    except ProtocolError as exc:
        raise _error(errno.EIO, f"malformed reply from xenstored: {exc}") from None


# --------------------------------------------------------------------------- connection


class _Pending:
    """One request awaiting its reply.

    The caller sleeps in ``wait_task_rescheduled`` and is woken directly (no Event,
    no cancel scope per request): by its reply, by the connection failing, or by the
    connection's timer when ``deadline`` passes.
    """

    __slots__ = (
        "deadline",
        "done",
        "error",
        "expired",
        "op",
        "payload",
        "reply",
        "sent",
        "task",
        "tx_id",
    )

    def __init__(self, op: int, payload: bytes, tx_id: int, sent: bool = False) -> None:
        self.op = op
        self.payload = payload
        self.tx_id = tx_id
        self.sent = sent
        self.reply: Message | None = None
        self.error: XenStoreError | None = None
        self.done = False
        self.task: trio.lowlevel.Task | None = None
        self.deadline = math.inf
        self.expired = False

    def wake(self) -> None:
        self.done = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Connection:
    """One connected stream and the requests waiting on it."""

    def __init__(self, stream: trio.abc.Stream, queue: int) -> None:
        self.stream = stream
        self.pending: dict[int, _Pending] = {}
        self.orphans: dict[int, _Pending] = {}
        # Frames go straight from the calling task to a socket while nothing is queued
        # (a task hop per request costs more than the whole syscall); once a send would
        # block, or for streams without a socket, they queue for the writer task, which
        # sends everything queued in one go.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self.queue: deque[bytes] = deque()
        self.capacity = max(queue, 1)
        self.writing = False  # the writer owns the send side until its queue is empty
        self.wake_writer = trio.lowlevel.ParkingLot()
        self.space = trio.lowlevel.ParkingLot()
        # Wakes the callers whose deadline passed; its deadline is at most the earliest
        # deadline of a waiting caller (and usually that one: later callers' deadlines
        # are later, so it only needs lowering for the first after an idle spell).
        self.timer: trio.CancelScope | None = None
        self.lost = trio.Event()
        self.error: XenStoreError | None = None

    def fail(self, error: XenStoreError) -> None:
        """Mark the connection dead and wake every waiter with ``error``."""
        if self.lost.is_set():
            return
        self.error = error
        self.lost.set()
        for p in self.pending.values():
            p.error = error
            p.wake()
        self.pending.clear()
        self.orphans.clear()
        self.queue.clear()
        self.space.unpark_all()

    def full(self) -> bool:
        return self.writing and len(self.queue) >= self.capacity

    def push(self, frame: bytes) -> None:
        """Send ``frame`` whole, now or (by the writer) later; never a part of it only.

        Synchronous, so a cancelled caller cannot interrupt it halfway.
        """
        if not self.writing and self.fd >= 0:
            try:
                sent = os.write(self.fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.fail(_socket_lost(exc))
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.queue.append(frame)
        if not self.writing:
            self.writing = True
            self.wake_writer.unpark()

    def orphan(self, req_id: int, p: _Pending) -> None:
        self.orphans[req_id] = p
        while len(self.orphans) > _MAX_ORPHANS:
            del self.orphans[next(iter(self.orphans))]


def _lost(exc: BaseException) -> XenStoreError:
    if isinstance(exc, XenStoreError):
        return exc
    return _error(errno.ECONNRESET, f"connection to xenstored lost: {exc}")


def _socket_lost(exc: OSError) -> XenStoreError:
    """As :func:`_lost` says it when the error comes through a trio SocketStream."""
    return _lost(trio.BrokenResourceError(f"socket connection broken: {exc}"))


# --------------------------------------------------------------------------- client


class XenStoreClient(_Ops):
    """A XenStore connection for a trio program.

    ``path`` is a socket or device to use (``stat`` decides how); by default the
    locations of :mod:`kvpfs.xenstore.locate` are tried.  ``connect`` replaces both
    with any coroutine returning a stream (tests).  ``timeout`` (seconds, None for
    none) bounds every request and raises ``ETIMEDOUT``.  The background tasks run in
    ``nursery`` if given, else in a nursery the client opens itself; either way they end
    when the ``async with`` block does.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        connect: Connector | None = None,
        env: Mapping[str, str] | None = None,
        nursery: trio.Nursery | None = None,
        timeout: float | None = 10.0,
        reconnect: bool = True,
        reconnect_delay: float = 0.05,
        reconnect_delay_max: float = 2.0,
        watch_capacity: int = 1024,
        send_queue: int = 64,
    ) -> None:
        if connect is not None and path is not None:
            raise ValueError("give either path or connect, not both")
        self._path = path
        self._env = env
        self._connect = connect
        self._nursery = nursery
        self.timeout = timeout
        self._reconnect = reconnect
        self._delay = reconnect_delay
        self._delay_max = reconnect_delay_max
        self._watch_capacity = watch_capacity
        self._send_queue = send_queue

        self._conn: _Connection | None = None
        self._connected = trio.Event()
        self._closed = False
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._req_id = 0
        self._token_seq = 0
        self._watches: dict[bytes, list[Watch]] = {}
        self._lifetime_cm: contextlib.AbstractAsyncContextManager[Self] | None = None
        #: Where the current connection goes (for messages and tests).
        self.endpoint: str | None = None
        #: Successful connections so far (1 after the first; +1 per reconnection).
        self.connections = 0

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Self:
        if self._lifetime_cm is not None:
            raise RuntimeError("XenStoreClient can be entered only once")
        self._lifetime_cm = self._lifetime()
        return await self._lifetime_cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._lifetime_cm is not None
        return await self._lifetime_cm.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[Self]:
        if self._nursery is not None:
            await self._nursery.start(self._run)
            try:
                yield self
            finally:
                self._shutdown()
                with trio.CancelScope(shield=True):
                    await self._done.wait()
            return
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run)
                try:
                    yield self
                finally:
                    self._shutdown()
        except BaseExceptionGroup as group:
            # _run never raises once started, so a group holds only the body's (or the
            # failed start's) exception; callers should see it as is.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def aclose(self) -> None:
        """Stop the background tasks; pending and later requests fail with ESHUTDOWN."""
        self._shutdown()
        with trio.CancelScope(shield=True):
            await self._done.wait()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        error = _error(errno.ESHUTDOWN, "XenStore client closed")
        if self._conn is not None:
            self._conn.fail(error)
        for watches in list(self._watches.values()):
            for w in watches:
                w._close(error)
        self._watches.clear()
        if self._scope is not None:
            self._scope.cancel()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost.is_set()

    async def wait_connected(self) -> None:
        """Return once a connection is up (immediately if it is)."""
        while not self.connected:
            if self._closed:
                raise _error(errno.ESHUTDOWN, "XenStore client closed")
            await self._connected.wait()

    async def _open(self) -> trio.abc.Stream:
        """A new stream; OSError (ETIMEDOUT after ``timeout``) when none can be had."""
        try:
            with trio.fail_after(math.inf if self.timeout is None else self.timeout):
                return await self._open_now()
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, "connecting to xenstored timed out") from None

    async def _open_now(self) -> trio.abc.Stream:
        if self._connect is not None:
            self.endpoint = "<custom>"
            return await self._connect()
        if self._path is not None:
            self.endpoint = self._path
            return await locate.open_path(self._path)
        stream, self.endpoint = await locate.open_default(self._env)
        return stream

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self._scope:
                if self._closed:
                    return
                delay = self._delay
                first = True
                while True:
                    try:
                        stream = await self._open()
                    except OSError as exc:
                        if first:
                            err = exc.errno or errno.ECONNREFUSED
                            raise XenStoreError(err, str(exc)) from exc
                        log.debug("xenstore reconnect failed: %s; retry in %.2fs", exc, delay)
                        await trio.sleep(delay)
                        delay = min(delay * 2, self._delay_max)
                        continue
                    conn = _Connection(stream, self._send_queue)
                    since = trio.current_time()
                    try:
                        await self._serve(conn, first, task_status)
                    finally:
                        conn.fail(_error(errno.ECONNRESET, "connection to xenstored lost"))
                        if self._conn is conn:
                            self._conn = None
                        self._connected = trio.Event()
                        with trio.CancelScope(shield=True):
                            await trio.aclose_forcefully(stream)
                    first = False
                    if self._closed:
                        return
                    if not self._reconnect:
                        self._give_up(conn.error)
                        return
                    log.info("connection to xenstored lost; reconnecting")
                    # Reconnect at once after a connection that lasted, but back off
                    # from a server that accepts and drops us again and again.
                    if trio.current_time() - since < _STABLE_CONNECTION:
                        await trio.sleep(delay)
                        delay = min(delay * 2, self._delay_max)
                    else:
                        delay = self._delay
        finally:
            self._closed = True
            self._conn = None
            self._connected.set()  # wake wait_connected() so it sees the closed state
            self._done.set()

    def _give_up(self, error: XenStoreError | None) -> None:
        err = error or _error(errno.ECONNRESET, "connection to xenstored lost")
        self._closed = True
        for watches in list(self._watches.values()):
            for w in watches:
                w._close(err)
        self._watches.clear()

    async def _serve(
        self, conn: _Connection, first: bool, task_status: trio.TaskStatus[None]
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, conn)
            nursery.start_soon(self._writer, conn)
            nursery.start_soon(self._timer, conn)
            if first:
                self._publish(conn)
                task_status.started()
            else:
                # Re-register before anyone else may use the connection, so that a
                # consumer rescanning on Reconnected cannot miss a change.
                rewatched: list[Watch] = []
                for w in [w for ws in self._watches.values() for w in ws]:
                    try:
                        await self._request_on(
                            conn, Op.WATCH, _build(build_watch, w.raw_path, w.raw_token)
                        )
                    except XenStoreError as exc:
                        if conn.lost.is_set():
                            break
                        log.warning("re-registering %r failed: %s", w, exc)
                        self._remove_watch(w)
                        w._close(exc)
                    else:
                        rewatched.append(w)
                if not conn.lost.is_set():
                    self._publish(conn)
                    for w in rewatched:
                        if w in self._watches.get(w.raw_token, ()):
                            w._put(Reconnected())
                        else:  # its block ended while we were registering it
                            payload = _build(build_watch, w.raw_path, w.raw_token)
                            self._send_nowait(conn, Op.UNWATCH, payload, 0)
            await conn.lost.wait()
            nursery.cancel_scope.cancel()

    def _publish(self, conn: _Connection) -> None:
        self._conn = conn
        self.connections += 1
        self._connected.set()

    async def _reader(self, conn: _Connection) -> None:
        decoder = Decoder()
        fd = conn.fd
        data: bytes | bytearray
        streak = 0
        try:
            while True:
                if fd >= 0:
                    # Straight from the socket, without trio's receive_some yielding once
                    # more after every good recv; wait only when there is nothing to read.
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        streak = 0
                        await trio.lowlevel.wait_readable(fd)
                        continue
                    except OSError as exc:
                        conn.fail(_socket_lost(exc))
                        return
                    streak += 1
                    if streak >= 16:  # a flood of watch events must not starve the run
                        streak = 0
                        await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    data = await conn.stream.receive_some(65536)
                if not data:
                    raise _error(errno.ECONNRESET, "xenstored closed the connection")
                decoder.feed(data)
                for msg in decoder:
                    self._dispatch(conn, msg)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as exc:
            conn.fail(_lost(exc))

    async def _writer(self, conn: _Connection) -> None:
        queue = conn.queue
        try:
            while True:
                while not queue:
                    conn.writing = False
                    await conn.wake_writer.park()
                data = queue[0] if len(queue) == 1 else b"".join(queue)
                queue.clear()
                conn.space.unpark_all()
                await conn.stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            conn.fail(_lost(exc))

    async def _timer(self, conn: _Connection) -> None:
        while True:
            now = trio.current_time()
            deadline = math.inf
            for p in conn.pending.values():
                if p.task is None:
                    continue
                if p.deadline <= now:
                    p.expired = True
                    p.wake()
                elif p.deadline < deadline:
                    deadline = p.deadline
            with trio.CancelScope(deadline=deadline) as conn.timer:
                await trio.sleep_forever()

    def _dispatch(self, conn: _Connection, msg: Message) -> None:
        if msg.type == Op.WATCH_EVENT:
            self._deliver(msg.payload)
            return
        p = conn.pending.pop(msg.req_id, None)
        if p is not None:
            p.reply = msg
            p.wake()
            return
        orphan = conn.orphans.pop(msg.req_id, None)
        if orphan is None:
            log.debug("discarding unexpected reply %r", msg)
            return
        # Undo what a caller who stopped waiting started on the server.
        if msg.type == Op.TRANSACTION_START == orphan.op:
            with contextlib.suppress(ProtocolError):
                tx_id = parse_transaction_id(msg.payload)
                self._send_nowait(conn, Op.TRANSACTION_END, build_transaction_end(False), tx_id)
        elif msg.type == Op.WATCH == orphan.op:
            with contextlib.suppress(ProtocolError):
                path, token = parse_watch(orphan.payload)
                if not any(w.raw_path == path for w in self._watches.get(token, ())):
                    self._send_nowait(conn, Op.UNWATCH, orphan.payload, 0)

    def _send_nowait(self, conn: _Connection, op: Op, payload: bytes, tx_id: int) -> None:
        if conn.lost.is_set() or conn.full():
            return
        req_id = self._next_req_id(conn)
        with contextlib.suppress(ProtocolError):
            conn.push(encode_message(Message(op, req_id, tx_id, payload)))
            conn.orphan(req_id, _Pending(op, payload, tx_id, sent=True))

    def _deliver(self, payload: bytes) -> None:
        try:
            path, token = parse_watch_event(payload)
        except ProtocolError:
            log.warning("discarding malformed watch event %r", payload)
            return
        watches = self._watches.get(token)
        if not watches:
            return
        event = WatchEvent(_s(path), _s(token))
        matching = [w for w in watches if is_child(path, w.raw_path)]
        # Several watches may share a token; the event names only the changed node, so
        # route it by path, and if that finds nothing rather over-deliver than lose it.
        for w in matching or watches:
            w._put(event)

    def _next_req_id(self, conn: _Connection) -> int:
        while True:
            self._req_id = self._req_id % 0xFFFFFFFF + 1
            if self._req_id not in conn.pending and self._req_id not in conn.orphans:
                return self._req_id

    # ------------------------------------------------------------------ requests

    async def request(self, op: Op | int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request and return the reply payload.

        Raises :class:`XenStoreError`: the server's error, ``ETIMEDOUT``,
        ``ECONNRESET`` (connection lost while waiting), ``ENOTCONN`` (not connected),
        ``ESHUTDOWN`` (client closed), ``E2BIG`` (payload over 4096 bytes).
        """
        return await self._request_on(self._current(), op, payload, tx_id)

    def _current(self) -> _Connection:
        if self._closed:
            raise _error(errno.ESHUTDOWN, "XenStore client closed")
        conn = self._conn
        if conn is None or conn.lost.is_set():
            raise _error(errno.ENOTCONN, "not connected to xenstored")
        return conn

    async def _request_on(
        self, conn: _Connection, op: Op | int, payload: bytes, tx_id: int = 0
    ) -> bytes:
        if conn.lost.is_set():
            raise _lost_copy(conn)
        req_id = self._next_req_id(conn)
        try:
            frame = encode_message(Message(int(op), req_id, tx_id, payload))
        except ProtocolError as exc:
            raise _error(exc.errno, str(exc)) from None
        p = _Pending(int(op), payload, tx_id)
        conn.pending[req_id] = p
        timeout = self.timeout
        if timeout is not None:
            p.deadline = trio.current_time() + timeout
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if conn.full():
                with trio.move_on_at(p.deadline) as queued:
                    while conn.full():
                        await conn.space.park()
                p.expired = queued.cancelled_caught
            if conn.lost.is_set():
                raise _lost_copy(conn)
            if not p.expired:
                p.sent = True
                conn.push(frame)
                if not p.done:
                    p.task = trio.lowlevel.current_task()
                    timer = conn.timer
                    if timer is not None and p.deadline < timer.deadline:
                        timer.deadline = p.deadline
                    await trio.lowlevel.wait_task_rescheduled(p.abort)
            if p.expired:
                raise _error(errno.ETIMEDOUT, f"no reply to {_op_name(op)} within {timeout} s")
        finally:
            if conn.pending.pop(req_id, None) is not None and p.sent:
                conn.orphan(req_id, p)
        if p.error is not None:
            raise _copy(p.error)
        reply = p.reply
        assert reply is not None
        if reply.type == Op.ERROR:
            raise parse_error(reply.payload)
        if reply.type != int(op):
            raise _error(errno.EIO, f"reply of type {reply.type} to {_op_name(op)}")
        return reply.payload

    # ------------------------------------------------------------------ watches

    def _new_token(self) -> bytes:
        self._token_seq += 1
        return b"kvpfs-%d" % self._token_seq

    def _add_watch(self, w: Watch) -> None:
        self._watches.setdefault(w.raw_token, []).append(w)

    def _remove_watch(self, w: Watch) -> None:
        ws = self._watches.get(w.raw_token)
        if ws and w in ws:
            ws.remove(w)
            if not ws:
                del self._watches[w.raw_token]

    @contextlib.asynccontextmanager
    async def watch(
        self,
        path: str | bytes,
        token: str | bytes | None = None,
        *,
        capacity: int | None = None,
    ) -> AsyncIterator[Watch]:
        """Register a watch for the duration of the block.

        The first item is the server's initial event for ``path``.  ``token`` defaults
        to one unique to this client.  ``capacity`` bounds the buffered events (see the
        module notes for what happens when it is exceeded).
        """
        raw_path = _b(path)
        raw_token = self._new_token() if token is None else _b(token)
        w = Watch(raw_path, raw_token, self._watch_capacity if capacity is None else capacity)
        payload = _build(build_watch, raw_path, raw_token)
        self._add_watch(w)
        try:
            await self.request(Op.WATCH, payload)
        except BaseException:
            self._remove_watch(w)
            raise
        try:
            yield w
        finally:
            self._remove_watch(w)
            w._close(None)
            if self.connected:
                with trio.CancelScope(shield=True), contextlib.suppress(XenStoreError):
                    with trio.move_on_after(self.timeout or 10.0):
                        await self.request(Op.UNWATCH, payload)

    async def reset_watches(self) -> None:
        """``RESET_WATCHES``: the server drops this connection's watches and
        transactions; every active :class:`Watch` ends with ``ECANCELED``."""
        await self.request(Op.RESET_WATCHES, b"")
        error = _error(errno.ECANCELED, "watch removed by RESET_WATCHES")
        for watches in list(self._watches.values()):
            for w in watches:
                w._close(error)
        self._watches.clear()

    # ------------------------------------------------------------------ transactions

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Commit on a clean exit (:class:`TransactionConflict` on ``EAGAIN``), abort
        when the block raises (also on cancellation)."""
        conn = self._current()
        payload = await self._request_on(conn, Op.TRANSACTION_START, build_transaction_start())
        tx = Transaction(self, conn, _parse(parse_transaction_id, payload))
        try:
            yield tx
        except BaseException:
            if not tx.ended:
                with trio.CancelScope(shield=True), contextlib.suppress(XenStoreError):
                    with trio.move_on_after(self.timeout or 10.0):
                        await tx.abort()
            raise
        if not tx.ended:
            await tx.commit()

    async def run_in_transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], retries: int = 16
    ) -> T:
        """Run ``fn(tx)`` in a transaction, re-running it on ``EAGAIN`` at commit up to
        ``retries`` more times (then the last :class:`TransactionConflict` is raised)."""
        for attempt in range(retries + 1):
            try:
                async with self.transaction() as tx:
                    result = await fn(tx)
                return result
            except TransactionConflict:
                if attempt == retries:
                    raise
                log.debug("transaction conflict, attempt %d", attempt + 1)
        raise AssertionError("unreachable")


def _lost_copy(conn: _Connection) -> XenStoreError:
    return _copy(conn.error or _error(errno.ECONNRESET, "connection to xenstored lost"))


def _op_name(op: Op | int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(int(op))


class Transaction(_Ops):
    """Requests inside one XenStore transaction (see :meth:`XenStoreClient.transaction`).

    Reads see the transaction's own writes; nothing is visible to others, and no watch
    fires, before the commit.  If the connection is lost every request (and the
    commit) fails with ``ECONNRESET``.
    """

    def __init__(self, client: XenStoreClient, conn: _Connection, tx_id: int) -> None:
        self._client = client
        self._conn = conn
        self.id = tx_id
        self.ended = False

    def __repr__(self) -> str:
        return f"<Transaction {self.id}>"

    async def request(self, op: Op | int, payload: bytes) -> bytes:
        if self.ended:
            raise _error(errno.EINVAL, "transaction already ended")
        if self._client._closed:
            raise _error(errno.ESHUTDOWN, "XenStore client closed")
        return await self._client._request_on(self._conn, op, payload, self.id)

    async def commit(self) -> None:
        """``TRANSACTION_END T``; :class:`TransactionConflict` on ``EAGAIN``."""
        try:
            await self.request(Op.TRANSACTION_END, build_transaction_end(True))
        except XenStoreError as exc:
            if exc.errno == errno.EAGAIN:
                raise TransactionConflict() from None
            raise
        finally:
            self.ended = True

    async def abort(self) -> None:
        """``TRANSACTION_END F``."""
        try:
            await self.request(Op.TRANSACTION_END, build_transaction_end(False))
        finally:
            self.ended = True


async def read_many(client: XenStoreClient, paths: Sequence[str]) -> dict[str, bytes | None]:
    """Read ``paths``, all requests in flight at once; a missing node is None.

    So is a node the connection may not read: a guest asking for a node below a
    removed directory of dom0's gets EACCES, not ENOENT, and for a driver both
    mean the peer is gone.  (Pipelined: the replies to a dozen reads cost about one
    round trip, which is what makes a summary of each of 4,000 devices cheap.)
    """
    out: dict[str, bytes | None] = {}

    async def one(path: str) -> None:
        try:
            out[path] = await client.read(path)
        except XenStoreError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES):
                raise
            out[path] = None

    if len(paths) == 1:
        await one(paths[0])
        return out
    try:
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(one, path)
    except BaseExceptionGroup as group:
        # One read's error is the caller's, as when they were read in turn.
        raise group.exceptions[0] from None
    return {path: out[path] for path in paths}
