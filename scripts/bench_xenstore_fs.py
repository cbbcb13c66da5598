#!/usr/bin/env python3
"""The ``xenstore`` view of the mount against ``xenstore-ls -f`` on the same server.

Usage: .venv/bin/python scripts/bench_xenstore_fs.py [--nodes N] [--rss-nodes M]
       [--servers embedded,real] [--attr-timeout S] [--runs R]

For each server (the embedded xenstored as a separate ``python -m
kvpfs.peers.xenstored.server`` process, and cxenstored 4.17 under the test shim
tests/xenstore/fakexen.c compiled into a temporary directory):

1. fill it with a tree of N nodes shaped like a host's (domains with names,
   memory, control, vbd and vif devices), counted as ``xenstore-ls -f`` counts;
2. time ``xenstore-ls -f /`` (best of R);
3. mount kvpfs in a separate process and time ``find MNT -type f -exec cat {} +``
   cold (first traversal after the mount) and warm (best of R), with the
   requests the mount sent to xenstored for each;
4. grow the tree to M nodes, mount afresh, traverse it once and report the
   mount's resident memory with every node cached (and the kernel holding an
   inode for each).

Beside them, the "FUSE floor": the same tree served from a Python dict by the
same FUSE layer, traversed warm the same way.  It is what any backend pays for
the kernel round trips (5 per ``cat``: open, read, read at EOF, flush, release)
and shows how much of the figures is the XenStore view itself.

Everything it starts (servers, mounts, temporary directories) is stopped and
removed on the way out, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

XENSTORED = "/usr/lib/xen-4.17/bin/xenstored"
SHIM = REPO / "tests" / "xenstore" / "fakexen.c"
PYTHON = sys.executable


# --------------------------------------------------------------------------- the tree


def domain_nodes(domid: int) -> list[tuple[str, str]]:
    """The leaves of one guest's home, roughly as libxl leaves them."""
    base = f"/local/domain/{domid}"
    leaves = [
        (f"{base}/name", f"guest{domid}"),
        (f"{base}/domid", str(domid)),
        (f"{base}/vm", f"/vm/00000000-0000-0000-0000-{domid:012d}"),
        (f"{base}/memory/target", "1048576"),
        (f"{base}/memory/static-max", "1048576"),
        (f"{base}/control/shutdown", ""),
        (f"{base}/control/feature-poweroff", "1"),
        (f"{base}/control/feature-reboot", "1"),
        (f"{base}/device/suspend/event-channel", ""),
        (f"{base}/data/updated", "0"),
    ]
    for i in range(4):
        dev = f"{base}/device/vbd/{51712 + 16 * i}"
        back = f"/local/domain/0/backend/vbd/{domid}/{51712 + 16 * i}"
        leaves += [
            (f"{dev}/backend", back),
            (f"{dev}/backend-id", "0"),
            (f"{dev}/state", "4"),
            (f"{dev}/virtual-device", str(51712 + 16 * i)),
            (f"{dev}/device-type", "disk"),
            (f"{dev}/protocol", "x86_64-abi"),
            (f"{dev}/ring-ref", str(8 + i)),
            (f"{dev}/event-channel", str(12 + i)),
        ]
    for i in range(2):
        dev = f"{base}/device/vif/{i}"
        leaves += [
            (f"{dev}/backend", f"/local/domain/0/backend/vif/{domid}/{i}"),
            (f"{dev}/backend-id", "0"),
            (f"{dev}/state", "4"),
            (f"{dev}/handle", str(i)),
            (f"{dev}/mac", f"00:16:3e:00:{domid % 256:02x}:{i:02x}"),
            (f"{dev}/tx-ring-ref", "768"),
            (f"{dev}/rx-ring-ref", "769"),
            (f"{dev}/event-channel", "20"),
        ]
    return leaves


def tree(target: int, first_domid: int = 1) -> tuple[list[tuple[str, str]], int]:
    """Leaves for about ``target`` nodes in all (xenstore-ls -f lines, counting the
    two nodes of a fresh store), and the exact count."""
    leaves: list[tuple[str, str]] = []
    nodes = {"/tool", "/tool/xenstored"}
    domid = first_domid
    while len(nodes) < target:
        for path, value in domain_nodes(domid):
            leaves.append((path, value))
            parts = path.split("/")
            nodes.update("/".join(parts[:i]) for i in range(2, len(parts) + 1))
        domid += 1
    return leaves, len(nodes)


