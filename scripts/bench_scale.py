#!/usr/bin/env python3
"""dom0 scale: a thousand guests with four disks each, on the embedded xenstored and
on cxenstored 4.17 in the same run.

The tree is what a toolstack leaves: each domain's home as domain creation lays it
out, and for each disk the frontend, backend and ``/libxl`` nodes of libxl 4.17's
attach transaction plus the keys the connected drivers write (state 4, sectors,
ring-ref, ...).  Requests are pipelined 500 at a time, as a busy toolstack's are.

For each server it prints: the time of the writes, the server's RSS afterwards,
``xenstore-ls -f /`` over the whole tree, and ``ls -l MNT/vbd/`` through a kvpfs
mount on that server (cold, then warm) with the mount's RSS.  Then, on a default
mount (embedded xenstored and simulated drivers) holding the same tree, the
latency of one more attach to Connected.

    .venv/bin/python scripts/bench_scale.py [--domains 1000] [--disks 4] [--no-real]

Needs root and /dev/fuse (the mounts); cxenstored needs xen-utils-4.17, gcc and
libxen-dev (as the test suite does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_xenstore as bx

from kvpfs.vbd.diskspec import parse_disk_spec
from kvpfs.vbd.layout import (
    MKDIR,
    SET_PERMS,
    WRITE,
    attach_ops,
    device_paths,
    dom0_ops,
    domain_creation_ops,
)
from kvpfs.xenstore.protocol import Decoder, Message, Op, encode_args, encode_message

PIPELINE = 500
#: The disk attached on top of the tree (guest 1), beyond the tree's xvda-xvdd.
EXTRA_DISK = "xvdz"
KVPFS = [sys.executable, "-m", "kvpfs"]


def tree_requests(domains: int, disks: int) -> list[bytes]:
    """The frames that build the tree (removals of absent paths left out)."""
    ops = list(dom0_ops())
    for domid in range(1, domains + 1):
        ops += domain_creation_ops(domid, f"guest{domid}")
        for disk in range(disks):
            spec = parse_disk_spec(f"/srv/guest{domid}-{disk}.img,raw,xvd{chr(97 + disk)},w")
            assert spec.devid is not None
            ops += attach_ops(domid, 0, spec.devid, spec)
            paths = device_paths(domid, 0, spec.devid)
            for key, value in (
                ("physical-device", "fe:%x" % (domid * 4 + disk)), ("hotplug-status", "connected"),
                ("sectors", "2097152"), ("sector-size", "512"), ("info", "0"),
                ("feature-flush-cache", "1"), ("state", "4"),
            ):
                ops.append(type(ops[0])(WRITE, f"{paths.backend}/{key}", value.encode()))
            for key, value in (("ring-ref", "8"), ("event-channel", "17"), ("state", "4")):
                ops.append(type(ops[0])(WRITE, f"{paths.frontend}/{key}", value.encode()))
    frames = []
    for n, op in enumerate(ops):
        if op.op == WRITE:
            payload = op.path.encode() + b"\0" + op.value
            frames.append(encode_message(Message(Op.WRITE, n, 0, payload)))
        elif op.op == MKDIR:
            frames.append(encode_message(Message(Op.MKDIR, n, 0, encode_args(op.path))))
        elif op.op == SET_PERMS:
            payload = encode_args(op.path, *op.perms)
            frames.append(encode_message(Message(Op.SET_PERMS, n, 0, payload)))
    return frames


def send_pipelined(path: str, frames: list[bytes]) -> float:
    """Seconds to send every frame and read every reply, PIPELINE in flight."""
    client = bx.Client(path)
    decoder = Decoder()
    started = time.perf_counter()
    for start in range(0, len(frames), PIPELINE):
        batch = frames[start : start + PIPELINE]
        client.sock.sendall(b"".join(batch))
        replies = 0
        while replies < len(batch):
            chunk = client.sock.recv(1 << 18)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            decoder.feed(chunk)
            for message in decoder:
                if message.type == Op.ERROR:
                    raise OSError(f"request refused: {message.payload!r}")
                if message.type != Op.WATCH_EVENT:
                    replies += 1
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def xenstore_ls(path: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(
        ["xenstore-ls", "-f", "/"], env={**os.environ, "XENSTORED_PATH": path},
        capture_output=True, check=True,
    ).stdout
    return time.perf_counter() - started, out.count(b"\n")


def mount_pid(mnt: str) -> int:
    with open(f"{mnt}/.kvpfs/pid") as f:
        return int(f.read())


def timed_ls(mnt: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(["ls", "-l", f"{mnt}/vbd/"], capture_output=True, check=True).stdout
    return time.perf_counter() - started, out.count(b"\n") - 1


class Mount:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="kvpfs-scale-")
        self.path = os.path.join(self.tmp, "mnt")
        os.mkdir(self.path)
        os.mkdir(os.path.join(self.tmp, "kvp"))
        self.env = {**os.environ, "XDG_RUNTIME_DIR": self.tmp, **(env or {})}
        done = subprocess.run(
            [*KVPFS, self.path, "--kvp-dir", os.path.join(self.tmp, "kvp"), *args],
            env=self.env, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        self.pid = mount_pid(self.path)

    def close(self) -> None:
        subprocess.run([*KVPFS, "unmount", self.path], capture_output=True, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure_server(server: bx.Server, frames: list[bytes]) -> dict[str, float]:
    row: dict[str, float] = {}
    row["writes"] = send_pipelined(server.path, frames)
    row["rss"] = bx._rss_mib(server.proc.pid)
    row["ls_f"], row["lines"] = xenstore_ls(server.path)
    mount = Mount("--xenstore", server.path, "-o", "attr_timeout=1")
    try:
        row["ls_cold"], row["entries"] = timed_ls(mount.path)
        row["ls_warm"] = min(timed_ls(mount.path)[0] for _ in range(3))
        row["mount_rss"] = bx._rss_mib(mount.pid)
    finally:
        mount.close()
    return row


def attach_latency(frames: list[bytes], rounds: int) -> tuple[float, float]:
    """A default mount holding the tree: median attach -> Connected, and its RSS."""
    mount = Mount()
    try:
        with open(f"{mount.path}/.kvpfs/xenstored-path") as f:
            sock = f.read().strip()
        send_pipelined(sock, frames)
        image = os.path.join(mount.tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        samples = []
        devid = parse_disk_spec(f"{image},raw,{EXTRA_DISK},rw").devid
        for _ in range(rounds):
            started = time.perf_counter()
            with open(f"{mount.path}/vbd/attach", "w") as f:
                f.write(f"1 {image},raw,{EXTRA_DISK},rw\n")
            device = f"{mount.path}/vbd/xbdback1i{devid}"
            while True:
                with open(f"{device}/frontend-state") as state:
                    if state.read() == "4\n":
                        break
                time.sleep(0.001)
            samples.append(time.perf_counter() - started)
            os.rmdir(device)
        return statistics.median(samples), bx._rss_mib(mount.pid)
    finally:
        mount.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--disks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="attaches timed (median)")
    p.add_argument("--no-real", action="store_true", help="skip cxenstored")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_scale: needs root (it mounts kvpfs)", file=sys.stderr)
        return 1
    frames = tree_requests(args.domains, args.disks)
    print(f"tree: {args.domains} domains x {args.disks} disks, {len(frames)} requests "
          f"pipelined {PIPELINE} at a time")
    rows: dict[str, dict[str, float]] = {}
    server = bx.start_embedded()
    try:
        rows["embedded"] = measure_server(server, frames)
    finally:
        server.stop()
    shim = None if args.no_real else bx.build_shim()
    if shim is not None:
        server = bx.start_real(shim)
        try:
            rows["cxenstored"] = measure_server(server, frames)
        finally:
            server.stop()
    elif not args.no_real:
        print("cxenstored: not available (xen-utils-4.17, gcc, libxen-dev)")
    names = list(rows)
    ratio = "  ratio" if len(names) == 2 else ""
    print(f"\n{'':36}" + "".join(f"{n:>14}" for n in names) + ratio)
    for key, label, unit in (
        ("writes", "the writes", "s"),
        ("rss", "server RSS afterwards", "MiB"),
        ("ls_f", "xenstore-ls -f / ", "s"),
        ("ls_cold", "ls -l MNT/vbd/ cold", "s"),
        ("ls_warm", "ls -l MNT/vbd/ warm", "s"),
        ("mount_rss", "mount RSS after ls", "MiB"),
    ):
        values = [rows[n][key] for n in names]
        line = f"{label + ' (' + unit + ')':36}" + "".join(f"{v:14.3f}" for v in values)
        if len(values) == 2 and values[1]:
            line += f"  {values[0] / values[1]:.2f}x"
        print(line)
    first = rows[names[0]]
    print(f"(xenstore-ls printed {int(first['lines'])} lines; "
          f"vbd/ listed {int(first['entries'])} entries)")
    latency, rss = attach_latency(frames, args.rounds)
    print(f"\nattach -> Connected on the full tree (default mount, median of {args.rounds}): "
          f"{latency * 1000:.1f} ms; mount RSS {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
