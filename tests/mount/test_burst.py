"""A dom0-sized burst of XenStore writes against a default mount: nothing ends it.

A toolstack writes a thousand domains' nodes in bursts; the simulated block
backend watches those trees. Before, its event queue overflowed past 65,536
events and took the whole mount down (kvp/ included).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kvpfs.xenstore.protocol import Decoder, Message, Op, encode_message
from tests.mount.cli_support import run
from tests.mount.kvp_fixtures import Pools, rec

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("private_runtime_dir")]

WRITES = 130_000
PIPELINE = 500


def pipelined_writes(path: str, paths: list[str]) -> None:
    """WRITE each path, PIPELINE requests in flight, as a toolstack's burst."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        decoder = Decoder()
        for start in range(0, len(paths), PIPELINE):
            batch = paths[start : start + PIPELINE]
            sock.sendall(b"".join(
                encode_message(Message(Op.WRITE, n, 0, p.encode() + b"\0" + b"v")) for n, p in enumerate(batch)
            ))
            replies = 0
            while replies < len(batch):
                chunk = sock.recv(1 << 16)
                assert chunk, "xenstored closed the connection"
                decoder.feed(chunk)
                for message in decoder:
                    assert message.type == Op.WRITE, message
                    replies += 1


def test_a_burst_of_backend_writes_ends_nothing(mnt: Path, pools: Pools, tmp_path: Path) -> None:
    result = run(str(mnt), "--kvp-dir", str(pools.directory), timeout=60)
    assert result.returncode == 0, result.stderr
    sock = (mnt / ".kvpfs/xenstored-path").read_text().strip()
    # Under the tree the simulated xbdback watches, in shapes it must skip.
    paths = [f"/local/domain/0/backend/vbd/burst{n % 1000}/x{n}" for n in range(WRITES)]
    pipelined_writes(sock, paths)
    # Every view still serves: an attach still reaches Connected, kvp/ still writes.
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    (mnt / "vbd/attach").write_text(f"1 {image},raw,xvdb,rw\n")
    device = mnt / "vbd/xbdback1i51728"
    deadline = time.monotonic() + 10
    while (device / "frontend-state").read_text() != "4\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (device / "backend-state-name").read_text() == "Connected\n"
    (mnt / "kvp/guest/after-burst").write_text("ok\n")
    assert pools.bytes("guest") == rec(b"after-burst", b"ok")
    assert (mnt / f"xenstore/local/domain/0/backend/vbd/burst7/x{WRITES - 993}").read_text() == "v\n"
