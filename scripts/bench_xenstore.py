#!/usr/bin/env python3
"""Throughput of the embedded xenstored against cxenstored 4.17, same client, same run.

Usage: .venv/bin/python scripts/bench_xenstore.py [--seconds S] [--nodes N]

Both servers run as separate processes (the embedded one as ``python -m
kvpfs.peers.xenstored.server``; cxenstored under the test shim of tests/xenstore/fakexen.c,
compiled into a temporary directory).  One plain blocking client (raw sockets plus
kvpfs.xenstore.protocol framing) drives both, so the client cost is identical.
Prints operations per second for each workload and the ratio embedded/cxenstored,
then the resident memory of the embedded server holding N nodes.

The machine may be shared: the two servers run side by side and the workload
alternates between them for ``--rounds`` short rounds, so that load from elsewhere
hits both alike.  The rate shown is the median of the rounds, with the spread
(lowest-highest) beside it; the ratio is that of the medians.  The server's CPU
time per operation (user + system, from /proc) is shown too: it varies much less
with outside load than the rate does.

The embedded server inherits ``KVPFS_TRIO_FASTPATH`` (see
kvpfs/peers/xenstored/trio_fastpath.py): run once with ``=1`` and once with ``=0`` to
compare the fast path with the public-API-only fallback.  The first line printed
says which one ran.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from kvpfs.peers.xenstored import trio_fastpath  # noqa: E402
from kvpfs.xenstore.protocol import HEADER, Op  # noqa: E402

XENSTORED = "/usr/lib/xen-4.17/bin/xenstored"
SHIM = REPO / "tests" / "xenstore" / "fakexen.c"

_pack = HEADER.pack
_unpack = HEADER.unpack_from


class Client:
    """Minimal blocking client: send frames, read whole replies, skip nothing."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(500):
            try:
                self.sock.connect(path)
                break
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.01)
        self.buf = b""

    def send(self, mtype: int, payload: bytes, tx: int = 0, rid: int = 0) -> None:
        self.sock.sendall(_pack(mtype, rid, tx, len(payload)) + payload)

    def recv(self) -> tuple[int, int, int, bytes]:
        buf = self.buf
        while True:
            if len(buf) >= 16:
                t, r, x, n = _unpack(buf)
                if len(buf) >= 16 + n:
                    self.buf = buf[16 + n :]
                    return t, r, x, buf[16 : 16 + n]
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("server closed")
            buf += data

    def rq(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        self.send(mtype, payload, tx)
        while True:
            t, _, _, p = self.recv()
            if t != Op.WATCH_EVENT:
                if t == Op.ERROR:
                    raise OSError(p.decode())
                return p

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], path: str, tmp: str) -> None:
        self.name = name
        self.proc = proc
        self.path = path
        self.tmp = tmp

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_embedded() -> Server:
    tmp = tempfile.mkdtemp(prefix="bxe-")
    path = os.path.join(tmp, "sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpfs.peers.xenstored.server", path],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    _pin(proc.pid)
    return Server("embedded", proc, path, tmp)


def start_real(shim: str) -> Server:
    tmp = tempfile.mkdtemp(prefix="bxr-")
    env = dict(os.environ, XENSTORED_RUNDIR=tmp, LD_PRELOAD=shim)
    proc = subprocess.Popen(
        [XENSTORED, "-N", "-F", os.path.join(tmp, "pid")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    path = os.path.join(tmp, "socket")
    for _ in range(500):
        if os.path.exists(path):
            break
        time.sleep(0.01)
    _pin(proc.pid)
    return Server("cxenstored", proc, path, tmp)


#: CPU the servers are pinned to (--cpus), None: not pinned.
SERVER_CPU: int | None = None


def _pin(pid: int) -> None:
    if SERVER_CPU is not None:
        os.sched_setaffinity(pid, {SERVER_CPU})


def build_shim() -> str | None:
    if not os.path.exists(XENSTORED) or shutil.which("gcc") is None:
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="bxs-"), "fakexen.so")
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", out, str(SHIM), "-ldl"]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        return None
    return out


