"""An embedded xenstored: the :class:`~kvpfs.xenstore.store.Store` behind unix sockets.

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
import socket as _stdsocket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from .protocol import HEADER, XENSTORE_PAYLOAD_MAX, Message
from .store import Quotas, Store

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "XenstoredServer",
    "serve_xenstored",
]

#: cxenstored 4.17's hard memory quota per domain (``-Q memory=``).
DEFAULT_MAX_PENDING_BYTES = 2621440

_RECV_SIZE = 65536
#: How long a connection keeps polling for its next request after a batch before it
#: waits through trio.
_SPIN_SECONDS = 50e-6
_now = time.perf_counter
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


@dataclass
class ServerStats:
    """Counters for tests and diagnostics."""

    accepted: int = 0
    closed: int = 0
    dropped_oversized: int = 0
    dropped_backlog: int = 0


class _Client:
    __slots__ = (
        "blocked",
        "cancel",
        "conn_id",
        "domid",
        "drained",
        "out",
        "sock",
        "wake",
    )

    def __init__(self, conn_id: int, domid: int, sock: _stdsocket.socket) -> None:
        self.conn_id = conn_id
        self.domid = domid
        self.sock = sock
        #: Bytes accepted for this client and not yet taken by the kernel.
        self.out = bytearray()
        #: The socket would block: the writer task owns sending until ``out`` drains.
        self.blocked = False
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.cancel = trio.CancelScope()


class XenstoredServer:
    """The listeners and connections around one :class:`Store`.

    Use :func:`serve_xenstored` (or ``await nursery.start(server.serve)``); the
    object handed to ``task_status.started()`` is this server, whose ``store`` may
    be inspected between requests.

    Sockets are plain non-blocking sockets driven with ``trio.lowlevel``
    ``wait_readable``/``wait_writable``: a request costs one wait for input and two
    system calls, not the several scheduler passes of trio's socket wrappers, which
    is what lets a Python server keep up with cxenstored.
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
        self._bound: list[str] = []

    @property
    def connection_count(self) -> int:
        return len(self._clients)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every socket, report started, serve until cancelled.

        On the way out every client connection is closed and the socket files this
        server created are removed.  A bind error is raised before anything runs.
        """
        listeners: list[tuple[_stdsocket.socket, int]] = []
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
            for sock, _ in listeners:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            for path in self._bound:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._bound.clear()

    def _bind(self, path: str) -> _stdsocket.socket:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                # A socket file left by a previous run; cxenstored replaces it too.
                os.unlink(path)
        sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            sock.bind(path)  # a local path: never blocks
            self._bound.append(path)
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
        try:
            with client.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, client)
                    await self._reader(client)
                    nursery.cancel_scope.cancel()
        finally:
            del self._clients[conn_id]
            self._dirty.pop(conn_id, None)
            self.store.disconnect(conn_id)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self.stats.closed += 1

    async def _reader(self, client: _Client) -> None:
        sock = client.sock
        buf = b""
        store_handle = self.store.handle
        clients = self._clients
        dirty = self._dirty
        conn_id = client.conn_id
        max_pending = self.max_pending_bytes
        batches = 0
        spin = 0.0
        while True:
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                if spin and _now() < spin:
                    # A request/reply client sends its next request within
                    # microseconds of our reply: retrying for a moment catches it
                    # without sleeping in the event loop, whose wake-up costs more
                    # than the whole request.  Bounded, and only right after a batch.
                    continue
                spin = 0.0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            spin = _now() + _SPIN_SECONDS
            if not data:
                return
            buf = buf + data if buf else data
            pos = 0
            end = len(buf)
            while end - pos >= _HEADER_SIZE:
                mtype, req_id, tx_id, length = _unpack_header(buf, pos)
                if length > XENSTORE_PAYLOAD_MAX:
                    # cxenstored drops a connection announcing an oversized payload.
                    self.stats.dropped_oversized += 1
                    self._flush_dirty()
                    return
                stop = pos + _HEADER_SIZE + length
                if stop > end:
                    break
                msg = Message(mtype, req_id, tx_id, buf[pos + _HEADER_SIZE : stop])
                pos = stop
                for target, out in store_handle(conn_id, msg):
                    other = clients.get(target)
                    if other is None:
                        continue
                    payload = out.payload
                    other.out += _pack_header(out.type, out.req_id, out.tx_id, len(payload))
                    other.out += payload
                    if len(other.out) > max_pending and other is not client:
                        self._drop_backlogged(other)
                    else:
                        dirty[target] = other
            buf = buf[pos:] if pos < end else b""
            self._flush_dirty()
            if client.blocked:
                # Our own replies are not being read: stop reading requests until
                # they drain (the client stalls only itself).
                await client.drained.wait()
            batches += 1
            if batches & 15 == 0:
                # A client that always has input never waits: let others run.
                await trio.lowlevel.checkpoint()

    def _drop_backlogged(self, client: _Client) -> None:
        self.stats.dropped_backlog += 1
        client.out.clear()
        self._dirty.pop(client.conn_id, None)
        client.cancel.cancel()

    def _flush_dirty(self) -> None:
        """Hand every queued byte to the kernel without blocking; a socket that is
        full is passed to its writer task."""
        dirty = self._dirty
        if not dirty:
            return
        for client in list(dirty.values()):
            if client.blocked:
                continue
            out = client.out
            try:
                sent = client.sock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError:
                client.out.clear()
                client.cancel.cancel()
                continue
            if sent == len(out):
                out.clear()
            else:
                del out[:sent]
                client.blocked = True
                client.drained = trio.Event()
                client.wake.set()
        dirty.clear()

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
                    client.cancel.cancel()
                    return
                del out[:sent]
            client.blocked = False
            client.drained.set()


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
    """``python -m kvpfs.xenstore.server SOCKET [DOMID:PATH ...]``: for tests and
    scripts that want an embedded xenstored in a separate process."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(
            "usage: python -m kvpfs.xenstore.server SOCKET [--initial NAME] [DOMID:PATH ...]",
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
