"""XenStore servers for tests: the embedded server and the real cxenstored 4.17.

Fixtures (names are stable; other suites use them):

``fakexen_so`` (session)
    Path of the LD_PRELOAD shim (``fakexen.c``) compiled once per session.  Skips,
    with the reason, when cxenstored 4.17, gcc or the Xen headers are missing.
``xenstored_real``
    Socket path (a :class:`ServerPath`) of a fresh cxenstored 4.17 in its own run
    directory, for one test; the process is always killed afterwards.
``xenstored_embedded``
    Socket path of a fresh embedded server for one test, in the state cxenstored
    starts in.  It runs in a background thread with its own trio loop, so plain
    (blocking) tests and trio tests can both talk to it without sharing an event
    loop.  ``.embedded`` is the :class:`EmbeddedServer` (``call()`` runs a function
    in the server's loop, e.g. to inspect the store).
``xenstored_guests``
    Like ``xenstored_embedded`` plus ``.domain_sockets``: guest domains 1 and 2
    (introduced) on sockets whose clients speak as those unprivileged domains.
``xenstored_embedded_process``
    Like ``xenstored_embedded`` but the server is a separate ``python -m
    kvpfs.peers.xenstored.server`` process (``.pid`` set): for fd/memory accounting.
``xenstored``
    Parametrized over ``["embedded", "real"]``: the same test against both.
``xenstored_pair``
    ``(embedded, real)``, both fresh: for byte-for-byte comparisons.
``embedded_factory``
    ``embedded_factory(**options)`` starts more embedded servers (initial tree,
    quotas, ``max_pending_bytes``, guest domain ids); all are stopped afterwards.

A guest domain can only be talked as on the embedded server: cxenstored has no
domain socket (a guest uses a shared ring), and the shim gives an introduced domain
a silent ring.  Guest-permission tests therefore run on the embedded server only.

Helpers: :class:`RawConn` (blocking raw-protocol connection), :func:`run_script`
(same request script on any server, every byte received recorded),
:func:`dump_tree` (every node with value, permissions and generation) and
:func:`normalise` (the one place where documented differences are neutralised).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from kvpfs.peers.xenstored.server import XenstoredServer, serve_xenstored
from kvpfs.xenstore.protocol import HEADER, Message, Op

XENSTORED = Path("/usr/lib/xen-4.17/bin/xenstored")
SHIM_SOURCE = Path(__file__).with_name("fakexen.c")
XEN_HEADERS = [Path("/usr/include") / h for h in ("xenctrl.h", "xenevtchn.h", "xengnttab.h")]
REPO = Path(__file__).resolve().parents[2]

#: Guest domains the embedded fixtures serve on domain sockets.
GUEST_DOMIDS = (1, 2)

T = TypeVar("T")


class ServerPath(str):
    """A server's privileged socket path, with what a test may need besides."""

    kind: str
    domain_sockets: dict[int, str]
    embedded: EmbeddedServer | None
    pid: int | None

    def __new__(
        cls,
        path: str,
        kind: str,
        domain_sockets: dict[int, str] | None = None,
        embedded: EmbeddedServer | None = None,
        pid: int | None = None,
    ) -> ServerPath:
        obj = super().__new__(cls, path)
        obj.kind = kind
        obj.domain_sockets = domain_sockets or {}
        obj.embedded = embedded
        obj.pid = pid
        return obj


# --------------------------------------------------------------------------- real


def real_unavailable() -> str | None:
    """Why cxenstored 4.17 cannot run here, or None."""
    if not XENSTORED.exists():
        return f"{XENSTORED} missing: install xen-utils-4.17 (see the XenStore reference §15)"
    if shutil.which("gcc") is None:
        return "gcc is not installed: the fakexen shim cannot be built"
    missing = [str(h) for h in XEN_HEADERS if not h.exists()]
    if missing:
        return f"Xen headers missing ({', '.join(missing)}): install libxen-dev"
    return None


