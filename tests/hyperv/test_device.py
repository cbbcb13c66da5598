"""The emulated device and the simulated host, without FUSE: the kernel's rules."""

from __future__ import annotations

import errno
import select

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import DeviceState, KvpDevice
from kvpfs.peers.hyperv.host import HostError, KvpHost, status_errno

from .fakedaemon import FakeDaemon

REGISTER = m.encode(m.RegisterMessage())


async def failing(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except FsError as exc:
        return exc.errno
    raise AssertionError("no error")


async def registered(device: KvpDevice) -> None:
    stream = await device.open(0)
    await stream.write(REGISTER)
    await stream.read(m.MSG_SIZE)


# -- the character device ------------------------------------------------------------------


async def test_handshake() -> None:
    device = KvpDevice()
    stream = await device.open(0)
    assert device.state is DeviceState.INIT and not device.registered
    assert await failing(stream.write(REGISTER[:-1])) == errno.EINVAL
    # Before the handshake only a registration is accepted.
    assert await failing(stream.write(m.encode(m.EnumerateMessage(0)))) == errno.EINVAL
    assert await stream.write(REGISTER + b"extra") == m.MSG_SIZE + 5
    assert stream.poll(None) == select.POLLIN | select.POLLRDNORM
    # Too small a buffer: EINVAL, and the message stays queued.
    assert await failing(stream.read(m.MSG_SIZE - 1)) == errno.EINVAL
    assert not device.registered
    answer = await stream.read(m.MSG_SIZE + 100)
    assert answer == m.encode(m.RegisterMessage(m.Op.REGISTER1, b"3.1"))
    assert device.registered and device.registrations == 1
    assert stream.poll(None) == 0  # nothing queued: no POLLIN, and never POLLOUT
    # Registered: a write that answers no request is refused.
    assert await failing(stream.write(REGISTER)) == errno.EINVAL
    await stream.release()
    assert device.state is DeviceState.INIT and not device.is_open


async def test_legacy_registration_and_its_error_convention() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device, register_op=m.OP_REGISTER)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.version == b"3.1" and device.registered_op == 4
        # Op 4 daemons report failure with an empty key (at the ENUMERATE offset 20),
        # not with the status; the kernel reads that byte whatever the operation, so
        # even a successful SET of a key shorter than 5 bytes reads as HV_S_CONT.
        assert await host.enumerate(0, 0) is None
        assert await failing(host.set(0, "k", "v")) == errno.EMSGSIZE
        await host.set(0, "HostKey", "v")
        assert await host.enumerate(0, 1) == ("HostKey", "v")
        nursery.cancel_scope.cancel()


async def test_one_opener() -> None:
    device = KvpDevice(release_grace=0.05)
    first = await device.open(0)
    assert await failing(device.open(0)) == errno.EBUSY
    # A release that arrives within the grace period lets the second open through.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.release)
        second = await device.open(0)
    assert device.is_open
    await second.release()
    # A released stream is dead: its reads and writes fail.
    assert await failing(first.read(m.MSG_SIZE)) == errno.EBADF
    assert await failing(first.write(REGISTER)) == errno.EBADF


async def test_reads_block_or_say_eagain() -> None:
    device = KvpDevice()
    nonblocking = await device.open(0o4000)  # O_NONBLOCK
    assert await failing(nonblocking.read(m.MSG_SIZE)) == errno.EAGAIN
    await nonblocking.release()
    stream = await device.open(0)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            got.append(await stream.read(m.MSG_SIZE))

        nursery.start_soon(reader)
        await trio.sleep(0.05)
        assert not got
        await stream.write(REGISTER)
    assert m.decode_request(got[0], registration=True) == m.RegisterMessage(m.Op.REGISTER1, b"3.1")


async def test_poll_wakes_once_a_message_is_queued() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    await registered(device)
    stream = device._opener
    assert stream is not None
    wakes: list[int] = []
    assert stream.poll(lambda: wakes.append(1)) == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host.enumerate, 0, 0)
        await trio.sleep(0.05)
        assert wakes == [1]
        assert stream.poll(None) == select.POLLIN | select.POLLRDNORM
        request = m.decode_request(await stream.read(m.MSG_SIZE))
        assert request == m.EnumerateMessage(0, 0)
        await stream.write(m.encode(request, error=m.Status.S_CONT))
    assert wakes == [1]


# -- requests ------------------------------------------------------------------------------


async def test_requests_wait_for_a_registered_daemon() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    done: list[bool] = []
    async with trio.open_nursery() as nursery:

        async def early() -> None:
            await host.set(0, "early", "bird")
            done.append(True)

        nursery.start_soon(early)
        await trio.sleep(0.1)
        assert not done and host.requests == 0
        await nursery.start(daemon.run)
        await trio.sleep(0.05)
        assert done == [True]
        assert daemon.pools[0] == [[b"early", b"bird"]]
        nursery.cancel_scope.cancel()


