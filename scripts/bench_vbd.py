#!/usr/bin/env python3
"""vbd attach and detach latency in embedded mode (target: under 20 ms median).

Usage: .venv/bin/python scripts/bench_vbd.py [--rounds N] [--no-mount]

One trio process holds what kvpfs's embedded mode holds: the embedded xenstored
(dom0 and guest 1 as domain creation leaves them), the vbd view with the simulated
xbdback and blkfront, and (unless --no-mount, or FUSE is unusable) a FUSE mount.
Each round attaches a 1 MiB image as xvdb of domain 1 and detaches it:

* through the mount: a thread writes ``1 <image>,raw,xvdb,rw`` to ``vbd/attach``
  and closes it (close() returns once the backend is in InitWait with hotplug
  connected), then ``rmdir vbd/xbdback1i51728``;
* through the toolstack API directly (no kernel in the path).

Printed per path, as median and 90th percentile over the rounds (after a few
warm-up rounds):

* attach: until the attach request returned;
* attach→connected: until the backend *and* the frontend are Connected (4),
  as seen by a watch on both ``state`` nodes;
* detach→gone: until the detach returned, which is after the frontend, backend
  and /libxl paths were removed.

The first line is a baseline: the median round trip of one XenStore read on the
same loop, since every figure is a multiple of it (an attach→connected cycle is
about 130 requests by the toolstack and the two drivers).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from kvpfs.fs.mount import Session, force_unmount, fuse_options, mounted_at, serve  # noqa: E402
from kvpfs.fs.operations import FsOptions, Operations  # noqa: E402
from kvpfs.fs.view import Path as FsPath  # noqa: E402
from kvpfs.fs.view import View  # noqa: E402
from kvpfs.peers.xendrivers import SimulatedXen  # noqa: E402
from kvpfs.peers.xenstored.server import serve_xenstored  # noqa: E402
from kvpfs.vbd.layout import device_paths  # noqa: E402
from kvpfs.vbd.view import VbdView  # noqa: E402
from kvpfs.xenstore.client import XenStoreClient, XenStoreError  # noqa: E402

TARGET_MS = 20.0
Step = Callable[[], Awaitable[None]]
GUEST = 1
DEVID = 51728  # xvdb


class _NoSink:
    def value_changed(self, backend: View, path: FsPath) -> None:
        return None

    def entries_changed(self, backend: View, directory: FsPath, names: Sequence[str]) -> None:
        return None


def fuse_reason() -> str | None:
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse: {exc.strerror}"
    if os.geteuid() != 0:
        return "mounting needs root here"
    return None


async def read_state(client: XenStoreClient, path: str) -> bytes | None:
    try:
        return await client.read(path)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


async def timed_round(
    client: XenStoreClient,
    attach: Callable[[], Awaitable[None]],
    detach: Callable[[], Awaitable[None]],
) -> tuple[float, float, float]:
    paths = device_paths(GUEST, 0, DEVID)
    be, fe = f"{paths.backend}/state", f"{paths.frontend}/state"
    async with client.watch(be) as be_watch, client.watch(fe) as fe_watch:
        connected = trio.Event()

        async def follow(watch: object) -> None:
            async for _ in watch:  # type: ignore[attr-defined]
                if await read_state(client, be) == b"4" and await read_state(client, fe) == b"4":
                    connected.set()
                    return

        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await attach()
            t1 = time.perf_counter()
            nursery.start_soon(follow, be_watch)
            nursery.start_soon(follow, fe_watch)
            with trio.fail_after(10):
                await connected.wait()
            t2 = time.perf_counter()
            nursery.cancel_scope.cancel()
    t3 = time.perf_counter()
    await detach()
    t4 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t0) * 1000, (t4 - t3) * 1000


def summary(label: str, values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
    return f"  {label:<18} median {statistics.median(values):7.2f} ms   p90 {p90:7.2f} ms"


async def bench(rounds: int, warmup: int, use_mount: bool) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kvpfs-bench-vbd-"))
    sock = str(tmp / "xs.sock")
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    mnt = tmp / "mnt"
    mnt.mkdir()
    session: Session | None = None
    worst = 0.0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_xenstored, sock, initial="domains"))
            await nursery.start(SimulatedXen(sock).run)
            vbd = VbdView(sock)
            if use_mount:
                ops = Operations([vbd], FsOptions())
                session = await nursery.start(serve, ops, str(mnt), fuse_options())
            else:
                await nursery.start(vbd.run, _NoSink())
            async with XenStoreClient(sock) as client:
                samples = []
                for _ in range(300):
                    s = time.perf_counter()
                    await client.read("/local/domain/1/name")
                    samples.append((time.perf_counter() - s) * 1e6)
                rtt = statistics.median(samples)
                print(f"baseline: one XenStore read round trip, median {rtt:.0f} µs")

                paths_tried: list[tuple[str, Step, Step]] = []
                request = f"{GUEST} {image},raw,xvdb,rw\n".encode()

                def write_attach() -> None:
                    fd = os.open(mnt / "vbd" / "attach", os.O_WRONLY | os.O_TRUNC)
                    try:
                        os.write(fd, request)
                    finally:
                        os.close(fd)

                if use_mount:
                    paths_tried.append(
                        (
                            "through the mount (write vbd/attach, rmdir)",
                            functools.partial(trio.to_thread.run_sync, write_attach),
                            functools.partial(
                                trio.to_thread.run_sync,
                                os.rmdir,
                                mnt / "vbd" / f"xbdback{GUEST}i{DEVID}",
                            ),
                        )
                    )
                ts = vbd.toolstack

                async def api_attach() -> None:
                    await ts.attach(GUEST, f"{image},raw,xvdb,rw")

                async def api_detach() -> None:
                    await ts.detach(GUEST, DEVID)

                paths_tried.append(("toolstack API (no kernel)", api_attach, api_detach))
                for label, attach, detach in paths_tried:
                    results = [
                        await timed_round(client, attach, detach) for _ in range(warmup + rounds)
                    ][warmup:]
                    print(f"{label}, {rounds} rounds:")
                    print(summary("attach", [r[0] for r in results]))
                    print(summary("attach→connected", [r[1] for r in results]))
                    print(summary("detach→gone", [r[2] for r in results]))
                    worst = max(
                        worst,
                        statistics.median(r[1] for r in results),
                        statistics.median(r[2] for r in results),
                    )
            if session is not None:
                await session.stop()
            nursery.cancel_scope.cancel()
    finally:
        if session is not None and mounted_at(str(mnt)):
            force_unmount(str(mnt))
        shutil.rmtree(tmp, ignore_errors=True)
    verdict = "met" if worst < TARGET_MS else "NOT met"
    print(f"target: medians under {TARGET_MS:g} ms: {verdict} (worst median {worst:.2f} ms)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-mount", action="store_true", help="only the toolstack API")
    args = parser.parse_args()
    use_mount = not args.no_mount
    if use_mount and (reason := fuse_reason()) is not None:
        print(f"no mount ({reason}): measuring the toolstack API only")
        use_mount = False
    return trio.run(bench, args.rounds, args.warmup, use_mount)


if __name__ == "__main__":
    sys.exit(main())
