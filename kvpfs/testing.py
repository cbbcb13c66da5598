"""kvpfs for other projects' tests: an embedded xenstored, and a mounted kvpfs.

The pytest plugin (:mod:`kvpfs.pytest_plugin`) hands out the objects of this module;
they work without pytest too (``with EmbeddedXenstored() as xs: ...``).

* :class:`EmbeddedXenstored` serves kvpfs's embedded xenstored on a private socket,
  in a thread of this process with its own trio loop, so that a plain synchronous
  test and a trio test can both use it (and any subprocess, through :attr:`env`).
* :class:`KvpfsMount` runs the real command (``python -m kvpfs embedded MNT -f ...``)
  as a child process on temporary pools, with its own embedded xenstored and the
  simulated block backend.  The filesystem is served by another process, so the
  test may touch the mount from any thread, a trio one included.  :meth:`stop`
  always unmounts: ``kvpfs unmount``, then a kill and a lazy unmount.

Every synchronous helper (:meth:`Xenstored.load`, :meth:`Xenstored.dump`, ...) runs
a XenStore client in a thread of its own with its own trio loop: it may be called
from a trio test as well (it blocks that test's loop for as long as it takes).
This module is a composition root: it starts peers and runs the command.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import trio

import kvpfs
from kvpfs.fs.mount import FSTYPE, force_unmount, mount_type, mounted_at
from kvpfs.kvp.location import create_pools
from kvpfs.peers.xenstored.server import serve_xenstored
from kvpfs.vbd.toolstack import create_domain
from kvpfs.xenstore.client import XenStoreClient, XenStoreError
from kvpfs.xenstore.lsformat import DumpedNode, format_dump, parse_dump
from kvpfs.xenstore.seed import dump_tree, load_tree

if TYPE_CHECKING:
    import pytest

__all__ = [
    "EmbeddedXenstored",
    "KvpfsMount",
    "KvpfsMountWarning",
    "MountUnavailable",
    "Xenstored",
    "command_env",
    "fuse_unavailable",
    "mount_options",
]

T = TypeVar("T")

#: How long a helper's XenStore conversation, a mount's start and each step of
#: its stop may take (seconds).
TIMEOUT = 30.0
#: Where this process's kvpfs comes from: the command must run the same one.
_PACKAGE_PARENT = str(Path(kvpfs.__file__).resolve().parent.parent)
#: A unix socket path holds at most 107 bytes; our names below a directory need 20.
_SOCKET_DIR_MAX = 80


#: How long the process may take to end after ``kvpfs unmount`` before SIGTERM.
_UNMOUNT_WAIT = 5.0


class KvpfsMountWarning(UserWarning):
    """A mount's stop had to be forced (signals, a lazy unmount)."""


class MountUnavailable(Exception):
    """This machine does not let the test mount (no usable /dev/fuse, or no right to
    mount); the plugin turns it into a skip with this message as the reason."""


def command_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a ``python -m kvpfs`` that imports
    this process's kvpfs: a checkout or a path added at run time goes first on
    ``PYTHONPATH`` (an installed package is found without it)."""
    result = dict(os.environ if env is None else env)
    places = [*site.getsitepackages(), site.getusersitepackages()]
    installed = {str(Path(p).resolve()) for p in places}
    if _PACKAGE_PARENT not in installed:
        pythonpath = result.get("PYTHONPATH")
        result["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + pythonpath if pythonpath else "")
    return result


def fuse_unavailable(device: str = "/dev/fuse") -> str | None:
    """Why a FUSE mount cannot work here before anything is tried, or None."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return (
            f"cannot open {device}: {exc.strerror} (a container needs "
            "--device /dev/fuse --cap-add SYS_ADMIN, or a user namespace: unshare -U -r -m)"
        )
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3 (Debian: apt-get install fuse3)"
    return None