async def test_connect_timeout_is_enotconn() -> None:
    host = KvpHost(KvpDevice(), connect_timeout=0.05)
    try:
        await host.set(0, "k", "v")
    except HostError as exc:
        assert exc.errno == errno.ENOTCONN and exc.status == m.Status.DEVICE_NOT_CONNECTED
    else:
        raise AssertionError("no daemon, yet the request succeeded")


async def test_one_request_at_a_time() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    daemon.go = trio.Event()  # hold every reply
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for key in ("a", "b", "c"):
            nursery.start_soon(host.set, 0, key, key)
        await trio.sleep(0.1)
        assert len(daemon.requests) == 1 and device.delivered
        daemon.go.set()
        await trio.sleep(0.1)
        assert len(daemon.requests) == 3
        assert sorted(k for k, _ in daemon.pools[0]) == [b"a", b"b", b"c"]
        nursery.cancel_scope.cancel()


async def test_kernel_timeout_and_late_reply() -> None:
    device = KvpDevice(timeout=0.1)
    host = KvpHost(device)
    await registered(device)
    stream = device._opener
    assert stream is not None
    outcome: list[int] = []
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:

            async def request() -> None:
                outcome.append(await failing(host.set(0, "k", "v")))

            nursery.start_soon(request)
            data = await stream.read(m.MSG_SIZE)
            await trio.sleep(0.2)
            # The kernel gave up: HV_E_FAIL for the host, and the late reply is refused.
            assert outcome == [errno.EIO]
            assert device.state is DeviceState.READY
            reply = m.encode(m.decode_request(data), error=m.Status.OK)
            assert await failing(stream.write(reply)) == errno.EINVAL


async def test_timed_out_request_never_read_blocks_the_next() -> None:
    device = KvpDevice(timeout=0.1)
    host = KvpHost(device)
    stream = await device.open(0)
    await stream.write(REGISTER)
    await stream.read(m.MSG_SIZE)
    first = await host.exchange(m.HostRequest(m.Op.ENUMERATE, 0))
    assert first.reply.status == m.Status.E_FAIL and first.failure == "timeout"
    # The message is still queued: the next request fails at once.
    second = await host.exchange(m.HostRequest(m.Op.ENUMERATE, 0, index=1))
    assert second.reply.status == m.Status.E_FAIL and second.failure == "busy"
    # The daemon gets the stale message, and its reply is refused.
    stale = await stream.read(m.MSG_SIZE)
    assert m.decode_request(stale) == m.EnumerateMessage(0, 0)
    assert await failing(stream.write(stale)) == errno.EINVAL


async def test_release_fails_the_request_in_flight_and_needs_a_new_registration() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    daemon.drop_next = True
    failed: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)

        async def request() -> None:
            exchange = await host.exchange(m.HostRequest(m.Op.SET, 0, "k", "v"))
            assert exchange.reply.status == m.Status.E_FAIL
            failed.append(exchange.failure)

        nursery.start_soon(request)
        await trio.sleep(0.05)
        assert device.delivered
        assert daemon.stream is not None
        await daemon.stream.release()  # the daemon dies with the request unanswered
        await trio.sleep(0.01)
        assert failed == ["closed"]
        assert device.state is DeviceState.INIT and not device.registered
        nursery.cancel_scope.cancel()
    # A new daemon must register again, and is then served.
    daemon = FakeDaemon(device)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert device.registrations == 2
        await host.set(0, "k", "again")
        assert daemon.pools[0] == [[b"k", b"again"]]
        nursery.cancel_scope.cancel()


async def test_cancelled_request_leaves_the_device_usable() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    daemon.drop_next = True
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        with trio.move_on_after(0.1):
            await host.set(0, "lost", "v")
        assert device.state is DeviceState.READY
        await host.set(0, "kept", "v")
        assert [k for k, _ in daemon.pools[0]] == [b"kept"]
        nursery.cancel_scope.cancel()


async def test_shutdown() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    await registered(device)
    stream = device._opener
    assert stream is not None
    outcomes: list[object] = []
    async with trio.open_nursery() as nursery:

        async def blocked_read() -> None:
            outcomes.append(await failing(stream.read(m.MSG_SIZE)))

        nursery.start_soon(blocked_read)
        await trio.sleep(0.02)
        device.shutdown()
    assert outcomes == [errno.EBADF]
    assert stream.poll(None) == select.POLLERR | select.POLLHUP
    assert await failing(device.open(0)) == errno.EBADF
    assert await failing(stream.write(REGISTER)) == errno.EBADF
    assert await failing(host.set(0, "k", "v")) == errno.ENODEV
    exchange = await device.transact(m.HostRequest(m.Op.ENUMERATE, 0))
    assert exchange.failure == "destroyed" and exchange.reply.status == m.Status.E_FAIL