# --------------------------------------------------------------------------- workloads


class Rate(float):
    """Operations per second; ``ops`` is how many were timed."""

    ops: int


def timed(seconds: float, batch: Callable[[], int]) -> Rate:
    """Operations per second of ``batch`` (which returns its operation count)."""
    batch()  # warm-up
    done = 0
    start = time.perf_counter()
    while True:
        done += batch()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            rate = Rate(done / elapsed)
            rate.ops = done
            return rate


def sequential_reads(path: str, seconds: float) -> Rate:
    c = Client(path)
    c.rq(Op.WRITE, b"/bench/r\0value")
    req = b"/bench/r\0"

    def batch() -> int:
        for _ in range(200):
            c.rq(Op.READ, req)
        return 200

    try:
        return timed(seconds, batch)
    finally:
        c.close()


def pipelined_reads(path: str, seconds: float, depth: int = 64) -> Rate:
    c = Client(path)
    c.rq(Op.WRITE, b"/bench/r\0value")
    frame = _pack(Op.READ, 0, 0, 9) + b"/bench/r\0"

    def batch() -> int:
        # Keep ``depth`` requests in flight: top up as replies come back.
        total = 2000
        sent = min(depth, total)
        c.sock.sendall(frame * sent)
        got = 0
        while got < total:
            c.recv()
            got += 1
            if sent < total:
                c.sock.sendall(frame)
                sent += 1
        return total

    try:
        return timed(seconds, batch)
    finally:
        c.close()


def sequential_writes(path: str, seconds: float) -> Rate:
    c = Client(path)
    counter = [0]

    def batch() -> int:
        for _ in range(200):
            counter[0] += 1
            c.rq(Op.WRITE, b"/bench/w/%d\0value" % (counter[0] % 1000))
        return 200

    try:
        return timed(seconds, batch)
    finally:
        c.close()


def transaction_commits(path: str, seconds: float) -> Rate:
    """START, READ, WRITE, END T: one committed transaction per operation."""
    c = Client(path)
    c.rq(Op.WRITE, b"/bench/tx\0" + b"0")

    def batch() -> int:
        for _ in range(50):
            tx = int(c.rq(Op.TRANSACTION_START, b"\0")[:-1])
            value = c.rq(Op.READ, b"/bench/tx\0", tx)
            c.rq(Op.WRITE, b"/bench/tx\0" + value, tx)
            c.rq(Op.TRANSACTION_END, b"T\0", tx)
        return 50

    try:
        return timed(seconds, batch)
    finally:
        c.close()


def fan_out(path: str, seconds: float, watchers: int = 100) -> Rate:
    """One write, its reply and the event at each of ``watchers`` connections."""
    conns = [Client(path) for _ in range(watchers)]
    for i, w in enumerate(conns):
        w.rq(Op.WATCH, b"/bench/fan\0t%d\0" % i)
        w.recv()  # initial event
    c = Client(path)

    def batch() -> int:
        for _ in range(20):
            c.rq(Op.WRITE, b"/bench/fan\0v")
            for w in conns:
                w.recv()
        return 20

    try:
        return timed(seconds, batch)
    finally:
        for w in [*conns, c]:
            w.close()


