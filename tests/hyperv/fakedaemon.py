"""A small stand-in for hv_kvp_daemon, for tests that run without root.

It talks to a :class:`kvpfs.peers.hyperv.device.KvpDevice` directly (no FUSE), on the trio
thread, with the daemon's protocol and the daemon's pool semantics on in-memory
pools: first match wins, SET modifies in place or appends, DELETE shifts, the
size check answers ``HV_S_CONT``, pool 2 is synthesised.  Knobs let a test hold
a reply, drop it, or make the daemon go away.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import trio

from kvpfs.errors import FsError
from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.device import DeviceHandle, KvpDevice

AUTO_ITEMS = [(b"FullyQualifiedDomainName", b"guest.example"), (b"OSName", b"FakeOS")]


@dataclass(eq=False)
class FakeDaemon:
    device: KvpDevice
    register_op: int = m.Op.REGISTER1
    pools: dict[int, list[list[bytes]]] = field(default_factory=lambda: {p: [] for p in range(5)})
    #: Every request read, decoded.
    requests: list[m.Message] = field(default_factory=list)
    #: Cleared to make the daemon wait before answering.
    go: trio.Event = field(default_factory=trio.Event)
    #: Read the next request but never answer it.
    drop_next: bool = False
    version: bytes = b""
    stream: DeviceHandle | None = None

    def __post_init__(self) -> None:
        self.go.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, register, then answer requests until cancelled (then close)."""
        stream = await self.device.open(0)
        self.stream = stream
        try:
            await stream.write(m.encode(m.RegisterMessage(self.register_op)))
            answer = m.decode_request(await stream.read(m.MSG_SIZE), registration=True)
            assert isinstance(answer, m.RegisterMessage)
            self.version = answer.version
            task_status.started()
            while True:
                try:
                    data = await stream.read(m.MSG_SIZE)
                except FsError as exc:
                    if exc.errno == errno.EBADF:  # released or removed under us
                        return
                    raise
                request = m.decode_request(data)
                self.requests.append(request)
                await self.go.wait()
                if self.drop_next:
                    self.drop_next = False
                    continue
                status, reply = self.handle(request)
                await stream.write(m.encode(reply, error=status))
        finally:
            await stream.release()

    def _find(self, pool: int, key: bytes) -> int | None:
        for i, (k, _) in enumerate(self.pools[pool]):
            if k == key:
                return i
        return None

    def handle(self, request: m.Message) -> tuple[int, m.Message]:
        ok, cont = int(m.Status.OK), int(m.Status.S_CONT)
        if isinstance(request, m.KeyValueMessage) and request.op == m.Op.SET:
            if request.key_size > 512 or request.value_size > 2048:
                return cont, request
            i = self._find(request.pool, request.key)
            if i is None:
                self.pools[request.pool].append([request.key, request.value])
            else:
                self.pools[request.pool][i][1] = request.value
            return ok, request
        if isinstance(request, m.KeyValueMessage):  # GET: nothing is copied (value_size 0)
            return (cont if self._find(request.pool, request.key) is None else ok), request
        if isinstance(request, m.DeleteMessage):
            i = self._find(request.pool, request.key)
            if i is None:
                return cont, request
            del self.pools[request.pool][i]
            return ok, request
        if isinstance(request, m.EnumerateMessage):
            items = AUTO_ITEMS if request.pool == 2 else self.pools[request.pool]
            if request.index >= len(items):
                return cont, request
            key, value = items[request.index]
            return ok, m.EnumerateMessage(request.pool, request.index, key, value)
        return ok, request
