"""``vbd/`` and ``xenstore/`` give a file operation the same errno for the same
XenStore error: both map through kvpfs.xenstore.errnos.

A proxy between the mount and the embedded xenstored answers the reads below one
device's backend directory with an error (or not at all), so that both views meet
the same failure, xenstored's reply, on the same nodes.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trio

from kvpfs.vbd.view import VbdView
from kvpfs.xenstore.protocol import Decoder, Message, Op, build_error, encode_message
from kvpfs.xenstore.view import XenStoreView
from tests.conftest import MountFactory
from tests.mounting import in_thread, read_bytes
from tests.xenstore.conftest import RawConn, ServerPath

pytestmark = pytest.mark.mount

DOMID, DEVID = 1, 51728
BACKEND = f"/local/domain/0/backend/vbd/{DOMID}/{DEVID}"
READS = {Op.READ, Op.DIRECTORY, Op.DIRECTORY_PART, Op.GET_PERMS}


@dataclass
class FaultyProxy:
    """Forwards every frame, except reads at or below ``prefix`` while ``answer`` is
    set: those get ``answer`` as an XS_ERROR (``"hold"``: no reply at all)."""

    upstream: str
    path: str
    prefix: bytes = BACKEND.encode()
    answer: str | None = None
    failed: list[bytes] = field(default_factory=list)

    def _fails(self, msg: Message) -> bool:
        target = msg.payload.split(b"\0", 1)[0]
        return (
            self.answer is not None
            and msg.type in READS
            and (target == self.prefix or target.startswith(self.prefix + b"/"))
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen()
        task_status.started()
        await trio.serve_listeners(self._connection, [trio.SocketListener(sock)])

    async def _connection(self, client: trio.SocketStream) -> None:
        lock = trio.Lock()

        async def send(msg: Message) -> None:
            async with lock:
                await client.send_all(encode_message(msg))

        async with client, await trio.open_unix_socket(self.upstream) as server:

            async def requests() -> None:
                decoder = Decoder()
                while data := await client.receive_some():
                    decoder.feed(data)
                    for msg in decoder:
                        if not self._fails(msg):
                            await server.send_all(encode_message(msg))
                            continue
                        self.failed.append(msg.payload)
                        if self.answer != "hold":
                            assert self.answer is not None
                            await send(
                                Message(Op.ERROR, msg.req_id, msg.tx_id, build_error(self.answer))
                            )
                nursery.cancel_scope.cancel()

            async def replies() -> None:
                decoder = Decoder()
                while data := await server.receive_some():
                    decoder.feed(data)
                    for msg in decoder:
                        await send(msg)
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(requests)
                nursery.start_soon(replies)


@pytest.fixture
async def proxy(nursery: trio.Nursery, xs_embedded: ServerPath) -> AsyncIterator[FaultyProxy]:
    with RawConn(xs_embedded) as c:
        reply = c.rq(Op.WRITE, f"{BACKEND}/params\0".encode() + b"/srv/disk.img")
        assert not reply.startswith(b"E:"), reply
    with tempfile.TemporaryDirectory(prefix="xsp-") as d:
        p = FaultyProxy(xs_embedded, os.path.join(d, "proxy.sock"))
        await nursery.start(p.serve)
        yield p


def errno_of(fn: Callable[..., object], *args: object) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("ENOSPC", errno.EDQUOT),
        ("E2BIG", errno.EFBIG),
        ("ENOMEM", errno.EIO),
        ("EBUSY", errno.EIO),
        ("hold", errno.EIO),  # the client's ETIMEDOUT
    ],
)
async def test_vbd_read_gets_the_errno_xenstore_gets(
    mount: MountFactory, proxy: FaultyProxy, answer: str, expected: int
) -> None:
    timeout = 0.5
    s = await mount(
        [
            XenStoreView(proxy.path, timeout=timeout),
            VbdView(proxy.path, request_timeout=timeout),
        ]
    )
    xs_file = f"{s.mountpoint}/xenstore{BACKEND}/params"
    vbd_file = f"{s.mountpoint}/vbd/xbdback{DOMID}i{DEVID}/target"
    proxy.answer = answer
    xs_errno = await in_thread(errno_of, os.stat, xs_file)
    vbd_errno = await in_thread(errno_of, os.stat, vbd_file)
    assert proxy.failed, "the proxy failed no request"
    assert (vbd_errno, xs_errno) == (expected, expected)
    proxy.answer = None
    assert await in_thread(errno_of, os.stat, vbd_file) == 0
    # Known to the kernel now: the failure comes from open()'s read of the summary.
    proxy.answer = answer
    assert await in_thread(errno_of, read_bytes, vbd_file) == expected