def rss_with_nodes(nodes: int) -> tuple[float, float]:
    """(RSS MiB of a fresh embedded server, RSS MiB holding ``nodes`` more nodes)."""
    server = start_embedded()
    try:
        base = _rss_mib(server.proc.pid)
        c = Client(server.path)
        frames = []
        for i in range(nodes):
            # 100 directories of 1000 nodes, names and values of realistic size.
            payload = b"/local/domain/%d/device/vbd/%d/state\0%d" % (i // 1000, i % 1000, i % 7)
            frames.append(_pack(Op.WRITE, i, 0, len(payload)) + payload)
            if len(frames) == 256:
                c.sock.sendall(b"".join(frames))
                for _ in frames:
                    c.recv()
                frames = []
        if frames:
            c.sock.sendall(b"".join(frames))
            for _ in frames:
                c.recv()
        c.close()
        time.sleep(0.2)
        return base, _rss_mib(server.proc.pid)
    finally:
        server.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


WORKLOADS: list[tuple[str, Callable[[str, float], Rate]]] = [
    ("sequential reads", sequential_reads),
    ("pipelined reads (64 in flight)", pipelined_reads),
    ("sequential writes", sequential_writes),
    ("transaction commits", transaction_commits),
    ("write fanned out to 100 watchers", fan_out),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per workload and server")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per workload")
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--only", help="run only workloads whose name contains this")
    parser.add_argument(
        "--cpus", help="SERVER,CLIENT: pin the servers and the client to these CPUs"
    )
    args = parser.parse_args()
    if args.cpus:
        global SERVER_CPU
        server_cpu, client_cpu = (int(c) for c in args.cpus.split(","))
        SERVER_CPU = server_cpu
        os.sched_setaffinity(0, {client_cpu})

    switch = os.environ.get(trio_fastpath.ENV)
    print(
        f"embedded server: trio fast path {'on' if trio_fastpath.ENABLED else 'off'} "
        f"({trio_fastpath.ENV}={switch if switch is not None else '(unset)'}, "
        f"trio {trio.__version__})",
        flush=True,
    )
    shim = build_shim()
    if shim is None:
        print("cxenstored 4.17 or gcc missing: only the embedded server is measured")
    rows = []
    for name, fn in WORKLOADS:
        if args.only and args.only not in name:
            continue
        servers = [start_embedded(), *([start_real(shim)] if shim else [])]
        rates: dict[str, list[float]] = {s.name: [] for s in servers}
        cpu: dict[str, list[float]] = {s.name: [] for s in servers}
        try:
            for i in range(args.rounds):
                # Alternate which server goes first, so neither always follows the
                # other's after-effects (page cache, scheduler state).
                for server in servers if i % 2 == 0 else servers[::-1]:
                    before = _cpu_seconds(server.proc.pid)
                    rate = fn(server.path, args.seconds / args.rounds)
                    used = _cpu_seconds(server.proc.pid) - before
                    rates[server.name].append(rate)
                    # The warm-up batch is not in rate.ops: a slight overestimate.
                    cpu[server.name].append(used / rate.ops * 1e6)
        finally:
            for server in servers:
                server.stop()
        rows.append((name, rates, cpu))

    print(
        f"{'workload':33} {'embedded/s':>10} {'(spread)':>15} {'cxenstored/s':>12} "
        f"{'(spread)':>15} {'ratio':>6} {'CPU us/op emb':>13} {'cx':>5}"
    )
    for name, rates, cpu in rows:
        emb = statistics.median(rates["embedded"])
        emb_cpu = statistics.median(cpu["embedded"])
        spread = f"({min(rates['embedded']):.0f}-{max(rates['embedded']):.0f})"
        if "cxenstored" in rates:
            real = statistics.median(rates["cxenstored"])
            real_cpu = f"{statistics.median(cpu['cxenstored']):5.1f}"
            real_s = f"{real:12.0f}"
            real_spread = f"({min(rates['cxenstored']):.0f}-{max(rates['cxenstored']):.0f})"
            ratio = f"{emb / real:5.2f}x"
        else:
            real_s, real_spread, ratio, real_cpu = f"{'n/a':>12}", "", "  n/a", "  n/a"
        print(
            f"{name:33} {emb:10.0f} {spread:>15} {real_s} {real_spread:>15} {ratio:>6} "
            f"{emb_cpu:13.1f} {real_cpu}"
        )
    if not args.only:
        base, full = rss_with_nodes(args.nodes)
        print(
            f"embedded RSS: {base:.1f} MiB at start, {full:.1f} MiB holding {args.nodes} more nodes"
        )
    if shim:
        shutil.rmtree(os.path.dirname(shim), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
