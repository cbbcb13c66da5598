"""STREAM nodes behave like a character device: blocking reads, poll, no buffering."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import Node, NodeKind, Path, Stream, View
from tests.mounting import in_thread

pytestmark = pytest.mark.mount


@dataclass(eq=False)
class QueueStream(Stream):
    owner: DeviceBackend
    flags: int

    async def read(self, size: int) -> bytes:
        if size < 8:
            raise FsError(errno.EINVAL)
        if not self.owner.queue and self.flags & os.O_NONBLOCK:
            raise FsError(errno.EAGAIN)
        while not self.owner.queue:
            await self.owner.changed.wait()
        return self.owner.queue.pop(0)

    async def write(self, data: bytes) -> int:
        self.owner.written.append(data)
        return len(data)

    def poll(self, wake: Callable[[], None] | None) -> int:
        if self.owner.queue:
            return select.POLLIN | select.POLLOUT
        self.owner.wake = wake
        return select.POLLOUT

    async def release(self) -> None:
        self.owner.open = False


@dataclass(eq=False)
class DeviceBackend(View):
    name: str = "dev"
    queue: list[bytes] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    wake: Callable[[], None] | None = None
    open: bool = False

    def push(self, data: bytes) -> None:
        self.queue.append(data)
        self.changed.set()
        self.changed = trio.Event()
        if self.wake is not None:
            self.wake()
            self.wake = None

    async def lookup(self, path: Path) -> Node:
        if path == ():
            return Node(NodeKind.DIR)
        if path == ("device",):
            return Node(NodeKind.STREAM, writable=True)
        raise FsError(errno.ENOENT)

    async def listdir(self, path: Path) -> list[tuple[str, Node]]:
        return [("device", await self.lookup(("device",)))]

    async def read(self, path: Path) -> bytes:
        raise FsError(errno.EINVAL)

    async def open_stream(self, path: Path, flags: int) -> Stream:
        if self.open:
            raise FsError(errno.EBUSY)
        self.open = True
        return QueueStream(self, flags)


async def test_blocking_read_poll_and_one_opener(mount) -> None:
    dev = DeviceBackend()
    s = await mount([dev])
    path = f"{s.mountpoint}/dev/device"

    def session() -> tuple[bytes, int, int, bytes]:
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                os.open(path, os.O_RDWR)
                second = 0
            except OSError as exc:
                second = exc.errno or 0
            os.write(fd, b"register")
            first = os.read(fd, 64)  # blocks until the test pushes
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            idle = len(poller.poll(100))
            ready = poller.poll(5000)  # woken by a push
            return first, second, idle + 10 * len(ready), os.read(fd, 64)
        finally:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        result: list[tuple[bytes, int, int, bytes]] = []

        async def run() -> None:
            result.append(await in_thread(session))

        nursery.start_soon(run)
        with trio.fail_after(5):
            while not dev.written:
                await trio.sleep(0.01)
        dev.push(b"message1")
        await trio.sleep(0.3)
        dev.push(b"message2")
    first, second, polls, last = result[0]
    assert first == b"message1"
    assert second == errno.EBUSY
    assert polls == 10  # nothing ready for 100 ms, then woken by the push
    assert last == b"message2"
    assert dev.written == [b"register"]
    with trio.fail_after(5):
        while dev.open:
            await trio.sleep(0.01)


async def test_nonblocking_read_is_eagain(mount) -> None:
    dev = DeviceBackend()
    s = await mount([dev])

    def read_nonblocking() -> int:
        fd = os.open(f"{s.mountpoint}/dev/device", os.O_RDWR | os.O_NONBLOCK)
        try:
            os.read(fd, 64)
        except OSError as exc:
            return exc.errno or 0
        finally:
            os.close(fd)
        return 0

    assert await in_thread(read_nonblocking) == errno.EAGAIN
