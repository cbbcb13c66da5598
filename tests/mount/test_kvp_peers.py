"""The real peers of the pool files, unmodified, beside a mounted kvpfs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from kvpfs.kvp.names import key_to_name
from kvpfs.kvp.records import RECORD_SIZE, parse, visible
from tests.kvp.test_interop import cloud_init, cloud_init_events, hyperkv
from tests.mount.kvp_fixtures import Pools, mount_kvp
from tests.mounting import in_thread, sh, write_bytes

pytestmark = pytest.mark.mount


async def test_hyperkv_reads_what_was_written_through_the_mount(mount, pools: Pools) -> None:
    _, kvp = await mount_kvp(mount, pools)
    await sh(f"echo 'hello world' > {kvp}/guest/Greeting && printf 'x' > {kvp}/guest/Other")
    await sh(f"echo changed > {kvp}/guest/Greeting && rm {kvp}/guest/Other")
    await sh(f"echo café > {kvp}/guest/Unicode")
    assert hyperkv(pools.path("guest")) == {"Greeting": "changed", "Unicode": "café"}


@pytest.mark.timeout(90)
async def test_cloud_init_appends_while_the_mount_writes_and_lists(mount, pools: Pools) -> None:
    _, kvp = await mount_kvp(mount, pools)
    proc = cloud_init(pools.path("guest"), count=200, pause_ms=3)
    written: dict[str, bytes] = {}
    listings: list[set[str]] = []
    done = trio.Event()

    def writer(n: int) -> None:
        name = f"kvpfs-key-{n % 40}"
        value = f"value {n}".encode()
        write_bytes(f"{kvp}/guest/{name}", value + b"\n")
        written[name] = value

    async def wait_for_cloud_init() -> None:
        out, err = await trio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 0, err
        assert out == "done\n"
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_cloud_init)
            n = 0
            while not done.is_set():
                await in_thread(writer, n)
                if n % 10 == 0:
                    listings.append(set(await in_thread(os.listdir, f"{kvp}/guest")))
                n += 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    data = pools.bytes("guest")
    assert len(data) % RECORD_SIZE == 0
    records = parse(data)
    assert len({r.key for r in records}) == len(records), "a key was stored twice"
    current = visible(records)
    events = cloud_init_events(current)
    assert set(events) == {f"init-local/search-{i}" for i in range(200)}
    for i in range(200):
        assert events[f"init-local/search-{i}"] == ([0, 1, 2, 3] if i % 5 == 0 else [0])
    ours = {k.decode(): v for k, v in current.items() if not k.startswith(b"CLOUD_INIT|")}
    assert ours == written
    # The mount lists every record under its one name, and reads each value exactly.
    listed = set(await in_thread(os.listdir, f"{kvp}/guest"))
    assert listed == {key_to_name(k) for k in current}
    for key, value in list(current.items())[:50]:
        got = (await sh(["cat", f"{kvp}/guest/{key_to_name(key)}"])).stdout
        assert got == value + b"\n"
        if key.startswith(b"CLOUD_INIT|"):
            assert json.loads(value)["type"] == "start"
    assert all(listing for listing in listings)


def test_waagent_is_extracted() -> None:
    # waagent reads the hard-coded /var/lib/hyperv/.kvp_pool_0; it is exercised
    # inside `kvpfs hostsim`, where that path is private (tests/hyperv).
    root = Path(__file__).resolve().parents[2] / ".cache/peers/waagent"
    if not root.is_dir():
        pytest.skip("Debian's waagent is not extracted (scripts/setup.sh --test fetches it)")
    result = subprocess.run(
        [sys.executable, "-c", "import azurelinuxagent.common.rdma"],
        env={**os.environ, "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
