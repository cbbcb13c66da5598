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
