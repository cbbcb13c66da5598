"""The backend's cache without a mount: races between replies and watch events,
churn, overflowed watch buffers; and how the composition root finds a xenstored
or serves one."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path as FsPath

import pytest
import trio

from kvpfs.compose import MountPlan, XenSource, plan_mount, serve_mount
from kvpfs.config import MountConfig
from kvpfs.errors import FsError, UsageError
from kvpfs.fs.mount import mounted_at
from kvpfs.fs.view import Path, View
from kvpfs.xenstore.client import Transaction, XenStoreClient, XenStoreError
from kvpfs.xenstore.locate import find_xenstored, is_kvpfs_embedded
from kvpfs.xenstore.view import XenStoreView
from tests.conftest import fuse_usable
from tests.mounting import sh
from tests.xenstore.conftest import ServerPath
from tests.xsmount.conftest import XsMountFactory, dump, xs, xs_write


class Sink:
    """Records what the backend pushes."""

    def __init__(self) -> None:
        self.values: list[Path] = []
        self.entries: list[tuple[Path, list[str]]] = []
        self.changed = trio.Event()

    def value_changed(self, backend: View, path: Path) -> None:
        self.values.append(path)
        self.changed.set()

    def entries_changed(self, backend: View, directory: Path, names: Sequence[str]) -> None:
        self.entries.append((directory, list(names)))
        self.changed.set()

    def mark(self) -> int:
        return len(self.entries)

    async def wait_for(self, directory: Path, name: str, since: int) -> None:
        """Until a change of ``directory/name`` was pushed after ``since`` (as that
        entry, or as the unknown ancestor it was created under)."""
        target = (*directory, name)
        with trio.fail_after(5):
            while not any(
                target[: len(d) + 1] == (*d, *n)
                for d, n in self.entries[since:]
                if len(n) == 1
            ):
                self.changed = trio.Event()
                await self.changed.wait()


async def started(nursery: trio.Nursery, server: str, **options: object) -> tuple[XenStoreView, Sink]:
    backend = XenStoreView(server, **options)  # type: ignore[arg-type]
    sink = Sink()
    await nursery.start(backend.run, sink)
    return backend, sink


def patch(client: XenStoreClient, name: str, wrapper: Callable[..., Awaitable[object]]) -> None:
    # An instance attribute wins over the method: only this client is affected.
    setattr(client, name, wrapper)


async def test_reply_older_than_an_event_is_not_kept(xenstored: ServerPath) -> None:
    await xs_write(xenstored, "/race/k", "v1", "/race/j", "1")
    async with trio.open_nursery() as nursery, XenStoreClient(xenstored) as other:
        backend, sink = await started(nursery, xenstored)
        client = backend.client
        assert client is not None
        real_read, real_directory = client.read, client.directory

        async def read_then_change(path: str | bytes) -> bytes:
            value = await real_read(path)
            # Someone writes after the server answered; the watch task applies the
            # event before this (older) reply is stored.
            mark = sink.mark()
            await other.write("/race/k", b"v2")
            await sink.wait_for(("race",), "k", mark)
            return value

        patch(client, "read", read_then_change)
        assert await backend.read(("race", "k")) == b"v1"  # the caller asked before
        patch(client, "read", real_read)
        assert await backend.read(("race", "k")) == b"v2"  # but v1 was not kept

        async def list_then_add(path: str | bytes) -> list[str]:
            names = await real_directory(path)
            if path == "/race":
                mark = sink.mark()
                await other.write("/race/new", b"x")
                await sink.wait_for(("race",), "new", mark)
            return names

        patch(client, "directory", list_then_add)
        assert [n for n, _ in await backend.listdir(("race",))] == ["k", "j"]
        patch(client, "directory", real_directory)
        assert [n for n, _ in await backend.listdir(("race",))] == ["k", "j", "new"]
        nursery.cancel_scope.cancel()


async def walk(backend: XenStoreView, path: Path = ()) -> dict[str, bytes | None]:
    """Every node below ``path`` as the backend shows it: value of files, None for
    directories."""
    out: dict[str, bytes | None] = {}
    for name, node in await backend.listdir(path):
        child = (*path, name)
        if node.kind.value == "dir":
            out["/" + "/".join(child)] = None
            out.update(await walk(backend, child))
        else:
            out["/" + "/".join(child)] = await backend.read(child)
    return out


async def test_churn_leaves_no_stale_entry(xenstored: ServerPath) -> None:
    rng = random.Random(7)
    names = [f"/churn/{a}/{b}" for a in "abcd" for b in "wxyz"]
    await xs_write(xenstored, *[x for n in names for x in (n, "0")])
    async with trio.open_nursery() as nursery, XenStoreClient(xenstored) as other:
        backend, sink = await started(nursery, xenstored)
        stop = trio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                node = rng.choice(names)
                if rng.random() < 0.15:
                    with contextlib.suppress(XenStoreError):  # its parent may be gone
                        await other.rm(node.rsplit("/", 1)[0] if rng.random() < 0.3 else node)
                else:
                    await other.write(node, str(i))
                await trio.sleep(0)

        async def reader() -> None:
            while not stop.is_set():
                # Nodes vanish under the walk (ENOENT, ENOTDIR): only the end counts.
                with contextlib.suppress(FsError):
                    await walk(backend, ("churn",))
                await trio.sleep(0)

        async with trio.open_nursery() as inner:
            inner.start_soon(writer)
            for _ in range(3):
                inner.start_soon(reader)
            await trio.sleep(1.5)
            stop.set()
        # Quiet: the last event processed, then the cache must equal the store.
        mark = sink.mark()
        await other.write("/churn-done", b"1")
        await sink.wait_for((), "churn-done", mark)
        tree = await dump(xenstored)
        paths = [p for p, *_ in tree]
        truth = {
            p.decode(): None if any(q.startswith(p + b"/") for q in paths) else v
            for p, v, *_ in tree
            if p.startswith(b"/churn/")
        }
        # Whatever the cache kept through the churn is current.
        assert await walk(backend, ("churn",)) == truth
        nursery.cancel_scope.cancel()


async def test_overflowed_watch_drops_the_cache(xenstored: ServerPath) -> None:
    await xs_write(xenstored, *[x for i in range(10) for x in (f"/ov/n{i}", "old")])
    async with trio.open_nursery() as nursery:
        backend, sink = await started(nursery, xenstored, watch_capacity=2)
        assert (await walk(backend, ("ov",)))["/ov/n9"] == b"old"
        # The loop is blocked while 10 changes happen: their events arrive at once,
        # more than the watch holds.
        subprocess.run(
            ["xenstore-write", *[x for i in range(10) for x in (f"/ov/n{i}", "new")]],
            env={**os.environ, "XENSTORED_PATH": xenstored},
            check=True,
        )
        # No marker event to wait for: with the watch still full, it may be one of
        # the dropped events too.  The overflow marker that follows them makes the
        # backend drop its cache, after which every value read is the new one.
        with trio.fail_after(10):
            while set((await walk(backend, ("ov",))).values()) != {b"new"}:
                await trio.sleep(0.02)
        # The gap was pushed for everything the cache still held.
        assert any(d == ("ov",) and len(names) > 2 for d, names in sink.entries)
        nursery.cancel_scope.cancel()


@pytest.mark.mount
async def test_embedded_server_served_by_the_composition_root(tmp_path: FsPath) -> None:
    """With no xenstored on the host, the mount serves its own on a socket of its
    own, the xenstore-* tools reach it, and it is gone when the mount ends."""
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    (tmp_path / "run").mkdir()
    (tmp_path / "mnt").mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XENSTORED_RUNDIR": str(tmp_path / "none")}
    config = MountConfig(str(tmp_path / "mnt"), kvp_dir=str(tmp_path / "kvp"), xenstore="auto")
    (tmp_path / "kvp").mkdir()
    plan = plan_mount(config, env)
    if plan.xen is not XenSource.EMBEDDED:
        pytest.skip("this host has a xenstored of its own")
    sock = plan.xenstored_path
    assert sock == str(tmp_path / "run" / "kvpfs" / f"xenstored-{os.getpid()}.sock")
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve_mount, config, plan)
        try:
            x = f"{config.mountpoint}/xenstore"
            await xs_write(sock, "/greeting", "hi")
            assert (await sh(f"cat {x}/greeting && cat {x}/local/domain/1/name")).stdout == b"hi\nguest1\n"
            await sh(f"echo hello > {x}/greeting")
            assert await xs(sock, "xenstore-read", "/greeting") == b"hello\n"
        finally:
            await running.session.stop()
    assert not os.path.exists(sock)
    assert not mounted_at(config.mountpoint)


def test_plan_decides_real_or_embedded_once(
    xenstored_embedded: ServerPath, xenstored_real: ServerPath, tmp_path: FsPath
) -> None:
    assert find_xenstored({"XENSTORED_PATH": xenstored_embedded}) == xenstored_embedded
    assert is_kvpfs_embedded(xenstored_embedded)
    assert not is_kvpfs_embedded(xenstored_real)
    # A socket file nobody listens on, and no xenbus device: nothing found.
    dead = tmp_path / "dead"
    dead.mkdir()
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead / "socket"))
    s.close()
    assert not is_kvpfs_embedded(str(dead / "socket"))
    no_xen = os.path.exists("/dev/xen/xenbus") or os.path.exists("/proc/xen/xenbus")
    assert find_xenstored({"XENSTORED_RUNDIR": str(dead)}) is None or no_xen
    (tmp_path / "kvp").mkdir()

    def plan(xenstore: str, **env: str) -> MountPlan:
        config = MountConfig("/unused", kvp_dir=str(tmp_path / "kvp"), xenstore=xenstore)
        return plan_mount(config, {"XENSTORED_RUNDIR": str(dead), **env}, script_dir=str(tmp_path))

    own = str(tmp_path / "kvpfs" / f"xenstored-{os.getpid()}.sock")
    if not no_xen:
        assert plan("auto", XDG_RUNTIME_DIR=str(tmp_path)) == plan("auto", XDG_RUNTIME_DIR=str(tmp_path))
        assert plan("auto", XDG_RUNTIME_DIR=str(tmp_path)).xenstored_path == own
        # Another kvpfs's socket found through XENSTORED_PATH is no Xen host.
        adopted = plan("auto", XDG_RUNTIME_DIR=str(tmp_path), XENSTORED_PATH=xenstored_embedded)
        assert (adopted.xen, adopted.xenstored_path) == (XenSource.EMBEDDED, own)
    # A real xenstored is the host's: hotplug scripts run where they exist.
    (tmp_path / "block").write_text("#!/bin/sh\n")
    real = plan("auto", XENSTORED_PATH=xenstored_real)
    assert (real.xen, real.xenstored_path, real.hotplug) == (XenSource.HOST, str(xenstored_real), True)
    # Named on purpose: shared, never the host's.
    shared = plan(str(xenstored_embedded))
    assert (shared.xen, shared.hotplug) == (XenSource.SHARED, False)
    # Named but not answering, or missing: one line, before anything starts.
    with pytest.raises(UsageError, match=r"no xenstored at .*/dead/socket: nothing answers there"):
        plan(str(dead / "socket"))
    with pytest.raises(UsageError, match=r"no xenstored at /nonexistent\.sock: No such file"):
        plan("/nonexistent.sock")
    assert plan("off").xen is XenSource.OFF


@pytest.mark.mount
async def test_guest_sees_changes_without_a_cache(xsmount: XsMountFactory, xenstored_guests: ServerPath) -> None:
    home = "/local/domain/1"
    await xs_write(xenstored_guests, f"{home}/k", "1")
    await xs(xenstored_guests, "xenstore-chmod", home, "n1")
    await xs(xenstored_guests, "xenstore-chmod", f"{home}/k", "n1")
    m = await xsmount(xenstored_guests.domain_sockets[1], domid=1)
    k = f"{m.dir}{home}/k"
    assert (await sh(f"cat {k}")).stdout == b"1\n"
    env = {"XENSTORED_PATH": str(xenstored_guests)}
    assert (await sh(f"xenstore-write {home}/k 2 && cat {k}", env=env)).stdout == b"2\n"
    assert (await sh(f"xenstore-write {home}/n 3 && ls -U {m.dir}{home}", env=env)).stdout == b"k\nn\n"


async def test_rename_retries_on_eagain(
    xenstored: ServerPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    await xs_write(xenstored, "/mv/old", "v1")
    async with trio.open_nursery() as nursery, XenStoreClient(xenstored) as other:
        backend, _ = await started(nursery, xenstored)
        attempts: list[str] = []
        real_read = Transaction.read

        async def read_then_conflict(self: Transaction, path: str | bytes) -> bytes:
            value = await real_read(self, path)
            if path == "/mv/old":
                attempts.append(value.decode())
                if len(attempts) == 1:
                    # Between the transaction's read and its commit: EAGAIN.
                    await other.write("/mv/old", b"v2")
            return value

        monkeypatch.setattr(Transaction, "read", read_then_conflict)
        await backend.rename(("mv", "old"), ("mv", "new"), replace=True)
        monkeypatch.undo()
        assert attempts == ["v1", "v2"]
        assert await other.read("/mv/new") == b"v2"
        assert not await other.exists("/mv/old")
        nursery.cancel_scope.cancel()


@pytest.mark.mount
async def test_guest_domid_is_read_from_its_home(xsmount: XsMountFactory, xenstored_guests: ServerPath) -> None:
    home = "/local/domain/1"
    await xs_write(xenstored_guests, f"{home}/domid", "1", f"{home}/k", "v")
    await xs(xenstored_guests, "xenstore-chmod", "-r", home, "n1")
    m = await xsmount(xenstored_guests.domain_sockets[1])
    # Owner 1 may read and write: only known because the mount learned it is domain 1.
    assert (await sh(f"stat -c %A {m.dir}{home}/k")).stdout == b"-rw-r--r--\n"