@pytest.fixture(scope="session")
def fakexen_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = real_unavailable()
    if reason:
        print(f"skipping cxenstored tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("fakexen") / "fakexen.so"
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SOURCE), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"fakexen.c does not compile:\n{proc.stderr}")
    return out


class RealDaemon:
    """cxenstored 4.17 under the shim in a fresh run directory."""

    def __init__(self, shim: Path, rundir: Path) -> None:
        self.shim = shim
        self.rundir = rundir
        self.socket = str(rundir / "socket")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, XENSTORED_RUNDIR=str(self.rundir), LD_PRELOAD=str(self.shim))
        env.pop("XENSTORED_PATH", None)
        log = open(self.rundir / "log", "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [str(XENSTORED), "-N", "-F", str(self.rundir / "pid")],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while True:
            if os.path.exists(self.socket) and _connectable(self.socket):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.rundir / "log").read_text(errors="replace")
                pytest.fail(f"cxenstored did not start:\n{text}")
            time.sleep(0.005)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


@pytest.fixture
def xenstored_real(fakexen_so: Path) -> Iterator[ServerPath]:
    rundir = Path(tempfile.mkdtemp(prefix="cxs-"))
    daemon = RealDaemon(fakexen_so, rundir)
    try:
        daemon.start()
        assert daemon.proc is not None
        yield ServerPath(daemon.socket, "real", pid=daemon.proc.pid)
    finally:
        daemon.stop()
        shutil.rmtree(rundir, ignore_errors=True)


# --------------------------------------------------------------------------- embedded


class EmbeddedServer:
    """The embedded server in a background thread running its own trio loop."""

    def __init__(self, sockdir: Path, guests: Sequence[int] = GUEST_DOMIDS, **options: Any):
        self.socket = str(sockdir / "xs.sock")
        self.domain_sockets = {d: str(sockdir / f"dom{d}.sock") for d in guests}
        self.options = options
        self.server: XenstoredServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-xenstored", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("embedded xenstored did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start() or stop()
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.server = await nursery.start(
                _serve_partial(self.socket, self.domain_sockets, self.options)
            )
            self._started.set()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the server's loop (between two requests) and return it."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None and self._cancel is not None:
            cancel = self._cancel
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(cancel.cancel, trio_token=self._token)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("embedded xenstored did not stop")
        if self._error is not None:
            raise self._error

    def path(self) -> ServerPath:
        return ServerPath(self.socket, "embedded", dict(self.domain_sockets), embedded=self)


def _serve_partial(
    socket_path: str, domains: dict[int, str], options: dict[str, Any]
) -> Callable[..., Any]:
    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve_xenstored(socket_path, domains, task_status=task_status, **options)

    return run


@pytest.fixture
def embedded_factory() -> Iterator[Callable[..., ServerPath]]:
    started: list[EmbeddedServer] = []
    dirs: list[Path] = []

    def factory(guests: Sequence[int] = GUEST_DOMIDS, **options: Any) -> ServerPath:
        # Short directory names: unix socket paths are limited to 107 bytes.
        sockdir = Path(tempfile.mkdtemp(prefix="exs-"))
        dirs.append(sockdir)
        server = EmbeddedServer(sockdir, guests, **options)
        server.start()
        started.append(server)
        return server.path()

    try:
        yield factory
    finally:
        errors = []
        for server in started:
            try:
                server.stop()
            except BaseException as exc:
                errors.append(exc)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        if errors:
            raise errors[0]


@pytest.fixture
def xenstored_embedded(embedded_factory: Callable[..., ServerPath]) -> ServerPath:
    return embedded_factory(guests=())


@pytest.fixture
def xenstored_guests(embedded_factory: Callable[..., ServerPath]) -> ServerPath:
    return embedded_factory()


