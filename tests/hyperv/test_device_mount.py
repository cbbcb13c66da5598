"""The emulated device through the kernel: one kvpfs mount with vmbus/, host/ and kvp/.

A daemon written here in Python (in a worker thread or a child process) uses the
device file exactly as hv_kvp_daemon does: open, register, read, reply.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from kvpfs.fs.mount import Session
from kvpfs.kvp.location import create_pools
from kvpfs.kvp.view import KvpView
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import KvpDevice
from kvpfs.peers.hyperv.host import KvpHost
from kvpfs.peers.hyperv.view import HostView, VmbusView
from tests.mounting import in_thread

from .fakedaemon import FakeDaemon

pytestmark = pytest.mark.mount


class Rig:
    def __init__(self, session: Session, device: KvpDevice, host: KvpHost) -> None:
        self.session = session
        self.device = device
        self.host = host
        self.dev = f"{session.mountpoint}/vmbus/hv_kvp"

    def path(self, *parts: str) -> str:
        return os.path.join(self.session.mountpoint, *parts)


async def start(mount, tmp_path: Path) -> Rig:  # type: ignore[no-untyped-def]
    pools = tmp_path / "pools"
    create_pools(str(pools))
    device = KvpDevice(timeout=2.0, release_grace=0.5)
    host = KvpHost(device, connect_timeout=1.0)
    session = await mount([KvpView(str(pools)), HostView(host), VmbusView(device)])
    return Rig(session, device, host)


def thread_daemon(path: str, stop: threading.Event, served: list[int]) -> str:
    """A blocking daemon through the kernel; returns how it ended."""
    model = FakeDaemon(KvpDevice())  # only its pool logic is used
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, m.encode(m.RegisterMessage()))
        os.read(fd, m.MSG_SIZE)
        while not stop.is_set():
            try:
                data = os.read(fd, m.MSG_SIZE)
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, "?")
            status, reply = model.handle(m.decode_request(data))
            os.write(fd, m.encode(reply, error=status))
            served.append(data[0])
        return "stopped"
    finally:
        os.close(fd)


async def test_device_node(mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = await start(mount, tmp_path)
    st = await in_thread(os.stat, rig.dev)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
    assert await in_thread(os.listdir, rig.path("vmbus")) == ["hv_kvp"]

    def two_opens() -> tuple[int, float]:
        fd = os.open(rig.dev, os.O_RDWR)
        try:
            started = time.monotonic()
            try:
                os.close(os.open(rig.dev, os.O_RDWR))
            except OSError as exc:
                return exc.errno or 0, time.monotonic() - started
            return 0, 0.0
        finally:
            os.close(fd)

    err, waited = await in_thread(two_opens)
    assert err == errno.EBUSY and 0.4 < waited < 3


async def test_host_view_through_a_daemon_in_a_thread(mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = await start(mount, tmp_path)
    stop = threading.Event()
    served: list[int] = []
    async with trio.open_nursery() as nursery:
        ended: list[str] = []

        async def daemon() -> None:
            ended.append(await in_thread(thread_daemon, rig.dev, stop, served, timeout=30))

        nursery.start_soon(daemon)
        await rig.device.wait_registered()

        def session() -> tuple[list[str], str]:
            with open(rig.path("host", "external", "Key"), "w") as f:
                f.write("value\n")
            with open(rig.path("host", "external", "Key")) as f:
                value = f.read()
            return os.listdir(rig.path("host", "external")), value

        listing, value = await in_thread(session)
        assert listing == ["Key"] and value == "value\n"
        assert await in_thread(os.listdir, rig.path("host", "auto")) == [
            "FullyQualifiedDomainName",
            "OSName",
        ]
        stop.set()
        # Wake the daemon's read with one more request, as the host would.
        await rig.host.enumerate(2, 0)
    assert ended == ["stopped"]
    with trio.fail_after(5):
        await rig.device.wait_closed()


async def test_shutdown_wakes_a_blocked_reader(mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = await start(mount, tmp_path)
    stop = threading.Event()
    async with trio.open_nursery() as nursery:
        ended: list[str] = []

        async def daemon() -> None:
            ended.append(await in_thread(thread_daemon, rig.dev, stop, [], timeout=10))

        nursery.start_soon(daemon)
        await rig.device.wait_registered()
        await trio.sleep(0.1)  # blocked in read now
        rig.device.shutdown()
    assert ended == ["EBADF"]
    assert await in_thread(lambda: _errno(os.open, rig.dev, os.O_RDWR)) == errno.EBADF
    started = time.monotonic()
    with trio.fail_after(10):
        await rig.session.stop()
    assert time.monotonic() - started < 2


def _errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        os.close(fn(*args))
    except OSError as exc:
        return exc.errno or 0
    return 0


CLIENT = """
import os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NONBLOCK)
os.write(fd, bytes([100]) + bytes(7431))
poller = select.poll()
poller.register(fd, select.POLLIN)
assert poller.poll(5000)
os.read(fd, 7432)
print("registered", flush=True)
while True:
    poller.poll(-1)
    os.read(fd, 7432)
"""


async def test_killed_opener_releases_the_device(mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = await start(mount, tmp_path)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT, rig.dev], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            assert b"registered" in await process.stdout.receive_some(100)
            await rig.device.wait_registered()
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(5):
            await process.wait()
            await rig.device.wait_closed()
        assert not rig.device.registered
        # A new opener is not refused (not even right after the kill).
        assert await in_thread(_errno, os.open, rig.dev, os.O_RDWR) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_poll_through_the_kernel(mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = await start(mount, tmp_path)

    def client() -> list[int]:
        fd = os.open(rig.dev, os.O_RDWR | os.O_NONBLOCK)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLOUT)
            idle = [ev for _, ev in poller.poll(100)]
            os.write(fd, m.encode(m.RegisterMessage()))
            ready = [ev for _, ev in poller.poll(2000)]
            os.read(fd, m.MSG_SIZE)
            return [*idle, -1, *ready]
        finally:
            os.close(fd)

    events = await in_thread(client)
    # Nothing at all while idle (the device never reports POLLOUT), POLLIN once queued.
    assert events[0] == -1 and events[1] & select.POLLIN
