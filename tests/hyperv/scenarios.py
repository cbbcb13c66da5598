"""Scenarios against the real hv_kvp_daemon, run by :mod:`tests.hyperv.realenv`.

Each scenario gets a running :class:`kvpfs.peers.hyperv.hostsim.Environment`: the daemon
has registered and the host has set its initial pool-3 items.  The scenario runs
on the thread that serves the mount, so every access to the mount goes through a
worker thread (:func:`fs`); the pool files themselves sit on a private tmpfs
and are read directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import select
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from kvpfs.kvp.location import pool_path
from kvpfs.kvp.names import key_to_name
from kvpfs.kvp.records import Record, encode_record, parse
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import DeviceState
from kvpfs.peers.hyperv.host import HostError, status_errno
from kvpfs.peers.hyperv.hostsim import POOL_DIR, Environment, default_items
from tests.mounting import in_thread

T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Environment], Awaitable[None]]
    kernel_timeout: float = 30.0
    time_limit: float = 60.0
    #: ``--nic`` options over the default eth0.
    nics: tuple[str, ...] = ()


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    *, kernel_timeout: float = 30.0, time_limit: float = 60.0, nics: tuple[str, ...] = ()
) -> Callable[[Callable[[Environment], Awaitable[None]]], Callable[[Environment], Awaitable[None]]]:
    def register(
        fn: Callable[[Environment], Awaitable[None]],
    ) -> Callable[[Environment], Awaitable[None]]:
        SCENARIOS[fn.__name__] = Scenario(fn, kernel_timeout, time_limit, nics)
        return fn

    return register


# -- helpers ----------------------------------------------------------------------------


async def fs(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn`` in a worker thread: it may touch the mount."""
    return await in_thread(fn, *args)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def errno_of(fn: Callable[..., object], *args: Any) -> int:
    """The errno ``fn`` fails with (0 if it does not fail)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def pool_records(number: int) -> list[Record]:
    with open(pool_path(POOL_DIR, number), "rb") as f:
        return parse(f.read())


def pool_bytes(number: int) -> bytes:
    with open(pool_path(POOL_DIR, number), "rb") as f:
        return f.read()


def initial_records() -> list[Record]:
    return [Record(k.encode(), v.encode()) for k, v in default_items()[3].items()]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.02)


def append_records(number: int, records: list[tuple[bytes, bytes]]) -> None:
    """Append as cloud-init does: O_APPEND and flock (kvpfs takes flock too)."""
    with open(pool_path(POOL_DIR, number), "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        for key, value in records:
            f.write(encode_record(key, value))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


_OFD_WRITE = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_OFD_UNLOCK = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


class PoolLock:
    """An OFD write lock on a pool file: the daemon waits for it in every request."""

    def __init__(self, number: int) -> None:
        self.fd = os.open(pool_path(POOL_DIR, number), os.O_RDWR | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _OFD_WRITE)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _OFD_UNLOCK)
            os.close(self.fd)
            self.fd = -1


async def wait_delivered(env: Environment) -> None:
    """Until the daemon has read the request in flight."""
    with trio.fail_after(5):
        while not (env.device.state is DeviceState.REQUEST and env.device.delivered):
            await trio.sleep(0.005)


def os_release() -> dict[str, str]:
    result = {}
    with open("/etc/os-release", encoding="utf-8") as f:
        for line in f:
            name, sep, value = line.strip().partition("=")
            if sep and not name.startswith("#"):
                result[name] = value.strip("\"'")
    return result


# -- host SET and DELETE, seen from the guest ----------------------------------------------


@scenario()
async def set_and_delete(env: Environment) -> None:
    host = env.host
    kvp = env.path("kvp")
    assert pool_records(3) == initial_records()
    assert [p for p in range(5) if p != 3 and pool_bytes(p)] == []

    await host.set(0, "HostKey1", "HostValue1")
    await host.set(0, "unicode ключ ✓", "välue 😀")
    await host.set(0, "Counter", 42)  # REG_U32: the kernel makes it decimal text
    await host.set(0, "Big", 1 << 40)  # REG_U64
    await host.set(3, "VirtualMachineName", "renamed-vm")
    await host.set(3, "HostingSystemEditionId", "8")
    assert pool_records(0) == [
        Record(b"HostKey1", b"HostValue1"),
        Record("unicode ключ ✓".encode(), "välue 😀".encode()),
        Record(b"Counter", b"42"),
        Record(b"Big", str(1 << 40).encode()),
    ]
    expected3 = [
        r if r.key != b"VirtualMachineName" else Record(r.key, b"renamed-vm")
        for r in initial_records()
    ] + [Record(b"HostingSystemEditionId", b"8")]
    assert pool_records(3) == expected3
    assert len(pool_bytes(0)) == 4 * 2560

    # The guest's view: the files appear at once, with the values.
    assert await fs(read_text, f"{kvp}/external/HostKey1") == "HostValue1\n"
    name = key_to_name("unicode ключ ✓".encode())
    assert await fs(read_text, f"{kvp}/external/{name}") == "välue 😀\n"
    assert await fs(read_text, f"{kvp}/external/Counter") == "42\n"
    assert await fs(read_text, f"{kvp}/auto_external/VirtualMachineName") == "renamed-vm\n"
    listed = await fs(os.listdir, f"{kvp}/auto_external")
    assert sorted(listed) == sorted(r.key.decode() for r in expected3)

    # A modify in place keeps the record's position; DELETE shifts the later ones up.
    await host.set(0, "HostKey1", "v")
    assert pool_records(0)[0] == Record(b"HostKey1", b"v")
    await host.delete(0, "HostKey1")
    assert [r.key for r in pool_records(0)] == [
        name.encode() for name in ("unicode ключ ✓", "Counter", "Big")
    ]
    assert len(pool_bytes(0)) == 3 * 2560

    async def gone() -> bool:
        return not await fs(os.path.exists, f"{kvp}/external/HostKey1")

    await eventually(gone)
    await host.delete(3, "HostingSystemEditionId")
    assert pool_records(3) == [
        r if r.key != b"VirtualMachineName" else Record(r.key, b"renamed-vm")
        for r in initial_records()
    ]

    # DELETE of a key that is not there: the daemon's HV_S_CONT, ENOENT.
    try:
        await host.delete(0, "HostKey1")
    except HostError as exc:
        assert (exc.errno, exc.status) == (errno.ENOENT, m.Status.S_CONT)
    else:
        raise AssertionError("DELETE of a missing key succeeded")

    # The same through the mount: writing host/external/K is a SET, rm a DELETE.
    await fs(write_text, env.path("host", "external", "ViaFile"), "from the host view\n")
    assert pool_records(0)[-1] == Record(b"ViaFile", b"from the host view")
    assert await fs(read_text, f"{kvp}/external/ViaFile") == "from the host view\n"
    assert await fs(read_text, env.path("host", "external", "ViaFile")) == "from the host view\n"
    await fs(write_text, env.path("host", "auto_external", "HostName"), "other-host\n")
    assert Record(b"HostName", b"other-host") in pool_records(3)
    await fs(
        os.rename, env.path("host", "external", "ViaFile"), env.path("host", "external", "Moved")
    )
    assert [r.key for r in pool_records(0)][-1] == b"Moved"
    assert b"ViaFile" not in [r.key for r in pool_records(0)]
    await fs(os.unlink, env.path("host", "external", "Moved"))
    assert b"Moved" not in [r.key for r in pool_records(0)]
    assert await fs(errno_of, os.unlink, env.path("host", "external", "Moved")) == errno.ENOENT


@scenario()
async def guest_to_host(env: Environment) -> None:
    host = env.host
    kvp = env.path("kvp")
    await fs(write_text, f"{kvp}/guest/GuestKey", "hello host\n")
    await fs(write_text, f"{kvp}/guest/{key_to_name('ĝuest/kéy'.encode())}", "ünïcode\n")
    result = await host.items(1)
    assert result.complete
    assert result.items == [("GuestKey", "hello host"), ("ĝuest/kéy", "ünïcode")]
    assert await fs(os.listdir, env.path("host", "guest")) == [
        "GuestKey",
        key_to_name("ĝuest/kéy".encode()),
    ]
    assert await fs(read_text, env.path("host", "guest", "GuestKey")) == "hello host\n"
    # The host reads, it does not write the guest pool.
    assert await fs(errno_of, write_text, env.path("host", "guest", "GuestKey"), "x") == errno.EROFS
    assert await fs(errno_of, os.unlink, env.path("host", "guest", "GuestKey")) == errno.EROFS

    # A record appended by another process is in the very next enumeration.
    await trio.to_thread.run_sync(append_records, 1, [(b"Appended", b"by a peer")])
    assert await host.find(1, "Appended") == "by a peer"
    await fs(os.unlink, f"{kvp}/guest/GuestKey")
    assert await host.find(1, "GuestKey") is None
    assert await fs(errno_of, read_text, env.path("host", "guest", "GuestKey")) == errno.ENOENT

    # Only 254 UTF-16 units of a key and 1022 of a value reach the host.
    long_key, long_value = b"k" * 300, "é".encode() * 1023
    await trio.to_thread.run_sync(append_records, 1, [(long_key, long_value)])
    items = dict((await host.items(1)).items)
    assert items["k" * 254] == "é" * 1022
    # An item that is not UTF-8 ends the host's enumeration there: later ones vanish.
    await trio.to_thread.run_sync(
        append_records, 1, [(b"bad\xff", b"x"), (b"AfterBad", b"invisible")]
    )
    result = await host.items(1)
    assert not result.complete and result.end_status == m.Status.E_FAIL
    assert [key for key, _ in result.items][-1] == "k" * 254
    assert "AfterBad" not in await fs(os.listdir, env.path("host", "guest"))
    assert "AfterBad" in await fs(os.listdir, f"{kvp}/guest")


@scenario()
async def auto_pool(env: Environment) -> None:
    names = [
        "FullyQualifiedDomainName",
        "IntegrationServicesVersion",
        "NetworkAddressIPv4",
        "NetworkAddressIPv6",
        "OSBuildNumber",
        "OSName",
        "OSMajorVersion",
        "OSMinorVersion",
        "OSVersion",
        "ProcessorArchitecture",
    ]
    assert await fs(os.listdir, env.path("host", "auto")) == names
    result = await env.host.items(2)
    assert result.complete and [k for k, _ in result.items] == names
    values = dict(result.items)
    uname = platform.uname()
    release = os_release()
    assert values["IntegrationServicesVersion"] == "3.1"
    assert values["OSName"] == release.get("NAME", uname.system)
    assert values["OSMajorVersion"] == release.get("VERSION_ID", "")
    assert values["OSBuildNumber"] == uname.release
    assert values["OSVersion"] == uname.release.split("-")[0]
    assert values["ProcessorArchitecture"] == uname.machine
    assert values["FullyQualifiedDomainName"]
    assert await fs(read_text, env.path("host", "auto", "OSName")) == values["OSName"] + "\n"
    # The pool file stays empty: the daemon makes the answers up.
    assert pool_bytes(2) == b""
    assert await env.host.enumerate(2, 10) is None
    # The host does not write it.
    for call in (env.host.set(2, "OSName", "x"), env.host.delete(2, "OSName")):
        try:
            await call
        except HostError as exc:
            assert exc.errno == errno.EROFS and exc.status is None
        else:
            raise AssertionError("the host wrote the auto pool")
    assert await fs(errno_of, os.unlink, env.path("host", "auto", "OSName")) == errno.EROFS
    assert await fs(errno_of, write_text, env.path("host", "auto", "New"), "x") == errno.EROFS


@scenario()
async def refusals_and_status_codes(env: Environment) -> None:
    host = env.host
    ext = env.path("host", "external")

    async def raw(message: m.Message) -> int:
        exchange = await host.exchange(raw=m.encode(message), op=message.op)
        assert exchange.daemon_reply is not None and not exchange.failure
        return exchange.reply.status

    # Messages the kernel never builds: the daemon's own size check says HV_S_CONT.
    status = await raw(m.KeyValueMessage(m.Op.SET, 0, b"k", b"v", 600, 2))
    assert status == m.Status.S_CONT and status_errno(m.Op.SET, status) == errno.EMSGSIZE
    status = await raw(m.KeyValueMessage(m.Op.SET, 0, b"k", b"v", 2, 2049))
    assert status == m.Status.S_CONT
    assert await raw(m.KeyValueMessage(m.Op.SET, 0, b"k" * 511, b"v", 512, 2)) == m.Status.OK
    assert pool_records(0) == [Record(b"k" * 511, b"v")]
    assert await raw(m.DeleteMessage(0, b"missing", 8)) == m.Status.S_CONT
    assert await raw(m.EnumerateMessage(4, 0)) == m.Status.S_CONT
    # An operation the daemon does not know: it answers HV_S_OK and does nothing.
    assert await raw(m.OtherMessage(7, 0)) == m.Status.OK
    # The Linux daemon does not refuse the auto pool (only the host does): the record
    # lands in .kvp_pool_2, and the host still gets the synthesised items.
    assert await raw(m.KeyValueMessage(m.Op.SET, 2, b"Injected", b"x", 9, 2)) == m.Status.OK
    assert pool_records(2) == [Record(b"Injected", b"x")]
    assert (await host.enumerate(2, 0) or ("", ""))[0] == "FullyQualifiedDomainName"
    assert await raw(m.DeleteMessage(2, b"Injected", 9)) == m.Status.OK

    # GET: status 0 for a present key, but the value never arrives (the GET quirk).
    await host.set(0, "Present", "some value")
    assert await host.get(0, "Present") == ""
    try:
        await host.get(0, "Absent")
    except HostError as exc:
        assert exc.errno == errno.ENOENT and exc.status == m.Status.S_CONT
    else:
        raise AssertionError("GET of a missing key succeeded")

    # The host's refusals: nothing reaches the daemon.
    before = host.requests
    for pool, key, value, err in [
        (1, "k", "v", errno.EROFS),
        (2, "k", "v", errno.EROFS),
        (4, "k", "v", errno.EROFS),
        (9, "k", "v", errno.EINVAL),
        (0, "k" * 256, "v", errno.ENAMETOOLONG),
        (0, "k", "v" * 1024, errno.EFBIG),
        (0, "k\0", "v", errno.EINVAL),
    ]:
        try:
            await host.set(pool, key, value)
        except HostError as exc:
            assert exc.errno == err, (pool, key[:10], exc)
        else:
            raise AssertionError(f"SET {pool} {key[:10]!r} succeeded")
    assert host.requests == before

    # The kernel's truncation: a key cut to 511 UTF-8 bytes, a value to 2047, a
    # character that does not fit skipped and a later ASCII one still kept.
    await host.set(0, "€" * 200, "€" * 682 + "€ab")
    stored = pool_records(0)[-1]
    assert stored == Record(("€" * 170).encode(), ("€" * 682 + "a").encode())
    # Read back by the host: at most 254 / 1022 UTF-16 units.
    assert await host.find(0, "€" * 170) == "€" * 682 + "a"

    # Through the mount, what the kernel would cut is refused instead.
    # (A refused create leaves the kernel a dentry for up to attr_timeout: one name each.)
    cases = [
        ("k" * 256, "v", errno.ENAMETOOLONG),
        ("€" * 171, "v", errno.ENAMETOOLONG),
        ("k1", "v" * 1024, errno.EFBIG),
        ("k2", "€" * 683, errno.EFBIG),
        ("%ff", "v", errno.EILSEQ),
    ]
    for name, value, err in cases:
        got = await fs(errno_of, write_text, f"{ext}/{name}", value)
        assert got == err, (name[:10], got)
    assert await fs(errno_of, write_bytes, f"{ext}/k3", b"\xff") == errno.EILSEQ
    assert not {b"k1", b"k2", b"k3"} & {r.key for r in pool_records(0)}
    # Exactly at the limits it goes through (value 1023 units of ASCII, 2046 bytes of €).
    await fs(write_text, f"{ext}/AtLimit", "v" * 1023)
    assert pool_records(0)[-1] == Record(b"AtLimit", b"v" * 1023)
    await fs(write_text, f"{ext}/{'€' * 170}", "€" * 682)
    # The guest side keeps all 1023 bytes, the host reads back 1022 units.
    assert await fs(read_text, env.path("kvp", "external", "AtLimit")) == "v" * 1023 + "\n"
    assert await fs(read_text, f"{ext}/AtLimit") == "v" * 1022 + "\n"

    # A second opener of the device while the daemon holds it: EBUSY.
    assert await fs(errno_of, os.open, "/dev/vmbus/hv_kvp", os.O_RDWR) == errno.EBUSY


# -- the daemon going away ---------------------------------------------------------------


@scenario()
async def daemon_restart(env: Environment) -> None:
    host = env.host
    await host.set(0, "Before", "1")
    daemon = env.daemon
    assert daemon is not None
    env.daemon = None  # ours to kill now
    daemon.kill()
    await daemon.wait()
    with trio.fail_after(5):
        await env.device.wait_closed()
    assert not env.device.registered

    # A request made while no daemon is registered waits for the next one.
    done: list[float] = []

    async def late_set() -> None:
        await host.set(0, "WhileDown", "2")
        done.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_set)
        await trio.sleep(0.3)
        assert not done
        started = time.monotonic()
        await env.start_daemon()
        await env.wait_ready(registrations=2)
    assert done and done[0] >= started
    assert env.device.registrations == 2
    assert [r.key for r in pool_records(0)] == [b"Before", b"WhileDown"]
    # The host does not send its initial items again (Hyper-V does not either).
    assert pool_records(3) == initial_records()

    # Killed in the middle of a request: the host gets HV_E_FAIL (EIO) at once.
    lock = PoolLock(0)
    failed: list[HostError] = []

    async def blocked_set() -> None:
        try:
            await host.set(0, "Interrupted", "3")
        except HostError as exc:
            failed.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_set)
            await wait_delivered(env)
            daemon = env.daemon
            assert daemon is not None
            env.daemon = None
            with trio.fail_after(5):
                daemon.kill()
                await daemon.wait()
    finally:
        lock.release()
    assert failed and failed[0].errno == errno.EIO and failed[0].status == m.Status.E_FAIL
    await env.start_daemon()
    await env.wait_ready(registrations=3)
    await host.set(0, "After", "4")
    assert [r.key for r in pool_records(0)] == [b"Before", b"WhileDown", b"After"]
    assert await fs(read_text, env.path("kvp", "external", "After")) == "4\n"

    # No daemon at all: the host gives up after its connect timeout (ENOTCONN).
    await env.stop_daemon()
    with trio.fail_after(5):
        await env.device.wait_closed()
    host.connect_timeout = 0.3
    try:
        await host.set(0, "Nobody", "5")
    except HostError as exc:
        assert exc.errno == errno.ENOTCONN and exc.status == m.Status.DEVICE_NOT_CONNECTED
    else:
        raise AssertionError("a request without a daemon succeeded")
    started = time.monotonic()
    got = await fs(errno_of, os.listdir, env.path("host", "external"))
    assert got == errno.ENOTCONN and time.monotonic() - started < 3


@scenario(kernel_timeout=1.0)
async def kernel_timeout(env: Environment) -> None:
    host = env.host
    lock = PoolLock(0)
    started = time.monotonic()
    try:
        await host.set(0, "Slow", "late")
    except HostError as exc:
        assert exc.errno == errno.EIO and exc.status == m.Status.E_FAIL
    else:
        raise AssertionError("the request did not time out")
    finally:
        elapsed = time.monotonic() - started
        lock.release()
    assert 0.9 < elapsed < 3, elapsed
    # The daemon finishes the SET anyway; its late reply is refused (EINVAL), and it
    # closes and reopens the device and registers again.
    await env.wait_ready(registrations=2)
    assert any("write failed" in line for line in env.syslog.lines), env.syslog.lines
    assert pool_records(0) == [Record(b"Slow", b"late")]
    await host.set(0, "Next", "in time")
    assert [r.key for r in pool_records(0)] == [b"Slow", b"Next"]


@scenario()
async def nonblocking_client(env: Environment) -> None:
    """A libhvee-style client (O_NONBLOCK, poll with a timeout) in place of the daemon."""
    await env.stop_daemon()
    with trio.fail_after(5):
        await env.device.wait_closed()

    def client() -> list[object]:
        seen: list[object] = []
        fd = os.open("/dev/vmbus/hv_kvp", os.O_RDWR | os.O_NONBLOCK)
        try:
            seen.append(errno_of(os.read, fd, m.MSG_SIZE))  # nothing queued yet
            os.write(fd, m.encode(m.RegisterMessage()))
            poller = select.poll()
            poller.register(fd, 1)
            seen.append(bool(poller.poll(2000)))
            answer = m.decode_request(os.read(fd, m.MSG_SIZE), registration=True)
            seen.append(answer)
            seen.append(len(poller.poll(200)))  # nothing pending: the poll times out
            assert poller.poll(5000)  # woken by the host's request
            request = m.decode_request(os.read(fd, m.MSG_SIZE))
            seen.append(request)
            reply = m.encode(m.EnumerateMessage(0, 0, b"NdDriverVersion", b"142.0"), error=0)
            os.write(fd, reply)
        finally:
            os.close(fd)
        return seen

    async with trio.open_nursery() as nursery:
        results: list[list[object]] = []

        async def run_client() -> None:
            results.append(await fs(client))

        nursery.start_soon(run_client)
        await env.device.wait_registered(2)
        await trio.sleep(0.3)
        item = await env.host.enumerate(0, 0)
    assert item == ("NdDriverVersion", "142.0")
    seen = results[0]
    assert seen[0] == errno.EAGAIN and seen[1] is True
    assert seen[2] == m.RegisterMessage(m.Op.REGISTER1, b"3.1")
    assert seen[3] == 0
    assert seen[4] == m.EnumerateMessage(0, 0)


# -- teardown after a failure ----------------------------------------------------------


@scenario(time_limit=20.0)
async def failing_mid_request(env: Environment) -> None:
    """Fails on purpose with a request in flight, the daemon stuck on a pool lock and a
    stray process in the namespace: the teardown must still leave nothing behind."""
    stray = await trio.lowlevel.open_process(["sleep", "60"], start_new_session=True)
    print(f"stray {stray.pid}", flush=True)
    PoolLock(0)  # never released: the daemon blocks inside the next request

    async def blocked_set() -> None:
        with contextlib.suppress(HostError):
            await env.host.set(0, "Never", "x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_set)
        await wait_delivered(env)
        raise AssertionError("failing on purpose, mid-request")


# -- a long mixed run ----------------------------------------------------------------------


@scenario(time_limit=150.0)
async def soak(env: Environment) -> None:
    from tests.hyperv.soak import run_soak

    await run_soak(env, ops=int(os.environ.get("KVPFS_SOAK_OPS", "2000")))


# The IP injection scenarios register themselves here too.
from tests.hyperv import scenarios_ip  # noqa: E402, F401