@pytest.fixture
def xenstored_embedded_process() -> Iterator[ServerPath]:
    sockdir = Path(tempfile.mkdtemp(prefix="exp-"))
    path = str(sockdir / "xs.sock")
    domains = {d: str(sockdir / f"dom{d}.sock") for d in GUEST_DOMIDS}
    cmd = [sys.executable, "-m", "kvpfs.peers.xenstored.server", path]
    cmd += [f"{d}:{p}" for d, p in domains.items()]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if line.strip() != f"XENSTORED_PATH={path}":
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"embedded xenstored did not start: {line!r} {err}")
        yield ServerPath(path, "embedded", domains, pid=proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(params=["embedded", "real"])
def xenstored(request: pytest.FixtureRequest) -> ServerPath:
    name = "xenstored_embedded" if request.param == "embedded" else "xenstored_real"
    path: ServerPath = request.getfixturevalue(name)
    return path


@pytest.fixture
def xenstored_pair(
    xenstored_real: ServerPath, xenstored_embedded: ServerPath
) -> tuple[ServerPath, ServerPath]:
    return xenstored_embedded, xenstored_real


# --------------------------------------------------------------------------- raw protocol


class ConnectionClosed(Exception):
    """The server closed (or reset) the connection."""


#: req_id of the GET_DOMAIN_PATH requests :meth:`RawConn.sync` uses as a marker.
SYNC_REQ_ID = 0x5C5C5C5C


class RawConn:
    """A blocking raw-protocol connection: exactly the bytes a test sends."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                # The listen backlog is full (cxenstored's is small): the server
                # has not accepted earlier connections yet.
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.002)
        self.timeout = timeout
        self._buf = b""
        self.closed = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, mtype: int, payload: bytes = b"", tx_id: int = 0, req_id: int = 0) -> None:
        self.send_raw(HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload)

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message; None when nothing arrives within ``timeout``."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while True:
            if len(self._buf) >= 16:
                mtype, req_id, tx_id, length = HEADER.unpack_from(self._buf)
                if len(self._buf) >= 16 + length:
                    payload = self._buf[16 : 16 + length]
                    self._buf = self._buf[16 + length :]
                    return Message(mtype, req_id, tx_id, payload)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from exc
            if not data:
                self.closed = True
                raise ConnectionClosed("EOF")
            self._buf += data

    def request(
        self, mtype: int, payload: bytes = b"", tx_id: int = 0, req_id: int = 0
    ) -> tuple[Message, list[Message]]:
        """Send one request; (reply, watch events received before it)."""
        self.send(mtype, payload, tx_id, req_id)
        events = []
        while True:
            msg = self.recv()
            if msg is None:
                raise TimeoutError(f"no reply to {mtype} {payload!r}")
            if msg.type == Op.WATCH_EVENT:
                events.append(msg)
                continue
            return msg, events

    def rq(self, mtype: int, payload: bytes = b"", tx: int = 0) -> bytes:
        """The reply payload, with ``E:`` before an error name: for short asserts."""
        reply, _ = self.request(mtype, payload, tx)
        if reply.type == Op.ERROR:
            return b"E:" + reply.payload.rstrip(b"\0")
        return reply.payload

    def sync(self) -> list[Message]:
        """Every message the server sent before answering a marker request.

        cxenstored answers in order, so whatever a previous request caused on this
        connection has arrived once the marker's reply is in.
        """
        try:
            self.send(Op.GET_DOMAIN_PATH, b"0\0", 0, SYNC_REQ_ID)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.closed = True
            raise ConnectionClosed(str(exc)) from exc
        got = []
        while True:
            msg = self.recv()
            if msg is None:
                raise TimeoutError("no reply to the sync marker")
            if msg.type == Op.GET_DOMAIN_PATH and msg.req_id == SYNC_REQ_ID:
                return got
            got.append(msg)

    def is_dropped(self, timeout: float = 2.0) -> bool:
        """True if the server closes the connection (EOF or reset) within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            except ConnectionClosed:
                return True
            if msg is None:
                return False
        return False


@dataclass(frozen=True)
class Send:
    """One scripted request on connection ``conn`` (index)."""

    conn: int
    type: int
    payload: bytes = b""
    tx_id: int = 0
    req_id: int = 0


@dataclass(frozen=True)
class Raw:
    """Arbitrary bytes on connection ``conn`` (malformed frames)."""

    conn: int
    data: bytes


Step = Send | Raw
Transcript = list[tuple[int, int, tuple[Any, ...]]]


def run_script(path: str, steps: Sequence[Step], conns: int = 1) -> Transcript:
    """Run ``steps`` on ``conns`` fresh connections and record, after every step,
    everything each connection received (type, req_id, tx_id, payload) or that it
    was closed."""
    opened = [RawConn(path) for _ in range(conns)]
    transcript: Transcript = []
    try:
        for i, step in enumerate(steps):
            conn = opened[step.conn]
            if conn.closed:
                transcript.append((i, step.conn, ("send-after-close",)))
                continue
            try:
                if isinstance(step, Send):
                    conn.send(step.type, step.payload, step.tx_id, step.req_id)
                else:
                    conn.send_raw(step.data)
            except (BrokenPipeError, ConnectionResetError):
                conn.closed = True
            # The sender first: once its marker is answered the step has been
            # processed, so whatever it caused elsewhere precedes the others' markers.
            order = [step.conn] + [j for j in range(len(opened)) if j != step.conn]
            for j in order:
                c = opened[j]
                if c.closed:
                    transcript.append((i, j, ("closed",)))
                    continue
                try:
                    got = c.sync()
                except ConnectionClosed:
                    transcript.append((i, j, ("closed",)))
                    continue
                for m in got:
                    transcript.append((i, j, (m.type, m.req_id, m.tx_id, m.payload)))
    finally:
        for c in opened:
            c.close()
    return normalise(transcript)


def normalise(transcript: Transcript) -> Transcript:
    """Neutralise the documented, justified differences between the two servers.

    * ``CONTROL quota <domid>`` reports a ``memory`` figure that is cxenstored's
      talloc accounting of its own heap (node records, watches, buffers); the
      embedded server reports its estimate of the node records.  The line is
      blanked; every other line is compared.

    Nothing else differs: transaction ids, generation counts, event order and error
    names are identical on both servers.
    """
    out: Transcript = []
    for i, j, item in transcript:
        if len(item) == 4 and item[0] == Op.CONTROL and item[3].startswith(b"Domain "):
            lines = item[3].split(b"\n")
            lines = [b"memory: *" if ln.startswith(b"memory") else ln for ln in lines]
            item = (item[0], item[1], item[2], b"\n".join(lines))
        out.append((i, j, item))
    return out


def list_children(conn: RawConn, node: bytes) -> list[bytes]:
    """A node's children through DIRECTORY_PART (works past DIRECTORY's E2BIG)."""
    data = b""
    offset = 0
    while True:
        reply = conn.rq(Op.DIRECTORY_PART, node + b"\0" + b"%d\0" % offset)
        assert not reply.startswith(b"E:"), (node, reply)
        chunk = reply.split(b"\0", 1)[1]
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            data += chunk[:-1]
            break
        data += chunk
        offset += len(chunk)
    return [n for n in data.split(b"\0") if n]


def dump_tree(path: str) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(path, value, permissions, generation) of every node, top-down in child order,
    read over a fresh connection."""
    result = []
    with RawConn(path) as c:
        stack = [b"/"]
        while stack:
            node = stack.pop()
            value = c.rq(Op.READ, node + b"\0")
            perms = c.rq(Op.GET_PERMS, node + b"\0")
            gen = c.rq(Op.DIRECTORY_PART, node + b"\0" + b"0\0").split(b"\0", 1)[0]
            result.append((node, value, perms, gen))
            base = node if node == b"/" else node + b"/"
            stack.extend(reversed([base + n for n in list_children(c, node)]))
    return result


def header(mtype: int, length: int, tx_id: int = 0, req_id: int = 0) -> bytes:
    return struct.pack("=IIII", mtype, req_id, tx_id, length)