def fill(socket_path: str, leaves: list[tuple[str, str]]) -> None:
    """Write the leaves with kvpfs's own client, 32 writes in flight."""
    import trio

    from kvpfs.xenstore.client import XenStoreClient

    async def main() -> None:
        async with XenStoreClient(socket_path, timeout=60) as client:
            chunks = [leaves[i::32] for i in range(32)]

            async def writer(chunk: list[tuple[str, str]]) -> None:
                for path, value in chunk:
                    await client.write(path, value)

            async with trio.open_nursery() as nursery:
                for chunk in chunks:
                    nursery.start_soon(writer, chunk)

    trio.run(main)


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.dir = workdir / kind
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = str(self.dir / "socket")

    def start(self) -> None:
        if self.kind == "embedded":
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "kvpfs.peers.xenstored.server", self.socket],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode()
            if not line.startswith("XENSTORED_PATH="):
                raise RuntimeError("the embedded xenstored did not start")
            return
        shim = self.dir / "fakexen.so"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM), "-ldl"], check=True
        )
        env = dict(os.environ, XENSTORED_RUNDIR=str(self.dir), LD_PRELOAD=str(shim))
        env.pop("XENSTORED_PATH", None)
        self.proc = subprocess.Popen(
            [XENSTORED, "-N", "-F", str(self.dir / "pid")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cxenstored did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if self.kind == "embedded" else signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def xenstore_ls_seconds(socket_path: str, runs: int) -> tuple[float, int]:
    env = dict(os.environ, XENSTORED_PATH=socket_path)
    best = float("inf")
    lines = 0
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(["xenstore-ls", "-f", "/"], env=env, capture_output=True, check=True)
        best = min(best, time.perf_counter() - started)
        lines = out.stdout.count(b"\n")
    return best, lines


# --------------------------------------------------------------------------- the mount


class Mount:
    """kvpfs's XenStore view in a child process (this script's ``mount`` command)."""

    def __init__(
        self, socket_path: str, workdir: Path, attr_timeout: float, floor: bool = False
    ) -> None:
        self.point = workdir / "mnt"
        self.point.mkdir(exist_ok=True)
        self.stats_file = workdir / "stats.json"
        env = dict(os.environ, KVPFS_BENCH_FLOOR="1" if floor else "0")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                __file__,
                "mount",
                socket_path,
                str(self.point),
                str(self.stats_file),
                str(attr_timeout),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("the mount did not start")

    @property
    def dir(self) -> str:
        return f"{self.point}/xenstore"

    def stats(self) -> dict[str, object]:
        with contextlib.suppress(FileNotFoundError):
            self.stats_file.unlink()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not self.stats_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the mount did not report")
            time.sleep(0.01)
        time.sleep(0.05)
        result: dict[str, object] = json.loads(self.stats_file.read_text())
        return result

    def traverse(self) -> float:
        started = time.perf_counter()
        subprocess.run(
            ["find", self.dir, "-type", "f", "-exec", "cat", "{}", "+"],
            stdout=subprocess.DEVNULL,
            check=True,
        )
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        from kvpfs.fs.mount import force_unmount, mounted_at

        if mounted_at(str(self.point)):
            force_unmount(str(self.point))


def serve_mount(socket_path: str, mountpoint: str, stats_file: str, attr_timeout: float) -> None:
    """The child: mount, say ready, report requests and memory on SIGUSR1."""
    import trio

    from kvpfs.fs.mount import fuse_options, serve
    from kvpfs.fs.operations import FsOptions, Operations
    from kvpfs.xenstore.protocol import Decoder, Op
    from kvpfs.xenstore.view import XenStoreView

    requests: Counter[str] = Counter()

    class Counting(trio.abc.Stream):
        def __init__(self, inner: trio.abc.Stream) -> None:
            self.inner = inner
            self.decoder = Decoder()

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            self.decoder.feed(bytes(data))
            for msg in self.decoder:
                requests[Op(msg.type).name] += 1
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            return await self.inner.receive_some(max_bytes)

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def connect() -> trio.abc.Stream:
        return Counting(await trio.open_unix_socket(socket_path))

    floor = os.environ.get("KVPFS_BENCH_FLOOR") == "1"
    backend = XenStoreView(connect=connect, timeout=60)
    served = floor_backend(load_tree(socket_path)) if floor else backend
    ops = Operations([served], FsOptions(attr_timeout=attr_timeout, store_timeout=60))  # type: ignore[list-item]

    async def report(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            task_status.started()
            async for _ in signals:
                data = {
                    "requests": dict(requests),
                    "cached_nodes": 0 if floor else backend.cached_nodes(),
                    "inodes": len(ops.inodes),
                    "rss_kib": rss_kib(os.getpid()),
                }
                tmp = stats_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, stats_file)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(
                lambda task_status: serve(
                    ops, mountpoint, fuse_options(), handle_signals=True, task_status=task_status
                )
            )
            await nursery.start(report)
            print("ready", flush=True)
            await session.done.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)


def load_tree(socket_path: str) -> dict[tuple[str, ...], tuple[list[str], bytes]]:
    """Every node's children and value, read once (for the floor mount)."""
    import trio

    from kvpfs.xenstore.client import XenStoreClient

    nodes: dict[tuple[str, ...], tuple[list[str], bytes]] = {}

    async def main() -> None:
        async with XenStoreClient(socket_path, timeout=60) as client:

            async def visit(path: tuple[str, ...]) -> None:
                xs = "/" + "/".join(path)
                kids = await client.directory(xs)
                nodes[path] = (kids, b"" if kids else await client.read(xs))
                for kid in kids:
                    await visit((*path, kid))

            await visit(())

    trio.run(main)
    return nodes


def floor_backend(nodes: dict[tuple[str, ...], tuple[list[str], bytes]]) -> object:
    """The same tree in a dict behind the same FUSE layer: what any backend pays."""
    import errno

    from kvpfs.errors import FsError
    from kvpfs.fs.view import Node, NodeKind, View

    class Floor(View):
        name = "xenstore"

        def _node(self, path: tuple[str, ...]) -> Node:
            got = nodes.get(path)
            if got is None:
                raise FsError(errno.ENOENT)
            kids, value = got
            if kids or not path:
                return Node(NodeKind.DIR, writable=True)
            return Node(NodeKind.FILE, len(value), writable=True)

        async def lookup(self, path: tuple[str, ...]) -> Node:
            return self._node(path)

        async def listdir(self, path: tuple[str, ...]) -> list[tuple[str, Node]]:
            return [(k, self._node((*path, k))) for k in nodes[path][0]]

        async def read(self, path: tuple[str, ...]) -> bytes:
            return nodes[path][1]

    return Floor()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvpfs-xsbench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def bench_server(kind: str, args: argparse.Namespace, work: Path) -> None:
    server = Server(kind, work)
    mount: Mount | None = None
    try:
        server.start()
        leaves, _ = tree(args.nodes)
        fill(server.socket, leaves)
        ls_s, lines = xenstore_ls_seconds(server.socket, args.runs)
        print(f"\n== {kind}: {lines} nodes (xenstore-ls -f lines)")
        print(f"xenstore-ls -f /                      {ls_s * 1000:8.0f} ms")
        mount = Mount(server.socket, server.dir, args.attr_timeout)
        before = mount.stats()["requests"]
        cold = mount.traverse()
        after = mount.stats()
        cold_requests = delta(after["requests"], before)  # type: ignore[arg-type]
        warm_runs = []
        for _ in range(args.runs):
            warm_runs.append(mount.traverse())
        warm = min(warm_runs)
        final = mount.stats()
        warm_requests = delta(final["requests"], after["requests"])  # type: ignore[arg-type]
        print(
            f"find + cat, cold                      {cold * 1000:8.0f} ms"
            f"  {cold / ls_s:5.2f}x   requests {sum(cold_requests.values())} {cold_requests}"
        )
        print(
            f"find + cat, warm (best of {args.runs})           {warm * 1000:8.0f} ms"
            f"  {warm / ls_s:5.2f}x   requests {sum(warm_requests.values())}"
        )
        print(f"cached nodes {final['cached_nodes']}, mount RSS {final['rss_kib']} KiB")
        mount.stop()
        mount = None
        # The floor: the same tree from a dict, through the same FUSE layer.
        mount = Mount(server.socket, server.dir, args.attr_timeout, floor=True)
        mount.traverse()
        floor = min(mount.traverse() for _ in range(args.runs))
        print(
            f"FUSE floor: same tree from a dict     {floor * 1000:8.0f} ms"
            f"  {floor / ls_s:5.2f}x   (warm find + cat; no XenStore at all)"
        )
        mount.stop()
        mount = None

        if args.rss_nodes:
            # Only the domains not written yet (the first ones exist already).
            first = len({p.split("/")[3] for p, _ in leaves}) + 1
            more, _ = tree(args.rss_nodes - lines + 2, first_domid=first)
            fill(server.socket, more)
            _, lines = xenstore_ls_seconds(server.socket, 1)
            mount = Mount(server.socket, server.dir, args.attr_timeout)
            idle = mount.stats()["rss_kib"]
            took = mount.traverse()
            stats = mount.stats()
            print(
                f"memory: {lines} nodes; mount RSS {idle} KiB idle, {stats['rss_kib']} KiB"
                f" with {stats['cached_nodes']} nodes cached and {stats['inodes']} kernel"
                f" inodes (cold traversal {took:.1f} s)"
            )
            mount.stop()
            mount = None
    finally:
        if mount is not None:
            mount.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "mount":
        socket_path, mountpoint, stats_file, attr_timeout = args_list[1:5]
        serve_mount(socket_path, mountpoint, stats_file, float(attr_timeout))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--rss-nodes", type=int, default=100000, help="0 to skip the memory run")
    p.add_argument("--servers", default="embedded,real")
    p.add_argument("--attr-timeout", type=float, default=1.0, help="the mount's attr_timeout")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(args_list)
    print(f"kvpfs xenstore view; attr_timeout={args.attr_timeout}; {os.cpu_count()} CPUs")
    with workspace() as work:
        for kind in args.servers.split(","):
            if kind == "real" and not (os.path.exists(XENSTORED) and shutil.which("gcc")):
                print("\n== real: skipped (xen-utils-4.17 or gcc missing)")
                continue
            bench_server(kind, args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