async def test_raw_messages_need_their_op() -> None:
    device = KvpDevice()
    with pytest.raises(ValueError):
        await device.transact(raw=REGISTER)
    with pytest.raises(ValueError):
        await device.transact(raw=b"short", op=1)


# -- the host's rules ----------------------------------------------------------------------


async def test_host_refusals_never_reach_the_daemon() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        cases = [
            (host.set(1, "k", "v"), errno.EROFS),
            (host.set(2, "k", "v"), errno.EROFS),
            (host.set(4, "k", "v"), errno.EROFS),
            (host.delete(2, "k"), errno.EROFS),
            (host.set(5, "k", "v"), errno.EINVAL),
            (host.enumerate(-1, 0), errno.EINVAL),
            (host.enumerate(0, -1), errno.EINVAL),
            (host.set(0, "k" * 256, "v"), errno.ENAMETOOLONG),
            (host.set(0, "😀" * 128, "v"), errno.ENAMETOOLONG),
            (host.set(0, "k", "v" * 1024), errno.EFBIG),
            (host.set(0, "k\0x", "v"), errno.EINVAL),
            (host.set(0, "k", "v\0"), errno.EINVAL),
            (host.set(0, "k", 1 << 64), errno.EINVAL),
            (host.set(0, "k", -1), errno.EINVAL),
        ]
        for call, err in cases:
            assert await failing(call) == err
        assert daemon.requests == []
        # At the host's limits it goes through.
        await host.set(0, "k" * 255, "v" * 1023)
        await host.set(3, "u32", 4294967295)
        await host.set(3, "u64", 4294967296)
        sets = [r for r in daemon.requests if isinstance(r, m.KeyValueMessage)]
        assert [(r.value, r.value_size, r.value_type) for r in sets[1:]] == [
            (b"4294967295", 11, 0),
            (b"4294967296", 11, 0),
        ]
        nursery.cancel_scope.cancel()


async def test_items_stop_at_the_first_failure() -> None:
    device = KvpDevice()
    host = KvpHost(device)
    daemon = FakeDaemon(device)
    daemon.pools[1] = [[b"a", b"1"], [b"b\xff", b"2"], [b"c", b"3"]]
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        result = await host.items(1)
        assert result.items == [("a", "1")] and result.end_status == m.Status.E_FAIL
        assert not result.complete and result.failure == ""
        assert await host.find(1, "a") == "1"
        assert await failing(host.find(1, "c")) == errno.EIO
        assert (await host.items(2)).items == [
            ("FullyQualifiedDomainName", "guest.example"),
            ("OSName", "FakeOS"),
        ]
        # GET: found or not, the value never comes back.
        daemon.pools[0] = [[b"k", b"v"]]
        assert await host.get(0, "k") == ""
        assert await failing(host.get(0, "missing")) == errno.ENOENT
        assert await failing(host.delete(0, "missing")) == errno.ENOENT
        nursery.cancel_scope.cancel()


async def test_initial_items_after_the_first_registration_only() -> None:
    device = KvpDevice()
    host = KvpHost(device, initial_items={3: {"HostName": "h", "VirtualMachineName": "vm"}})
    daemon = FakeDaemon(device)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await trio.sleep(0.02)
        assert not host.provisioned.is_set()
        await nursery.start(daemon.run)
        with trio.fail_after(2):
            await host.provisioned.wait()
        assert daemon.pools[3] == [[b"HostName", b"h"], [b"VirtualMachineName", b"vm"]]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("op", "status", "err"),
    [
        (m.Op.SET, m.Status.OK, 0),
        (m.Op.SET, m.Status.S_CONT, errno.EMSGSIZE),
        (m.Op.DELETE, m.Status.S_CONT, errno.ENOENT),
        (m.Op.GET, m.Status.S_CONT, errno.ENOENT),
        (m.Op.ENUMERATE, m.Status.S_CONT, errno.ENOENT),
        (m.Op.SET, m.Status.E_FAIL, errno.EIO),
        (m.Op.SET, m.Status.NOT_SUPPORTED, errno.EOPNOTSUPP),
        (m.Op.SET, m.Status.MACHINE_LOCKED, errno.EBUSY),
        (m.Op.SET, m.Status.DEVICE_NOT_CONNECTED, errno.ENOTCONN),
        (m.Op.SET, m.Status.INVALIDARG, errno.EINVAL),
        (m.Op.SET, m.Status.GUID_NOTFOUND, errno.ENODEV),
        (m.Op.SET, m.Status.ALREADY_EXISTS, errno.EEXIST),
        (m.Op.SET, m.Status.DISK_FULL, errno.ENOSPC),
        (m.Op.SET, 0x12345678, errno.EIO),
    ],
)
def test_status_errno(op: int, status: int, err: int) -> None:
    assert status_errno(op, status) == err
