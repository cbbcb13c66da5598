"""The kernel side of KVP: an emulated ``/dev/vmbus/hv_kvp`` for the real hv_kvp_daemon.

:class:`KvpDevice` plays ``drivers/hv/hv_utils_transport.c`` (the character
device) together with the request state of ``drivers/hv/hv_kvp.c``, closely
enough that the unmodified daemon cannot tell the difference:

* **one opener**: a second open gets EBUSY.  FUSE delivers ``release`` after
  ``close()`` has returned, while the kernel's device is released before
  ``close()`` (or the opener's death) completes; so a second open first waits a
  moment (:attr:`KvpDevice.release_grace`) for a release on its way, or a daemon
  restarted right after its predecessor died would be refused;
* **read** waits for the one queued message and returns it whole; a buffer
  smaller than the message gets EINVAL (after the wait, as in the kernel).  A
  reader that opened with O_NONBLOCK gets EAGAIN instead of waiting (the kernel
  would block it; a non-blocking client polls first anyway);
* **poll** reports POLLIN while a message is queued and nothing otherwise, and
  wakes the poller when one arrives;
* **write** of fewer than 7432 bytes is EINVAL.  The first write after an open
  must be a registration (op 100, or the legacy 4), else EINVAL; the device
  answers with the same operation and version "3.1", and counts the daemon as
  registered once it has read that answer.  After that a write is accepted only
  as the reply to the request in flight (EINVAL otherwise);
* **release** drops the queued message, fails the request in flight with
  ``HV_E_FAIL`` and requires a new registration;
* the **kernel timeout**: a request unanswered after ``timeout`` seconds fails
  with ``HV_E_FAIL``.  Its message stays queued if the daemon never read it, and
  the next request then fails at once (the single message slot is busy); a late
  reply gets EINVAL, which makes the daemon reopen the device and register again.

The host side (:mod:`kvpfs.peers.hyperv.host`) calls :meth:`KvpDevice.transact`; requests
that arrive while no daemon is registered wait, as they wait in the VMBus channel.
:class:`VmbusView` shows the device as ``vmbus/hv_kvp`` in a kvpfs mount, to be
bind-mounted onto ``/dev/vmbus``.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from kvpfs.errors import FsError
from kvpfs.peers.hyperv import message as m

log = logging.getLogger(__name__)

#: The kernel's HV_UTIL_TIMEOUT: how long a request may wait for the daemon's reply.
KERNEL_TIMEOUT = 30.0
#: How long a second open waits for the first opener's release to arrive.
RELEASE_GRACE = 0.5

DEVICE_NAME = "hv_kvp"


class DeviceState(enum.Enum):
    #: No daemon registered (never opened, released, or registration not yet read).
    INIT = "init"
    #: A daemon is registered and no request is in flight.
    READY = "ready"
    #: A request was queued for the daemon; its reply is awaited.
    REQUEST = "request"
    #: The device is gone (shutdown): everything fails.
    DESTROYED = "destroyed"


@dataclass(eq=False)
class _Transaction:
    request: m.HostRequest | m.HostIpRequest | None
    op: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: m.HostReply | None = None
    raw_reply: bytes | None = None

    def finish(self, reply: m.HostReply, raw: bytes | None = None) -> None:
        if not self.done.is_set():
            self.reply = reply
            self.raw_reply = raw
            self.done.set()


@dataclass(frozen=True, slots=True)
class Exchange:
    """A finished request: the host's reply, and the daemon's message if it answered."""

    reply: m.HostReply
    #: The 7432 bytes the daemon wrote; None when the kernel answered by itself.
    daemon_reply: bytes | None
    #: Why the kernel answered by itself ("timeout", "closed", "busy", ...), else "".
    failure: str = ""


class KvpDevice:
    """The emulated kernel device and request state.  Runs on the trio thread."""

    def __init__(
        self, *, timeout: float = KERNEL_TIMEOUT, release_grace: float = RELEASE_GRACE
    ) -> None:
        self.timeout = timeout
        self.release_grace = release_grace
        self.state = DeviceState.INIT
        #: How many registrations completed (the daemon read the kernel's answer).
        self.registrations = 0
        #: The registration operation of the current daemon (100, or the legacy 4).
        self.registered_op: int | None = None
        self._opener: DeviceHandle | None = None
        self._outmsg: bytes | None = None
        self._on_read: Callable[[], None] | None = None
        self._pending: _Transaction | None = None
        self._wakes: list[Callable[[], None]] = []
        self._changed = trio.Event()

    # -- state changes -------------------------------------------------------------------

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _queue(self, data: bytes, on_read: Callable[[], None] | None = None) -> bool:
        """hvutil_transport_send: False if the one message slot is still taken."""
        if self._outmsg is not None:
            return False
        self._outmsg = data
        self._on_read = on_read
        wakes, self._wakes = self._wakes, []
        for wake in wakes:
            try:
                wake()
            except Exception:
                log.exception("vmbus: poll notification failed")
        self._signal()
        return True

    def _registration_read(self) -> None:
        if self.state is DeviceState.INIT and self._opener is not None:
            self.state = DeviceState.READY
            self.registrations += 1
            log.info("vmbus: hv_kvp_daemon registered (op %s)", self.registered_op)
            self._signal()

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.finish(m.HostReply(int(m.Status.E_FAIL)), None)
            log.info("vmbus: request %s failed: %s", pending.op, why)

    @property
    def is_open(self) -> bool:
        return self._opener is not None

    @property
    def delivered(self) -> bool:
        """Whether the daemon has read the request in flight."""
        return self.state is DeviceState.REQUEST and self._outmsg is None

    @property
    def registered(self) -> bool:
        return self.state in (DeviceState.READY, DeviceState.REQUEST)

    async def wait_registered(self, count: int = 1) -> None:
        """Wait until ``count`` registrations have happened and a daemon is registered."""
        while not (self.registrations >= count and self.registered):
            if self.state is DeviceState.DESTROYED:
                raise FsError(errno.ENODEV, "the device is gone")
            await self._wait_change()

    async def wait_closed(self) -> None:
        while self._opener is not None:
            await self._wait_change()

    # -- the character device ------------------------------------------------------------

    async def open(self, flags: int) -> DeviceHandle:
        if self.state is DeviceState.DESTROYED:
            raise FsError(errno.EBADF)
        if self._opener is not None:
            with trio.move_on_after(self.release_grace):
                await self.wait_closed()
            if self._opener is not None:
                raise FsError(errno.EBUSY, "hv_kvp is open already (one opener at a time)")
        stream = DeviceHandle(self, flags)
        self._opener = stream
        self._signal()
        return stream

    async def read(self, stream: DeviceHandle, size: int) -> bytes:
        while True:
            if self.state is DeviceState.DESTROYED:
                raise FsError(errno.EBADF)
            if stream is not self._opener:
                # Released while this read waited (its process died).
                raise FsError(errno.EBADF)
            if self._outmsg is not None:
                break
            if stream.nonblocking:
                raise FsError(errno.EAGAIN)
            await self._wait_change()
        if size < len(self._outmsg):
            raise FsError(errno.EINVAL, f"a read needs room for {len(self._outmsg)} bytes")
        data, self._outmsg = self._outmsg, None
        on_read, self._on_read = self._on_read, None
        if on_read is not None:
            on_read()
        self._signal()
        return data

    def write(self, stream: DeviceHandle, data: bytes) -> int:
        if self.state is DeviceState.DESTROYED:
            raise FsError(errno.EBADF)
        if stream is not self._opener:
            raise FsError(errno.EBADF)
        if len(data) < m.MSG_SIZE:
            raise FsError(errno.EINVAL, f"a message is {m.MSG_SIZE} bytes, got {len(data)}")
        message = bytes(data[: m.MSG_SIZE])
        if self.state is DeviceState.INIT:
            op = m.message_op(message)
            if op not in m.REGISTRATION_OPS:
                raise FsError(errno.EINVAL, f"expected a registration, got operation {op}")
            self.registered_op = op
            # As the kernel: a second registration before the first answer was read
            # finds the slot taken, and the write still succeeds.
            self._queue(m.registration_reply(op), self._registration_read)
            return len(data)
        if self.state is not DeviceState.REQUEST or self._pending is None:
            raise FsError(errno.EINVAL, "no request is waiting for a reply")
        pending, self._pending = self._pending, None
        self.state = DeviceState.READY
        reply = m.kernel_reply(
            pending.op,
            message,
            legacy=self.registered_op == m.OP_REGISTER,
            request=pending.request,
        )
        pending.finish(reply, message)
        self._signal()
        return len(data)

    def poll(self, stream: DeviceHandle, wake: Callable[[], None] | None) -> int:
        if self.state is DeviceState.DESTROYED:
            return select.POLLERR | select.POLLHUP
        if stream is self._opener and self._outmsg is not None:
            return select.POLLIN | select.POLLRDNORM
        if wake is not None and stream is self._opener:
            self._wakes.append(wake)
        return 0

    def release(self, stream: DeviceHandle) -> None:
        if stream is not self._opener:
            return
        self._opener = None
        self._wakes.clear()
        self._outmsg = None
        self._on_read = None
        self._fail_pending("the daemon closed the device")
        if self.state is not DeviceState.DESTROYED:
            self.state = DeviceState.INIT
        self.registered_op = None
        log.info("vmbus: hv_kvp released")
        self._signal()

    # -- the host side -------------------------------------------------------------------

    async def transact(
        self,
        request: m.HostRequest | m.HostIpRequest | None = None,
        *,
        raw: bytes | None = None,
        op: int | None = None,
    ) -> Exchange:
        """Send one request and wait for its outcome.

        ``request`` goes through the kernel's conversion; ``raw`` is queued as it is
        (a message the kernel would never build, to see what the daemon does with
        it), with ``op`` saying how to read the reply.  Waits while no daemon is
        registered; the caller bounds that wait.  The caller also makes sure that
        only one request is in flight (the host sends one at a time).
        """
        if request is not None:
            data = m.kernel_request(request)
            op = request.op
        elif raw is not None and op is not None:
            if len(raw) != m.MSG_SIZE:
                raise ValueError(f"a raw message is {m.MSG_SIZE} bytes")
            data = bytes(raw)
        else:
            raise ValueError("transact needs a request, or raw bytes and their op")
        while self.state is not DeviceState.READY:
            if self.state is DeviceState.DESTROYED:
                return Exchange(m.HostReply(int(m.Status.E_FAIL)), None, "destroyed")
            await self._wait_change()
        transaction = _Transaction(request, op)
        self.state = DeviceState.REQUEST
        self._pending = transaction
        if not self._queue(data):
            # kvp_send_key: the slot still holds a message the daemon never read.
            self._pending = None
            self.state = DeviceState.READY
            return Exchange(m.HostReply(int(m.Status.E_FAIL)), None, "busy")
        try:
            with trio.move_on_after(self.timeout):
                await transaction.done.wait()
        finally:
            if self._pending is transaction:
                # Timed out, or the caller gave up: the kernel's timeout work answers
                # the host and the transaction ends; a late reply will be refused.
                self._pending = None
                if self.state is DeviceState.REQUEST:
                    self.state = DeviceState.READY
                self._signal()
        if transaction.reply is None:
            log.warning("vmbus: hv_kvp_daemon did not answer within %g s", self.timeout)
            return Exchange(m.HostReply(int(m.Status.E_FAIL)), None, "timeout")
        failure = "" if transaction.raw_reply is not None else "closed"
        return Exchange(transaction.reply, transaction.raw_reply, failure)

    def shutdown(self) -> None:
        """The device goes away: waiting reads fail (EBADF), poll reports POLLHUP,
        opens fail, the request in flight fails.  The daemon then exits by itself."""
        if self.state is DeviceState.DESTROYED:
            return
        self.state = DeviceState.DESTROYED
        self._fail_pending("the device was removed")
        wakes, self._wakes = self._wakes, []
        for wake in wakes:
            try:
                wake()
            except Exception:
                log.debug("vmbus: poll notification at shutdown failed", exc_info=True)
        self._signal()


@dataclass(eq=False)
class DeviceHandle:
    """One open of ``hv_kvp`` (what the FUSE view wraps as a stream)."""

    device: KvpDevice
    flags: int

    @property
    def nonblocking(self) -> bool:
        return bool(self.flags & os.O_NONBLOCK)

    async def read(self, size: int) -> bytes:
        return await self.device.read(self, size)

    async def write(self, data: bytes) -> int:
        return self.device.write(self, data)

    def poll(self, wake: Callable[[], None] | None) -> int:
        return self.device.poll(self, wake)

    async def release(self) -> None:
        self.device.release(self)
