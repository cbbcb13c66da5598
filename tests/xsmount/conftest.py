"""Mounting the ``xenstore`` view against the embedded server and cxenstored 4.17.

Fixtures from ``tests/xenstore/conftest.py`` provide the servers (``xenstored`` is
parametrized over both); ``xsmount`` mounts a :class:`XenStoreView` on one of
them through the kernel, counting every request the mount sends on the wire.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from kvpfs.fs.mount import Session
from kvpfs.fs.operations import FsOptions
from kvpfs.xenstore.protocol import Decoder, Op
from kvpfs.xenstore.view import XenStoreView
from tests.conftest import MountFactory
from tests.mounting import in_thread, sh
from tests.xenstore.conftest import (  # noqa: F401 - fixtures used by this directory
    EmbeddedServer,
    RealDaemon,
    ServerPath,
    dump_tree,
    embedded_factory,
    fakexen_so,
    xenstored,
    xenstored_embedded,
    xenstored_guests,
    xenstored_real,
)

#: vim as an editor runs: no vimrc, no viminfo, no swap-file prompts, and a
#: backup even though the mount lives under /tmp.
VIM = "vim -N -u NONE -i NONE -n --cmd 'set backupskip='"

Dump = list[tuple[bytes, bytes, bytes, bytes]]


class CountingStream(trio.abc.Stream):
    """A client stream that records every request frame sent: (op name, path)."""

    def __init__(self, inner: trio.abc.Stream, log: list[tuple[str, str]]) -> None:
        self._inner = inner
        self._log = log
        self._decoder = Decoder()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.feed(bytes(data))
        for msg in self._decoder:
            try:
                name = Op(msg.type).name
            except ValueError:
                name = str(msg.type)
            self._log.append((name, msg.payload.split(b"\0", 1)[0].decode(errors="replace")))
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class XsMount:
    session: Session
    backend: XenStoreView
    server: str
    #: Every request the mount sent, in order: (op name, first argument).
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dir(self) -> str:
        return f"{self.session.mountpoint}/xenstore"

    def counts(self, since: int = 0) -> Counter[tuple[str, str]]:
        return Counter(self.requests[since:])

    async def settle(self) -> None:
        """Wait until pushed invalidations reached the kernel."""
        await self.session.ops.invalidator.settle()


XsMountFactory = Callable[..., Awaitable[XsMount]]


@pytest.fixture
async def xsmount(mount: MountFactory) -> AsyncIterator[XsMountFactory]:
    """``await xsmount(server_path, options=FsOptions(...), **backend_options)``."""

    async def factory(
        server: str, options: FsOptions | None = None, **backend_options: Any
    ) -> XsMount:
        requests: list[tuple[str, str]] = []

        async def connect() -> trio.abc.Stream:
            return CountingStream(await trio.open_unix_socket(server), requests)

        backend = XenStoreView(connect=connect, **backend_options)
        session = await mount([backend], options)
        return XsMount(session, backend, server, requests)

    yield factory


def xs_env(server: str) -> dict[str, str]:
    return {"XENSTORED_PATH": server}


async def xs(server: str, *argv: str, check: bool = True) -> bytes:
    """Run one xenstore-* command against ``server``; its stdout."""
    return (await sh(list(argv), env=xs_env(server), check=check)).stdout


async def xs_write(server: str, *pairs: str) -> None:
    await xs(server, "xenstore-write", *pairs)


async def dump(server: str) -> Dump:
    """Every node with value, permissions and generation (raw protocol, own thread)."""
    return await in_thread(dump_tree, server)


def errno_of(fn: Callable[..., object], *args: object) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


# --------------------------------------------------------------------------- restartable


class Restartable:
    """A server that a test can kill and start again on the same socket path."""

    def __init__(self, kind: str, shim: Path | None) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix="rxs-"))
        self._shim = shim
        self._embedded: EmbeddedServer | None = None
        self._real: RealDaemon | None = None
        self.path = str(self.dir / ("socket" if kind == "real" else "xs.sock"))

    def start(self) -> None:
        if self.kind == "real":
            assert self._shim is not None
            self._real = RealDaemon(self._shim, self.dir)
            self._real.start()
        else:
            self._embedded = EmbeddedServer(self.dir, guests=())
            self._embedded.start()

    def kill(self) -> None:
        if self._real is not None:
            self._real.stop()
            self._real = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    @property
    def pid(self) -> int | None:
        return self._real.proc.pid if self._real is not None and self._real.proc else None

    def close(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["embedded", "real"])
def restartable(request: pytest.FixtureRequest) -> Iterator[Restartable]:
    shim: Path | None = None
    if request.param == "real":
        shim = request.getfixturevalue("fakexen_so")
    server = Restartable(request.param, shim)
    try:
        server.start()
        yield server
    finally:
        server.close()


def node_paths(d: Dump) -> list[str]:
    return [p.decode() for p, *_ in d]


def mount_paths(root: str) -> list[str]:
    """Every path below ``root`` as XenStore paths (walked in a worker thread)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        base = "" if rel == "." else "/" + rel
        out += [f"{base}/{n}" for n in dirnames + filenames]
    return out