def short_tempdir(prefix: str) -> Path:
    """A new private directory with a short path, for unix sockets."""
    base = tempfile.gettempdir()
    if len(base) > _SOCKET_DIR_MAX - len(prefix) - 8:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _in_own_loop(fn: Callable[[], Awaitable[T]], timeout: float = TIMEOUT) -> T:
    """``trio.run(fn)`` in a new thread: callable from a trio thread too."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = trio.run(fn)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="kvpfs-testing-client", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive():
        raise TimeoutError(f"a XenStore conversation took more than {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _read_dump(dump: str | bytes | os.PathLike[str]) -> list[DumpedNode]:
    """Nodes from ``xenstore-ls -f -p`` text, or from a file holding it.

    A :class:`os.PathLike`, or a ``str`` without ``= "`` in it (which every dump
    line has), names a file; any other ``str`` or ``bytes`` is the text itself."""
    if isinstance(dump, os.PathLike) or (isinstance(dump, str) and '= "' not in dump):
        text = Path(dump).read_bytes().decode("latin-1")
    elif isinstance(dump, bytes):
        text = dump.decode("latin-1")
    else:
        text = dump
    return parse_dump(text)


def _guests_of(nodes: Iterable[DumpedNode]) -> dict[int, str]:
    """The guest domains a dump lays out (``/local/domain/N`` with N > 0)."""
    guests: dict[int, str] = {}
    for node in nodes:
        parts = node.path.split("/")
        if len(parts) >= 4 and parts[1:3] == ["local", "domain"] and parts[3].isdigit():
            domid = int(parts[3])
            if 0 < domid < 0x7FF0:
                if len(parts) == 5 and parts[4] == "name":
                    guests[domid] = node.value.decode("utf-8", "replace")
                else:
                    guests.setdefault(domid, f"guest{domid}")
    return guests


class Xenstored:
    """A xenstored that a test talks to: an embedded one, or a mount's.

    ``path`` is its privileged (dom0) socket; :attr:`env` is what a subprocess needs
    to use it (``subprocess.run(["xenstore-ls"], env={**os.environ, **xs.env})``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    @property
    def env(self) -> dict[str, str]:
        """``XENSTORED_PATH`` for the xenstore-* tools and libxenstore."""
        return {"XENSTORED_PATH": self.path}

    def setenv(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Export :attr:`env` for this test only (undone by ``monkeypatch``)."""
        monkeypatch.delenv("XENSTORED_RUNDIR", raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def domain_socket(self, domid: int) -> str:
        """A socket whose clients speak as the unprivileged guest ``domid``."""
        raise LookupError(
            f"{self!r} has no guest-domain sockets (a mount's xenstored has none; "
            "the kvpfs_xenstored fixture has them)"
        )

    def client(self, domid: int | None = None, **options: Any) -> XenStoreClient:
        """A trio client for ``async with``: as dom0, or as guest ``domid`` through
        its :meth:`domain_socket`.  ``options`` go to :class:`XenStoreClient`."""
        path = self.path if domid is None else self.domain_socket(domid)
        return XenStoreClient(path, **options)

    def run(self, fn: Callable[[XenStoreClient], Awaitable[T]], timeout: float = TIMEOUT) -> T:
        """``await fn(client)`` with a dom0 client, from synchronous code."""

        async def main() -> T:
            with trio.fail_after(timeout):
                async with XenStoreClient(self.path, reconnect=False) as client:
                    return await fn(client)

        return _in_own_loop(main, timeout)

    def load(self, dump: str | bytes | os.PathLike[str]) -> None:
        """Make the tree hold exactly what ``xenstore-ls -f -p`` printed: the text, or
        a file (a :class:`~pathlib.Path`, or a ``str`` that is no dump text)."""
        nodes = _read_dump(dump)
        self.run(lambda client: load_tree(client, nodes))

    def dump(self, root: str = "/") -> str:
        """The tree below ``root`` as ``xenstore-ls -f -p ROOT`` prints it."""
        return format_dump(self.run(lambda client: dump_tree(client, root)))

    def read(self, path: str) -> bytes:
        return self.run(lambda client: client.read(path))

    def write(self, path: str, value: bytes | str) -> None:
        self.run(lambda client: client.write(path, value))

    def exists(self, path: str) -> bool:
        return self.run(lambda client: client.exists(path))

    def rm(self, path: str) -> None:
        self.run(lambda client: client.rm(path))

    def introduce(self, domid: int, name: str | None = None) -> None:
        """Lay out guest ``domid`` as domain creation does (unless its home exists)
        and introduce it (``@introduceDomain`` fires if it was not introduced)."""

        async def fn(client: XenStoreClient) -> None:
            await create_domain(client, domid, name or f"guest{domid}")
            # No ring or event channel here; xenstored only requires a port above 0.
            await client.introduce(domid, 0, 1)

        self.run(fn)

    def release(self, domid: int) -> None:
        """Release guest ``domid`` as ``xl destroy`` leaves it: RELEASE (its own nodes
        go, ``@releaseDomain`` fires), then its home and ``/libxl/<domid>``."""

        async def fn(client: XenStoreClient) -> None:
            await client.release(domid)
            for path in (f"/local/domain/{domid}", f"/libxl/{domid}"):
                with contextlib.suppress(XenStoreError):
                    await client.rm(path)

        self.run(fn)


class EmbeddedXenstored(Xenstored):
    """kvpfs's embedded xenstored (cxenstored 4.17 compatible) on a private socket.

    ``domains`` maps guest domain ids to names (or lists ids, named ``guest<id>``):
    each is laid out as domain creation does, introduced, and gets a
    :meth:`domain_socket` (made at start only: list every guest a test talks as).
    The default is ``{1: "guest1"}``, as a kvpfs mount starts, or with ``load`` the
    guests of the dump.  ``load`` seeds the tree (see :meth:`Xenstored.load`);
    ``initial`` is the server's starting tree before that (``"xenstored"``: as
    cxenstored starts).
    """

    def __init__(
        self,
        *,
        domains: Mapping[int, str] | Iterable[int] | None = None,
        load: str | bytes | os.PathLike[str] | None = None,
        initial: str = "xenstored",
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        seed = None if load is None else _read_dump(load)
        if domains is None:
            guests = {1: "guest1"} if seed is None else _guests_of(seed)
        elif isinstance(domains, Mapping):
            guests = {int(d): str(n) for d, n in domains.items()}
        else:
            guests = {int(d): f"guest{int(d)}" for d in domains}
        for domid in guests:
            if not 0 < domid < 0x7FF0:
                raise ValueError(f"{domid} is not a guest domain id (1 to 32751)")
        self._own_dir = directory is None
        self.directory = short_tempdir("kvpfs-xs-") if directory is None else Path(directory)
        super().__init__(self.directory / "socket")
        self.domains = guests
        self.domain_sockets = {d: str(self.directory / f"domain{d}.sock") for d in guests}
        self._seed = seed
        self._initial = initial
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def domain_socket(self, domid: int) -> str:
        try:
            return self.domain_sockets[domid]
        except KeyError:
            raise LookupError(
                f"domain {domid} has no socket: sockets are made at start for the domains "
                f"given (@pytest.mark.kvpfs_xenstored(domains={{{domid}: 'name'}}) or "
                f"kvpfs_xenstored_factory(domains=...)); this one has "
                f"{sorted(self.domain_sockets) or 'none'}"
            ) from None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Serve, seed, lay out and introduce the domains; returns once it answers."""
        if self._thread is not None:
            raise RuntimeError("an EmbeddedXenstored starts once")
        self._thread = threading.Thread(target=self._serve, name="kvpfs-xenstored", daemon=True)
        self._thread.start()
        if not self._started.wait(TIMEOUT):
            raise RuntimeError("the embedded xenstored did not start")
        if self._error is not None:
            self._thread.join()
            raise self._error
        try:
            if self._seed is not None:
                nodes = self._seed
                self.run(lambda client: load_tree(client, nodes))
            for domid, name in self.domains.items():
                self.introduce(domid, name)
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            await nursery.start(
                functools.partial(
                    serve_xenstored, self.path, self.domain_sockets, initial=self._initial
                )
            )
            self._started.set()

    def stop(self) -> None:
        """Stop serving (its sockets go); raises what made the server fail, if anything."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._token is not None:
            cancel = self._cancel
            if cancel is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(cancel.cancel, trio_token=self._token)
        if thread is not None:
            thread.join(TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("the embedded xenstored did not stop")
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def mount_options(options: Mapping[str, object]) -> list[str]:
    """``-o`` items from keyword options: ``True`` is the bare word (``raw``),
    ``False`` and ``None`` leave it out, anything else is ``name=value``."""
    items = []
    for name, value in options.items():
        if value is True:
            items.append(name)
        elif value is not False and value is not None:
            items.append(f"{name}={value}")
    return items


class KvpfsMount:
    """``kvpfs embedded ROOT -f --kvp-dir DIR -o OPTIONS`` as a child process.

    ``base`` is a directory of its own that holds ``mnt/`` (the mountpoint,
    :attr:`root`), ``kvp/`` (the pools, unless ``kvp_dir`` is given), ``state/``
    (``XDG_STATE_HOME``) and ``kvpfs.log`` (the command's stderr, with ``-v``).
    ``options`` are mount options (see :func:`mount_options`); ``xenstore="off"``
    leaves :attr:`xenstored` None.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        kvp_dir: str | os.PathLike[str] | None = None,
        **options: object,
    ) -> None:
        self.base = Path(base)
        self.root = self.base / "mnt"
        self.kvp_dir = Path(kvp_dir).absolute() if kvp_dir is not None else self.base / "kvp"
        self.log_path = self.base / "kvpfs.log"
        self.options = dict(options)
        self.xenstored: Xenstored | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._runtime: Path | None = None
        self._signalled = False

    def __repr__(self) -> str:
        return f"<KvpfsMount {self.root}>"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "kvpfs", "embedded", str(self.root), "-f", "-v"]
        argv += ["--kvp-dir", str(self.kvp_dir)]
        items = mount_options(self.options)
        if items:
            argv += ["-o", ",".join(items)]
        return argv

    def log(self) -> str:
        """What the command wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = TIMEOUT) -> Self:
        """Mount; returns once the kernel lists the mount.  :class:`MountUnavailable`
        when the machine does not let the test mount; any other failure raises
        :class:`RuntimeError` with the command's error."""
        if self.process is not None:
            raise RuntimeError("a KvpfsMount starts once")
        reason = fuse_unavailable()
        if reason:
            raise MountUnavailable(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.kvp_dir.exists():
            create_pools(str(self.kvp_dir))
        state = self.base / "state"
        state.mkdir(exist_ok=True)
        self._runtime = short_tempdir("kvpfs-run-")
        env = command_env()
        env.pop("XENSTORED_PATH", None)
        env.pop("XENSTORED_RUNDIR", None)
        env["XDG_RUNTIME_DIR"] = str(self._runtime)
        env["XDG_STATE_HOME"] = str(state)
        with open(self.log_path, "ab") as log:
            # cwd "/": a test's working directory (perhaps in another mount) is not
            # held by the mount process.
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/"
            )
        deadline = time.monotonic() + timeout
        while mount_type(str(self.root)) != FSTYPE:
            status = self.process.poll()
            if status is not None:
                self._cleanup()
                self._failed(f"exited with status {status}")
            if time.monotonic() > deadline:
                self.stop(check=False)
                self._failed(f"did not mount within {timeout:.0f} s")
            time.sleep(0.01)
        try:
            facts = self.root / ".kvpfs"
            if (facts / "xenstored-path").exists():
                self.xenstored = Xenstored((facts / "xenstored-path").read_text().strip())
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def _failed(self, what: str) -> None:
        log = self.log().strip()
        for line in log.splitlines():
            # libfuse's own words: mount(2), then fusermount3, refused the mount.
            if any(
                f"mount failed: {os.strerror(code)}" in line for code in (errno.EPERM, errno.EACCES)
            ) or "failed to exec fusermount3" in line:
                raise MountUnavailable(f"no right to mount here ({line.strip()})")
        raise RuntimeError(
            f"kvpfs {what}: {' '.join(self.command)}\n{log or '(nothing on stderr)'}"
        )

    def stop(self, *, check: bool = True) -> None:
        """Unmount and wait for the process, whatever state the mount is in:
        ``kvpfs unmount``; if the process still serves (a file left open in the
        mount keeps a lazily detached mount alive) SIGTERM, then SIGKILL; a lazy
        unmount if the kernel still lists it.  Forcing is reported as a
        :class:`KvpfsMountWarning`; with ``check`` a process that ended with an
        error on its own (a crash) raises :class:`RuntimeError`."""
        process = self.process
        forced = []
        if process is not None and process.poll() is None and mounted_at(str(self.root)):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    [sys.executable, "-m", "kvpfs", "unmount", str(self.root)],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                    check=False, env=command_env(), cwd="/",
                )
        if process is not None:
            sent = []
            for signal_number, wait in ((None, _UNMOUNT_WAIT), (signal.SIGTERM, TIMEOUT)):
                if signal_number is not None:
                    sent.append(signal.Signals(signal_number).name)
                    self._signalled = True
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal_number)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
                    break
            else:
                sent.append("SIGKILL")
                process.kill()
                process.wait(TIMEOUT)
            if sent:
                forced.append(
                    "the kvpfs process did not end after `kvpfs unmount` (a file or "
                    f"directory still open in the mount?): sent {', '.join(sent)}"
                )
        if mounted_at(str(self.root)):
            force_unmount(str(self.root))
            forced.append("the mount was still listed: detached it lazily")
        self._cleanup()
        if forced:
            warnings.warn(KvpfsMountWarning(f"{self.root}: {'; '.join(forced)}"), stacklevel=2)
        if mounted_at(str(self.root)):
            raise RuntimeError(f"{self.root} is still mounted")
        status = None if process is None else process.returncode
        if check and not self._signalled and status not in (0, None):
            raise RuntimeError(
                f"the kvpfs process of {self.root} exited with status {status}; its log:\n"
                f"{self.log()}"
            )

    def _cleanup(self) -> None:
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def make_disk(self, name: str = "disk.img", size: int = 16 << 20) -> Path:
        """A sparse disk image of ``size`` bytes beside the mount (for :meth:`attach`)."""
        path = self.base / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def attach(
        self,
        target: str | os.PathLike[str] | None = None,
        *,
        domain: int | str = 1,
        vdev: str = "xvdb",
        access: str = "rw",
        spec: str | None = None,
    ) -> Path:
        """Attach a disk through ``vbd/attach`` (a new image if ``target`` is None, or
        any xl disk ``spec``) and return its ``vbd/xbdback<domid>i<devid>`` directory.
        The write returns once the backend reports the disk connected; a refusal is
        the OSError ``write(2)`` gave."""
        vbd = self.root / "vbd"
        if spec is None:
            image = self.make_disk(f"{vdev}.img") if target is None else Path(target)
            spec = f"format=raw, vdev={vdev}, access={access}, target={image}"
        before = set(os.listdir(vbd))
        with open(vbd / "attach", "w") as f:
            f.write(f"{domain} {spec}\n")
        added = sorted(set(os.listdir(vbd)) - before - {"attach"})
        if len(added) != 1:
            raise RuntimeError(f"attach made {added or 'nothing'} in {vbd}")
        return vbd / added[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(check=exc_type is None)
