"""Where a XenStore client connects, chosen as libxenstore 4.17 chooses.

``xs_open()`` tries the daemon socket, then the domain device:

* daemon socket: ``$XENSTORED_PATH``, else ``<rundir>/socket`` where rundir is
  ``$XENSTORED_RUNDIR``, else ``/var/run/xenstored``;
* domain device: ``$XENSTORED_PATH``, else ``/dev/xen/xenbus`` if it exists, else
  ``/proc/xen/xenbus``.

Each candidate is ``stat()``-ed: a socket gets ``connect(AF_UNIX)``, anything else
(the xenbus character device in a guest or dom0 without xenstored's socket) gets
``open(O_RDWR)``.  Both speak the same framing.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Mapping

import trio

from kvpfs.xenstore.protocol import (
    EMBEDDED_PROBE,
    EMBEDDED_PROBE_REPLY,
    Decoder,
    Message,
    Op,
    ProtocolError,
    encode_args,
    encode_message,
)

DEFAULT_RUNDIR = "/var/run/xenstored"
XENBUS_DEVICE = "/dev/xen/xenbus"
XENBUS_PROC = "/proc/xen/xenbus"


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def daemon_rundir(env: Mapping[str, str] | None = None) -> str:
    return _env(env).get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR


def daemon_socket_path(env: Mapping[str, str] | None = None) -> str:
    """``xs_daemon_socket()``."""
    e = _env(env)
    return e.get("XENSTORED_PATH") or os.path.join(daemon_rundir(e), "socket")


def domain_device_path(env: Mapping[str, str] | None = None) -> str:
    """``xs_domain_dev()`` on Linux."""
    e = _env(env)
    if path := e.get("XENSTORED_PATH"):
        return path
    return XENBUS_DEVICE if os.path.exists(XENBUS_DEVICE) else XENBUS_PROC


def candidates(env: Mapping[str, str] | None = None) -> list[str]:
    """The paths ``xs_open()`` tries, in order, without duplicates."""
    paths = [daemon_socket_path(env), domain_device_path(env)]
    return list(dict.fromkeys(paths))


async def connect_unix(path: str) -> trio.SocketStream:
    """``connect(AF_UNIX)`` that waits, as a blocking connect does, while the
    server's listen backlog is full.

    On Linux a non-blocking connect to a unix socket with a full backlog fails with
    EAGAIN, not EINPROGRESS, and leaves the socket unconnected; trio's
    ``open_unix_socket`` takes that for "in progress" and hands back a socket whose
    first ``recv`` fails with EINVAL.  cxenstored listens with a backlog of 1, so two
    clients connecting at once hit this.  Here the connect is simply retried.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        delay = 0.0005
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


async def open_path(path: str) -> trio.abc.Stream:
    """Connect to a socket or open a device/FIFO-like file read-write."""
    st = os.stat(path)
    if stat.S_ISSOCK(st.st_mode):
        return await connect_unix(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return trio.lowlevel.FdStream(fd)
    except BaseException:
        os.close(fd)
        raise


async def open_default(env: Mapping[str, str] | None = None) -> tuple[trio.abc.Stream, str]:
    """The first candidate that opens, and its path.

    When none does, the OSError of the first candidate (the daemon socket, usually
    the informative one) is raised, mentioning all paths tried.
    """
    errors: list[tuple[str, OSError]] = []
    for path in candidates(env):
        try:
            return await open_path(path), path
        except OSError as exc:
            errors.append((path, exc))
    first = errors[0][1]
    tried = ", ".join(p for p, _ in errors)
    raise OSError(
        first.errno or errno.ENOENT, f"cannot reach xenstored (tried {tried}): {first.strerror}"
    ) from first


def find_xenstored(env: Mapping[str, str] | None = None) -> str | None:
    """The path a client should use if a xenstored is reachable, else None.

    The :func:`candidates` (libxenstore's order:
    ``$XENSTORED_PATH``, the daemon socket, the xenbus device), each tried for
    real: a socket file nobody listens on (a daemon that died) does not count.
    """
    for path in candidates(env):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            try:
                sock.connect(path)
            except OSError:
                continue
            finally:
                sock.close()
            return path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue
        os.close(fd)
        return path
    return None


def is_kvpfs_embedded(path: str, timeout: float = 2.0) -> bool:
    """Whether the xenstored answering at the socket ``path`` is a kvpfs embedded one.

    Asks ``CONTROL kvpfs-embedded`` (see :data:`kvpfs.xenstore.protocol.EMBEDDED_PROBE`)
    on a short blocking connection: this runs once, before any trio run starts.  A
    xenbus device, a dead socket or any error counts as "not ours".
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    request = encode_message(Message(Op.CONTROL, 0x6B767066, 0, encode_args(EMBEDDED_PROBE)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(request)
        decoder = Decoder()
        while (reply := decoder.next_message()) is None:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            decoder.feed(chunk)
    except (OSError, ProtocolError):
        return False
    finally:
        sock.close()
    return reply.type == Op.CONTROL and reply.payload == EMBEDDED_PROBE_REPLY
