"""The real peers of the pool files, unmodified: hyperkv (reader) and cloud-init (writer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from kvpfs.kvp.location import create_pools
from kvpfs.kvp.names import key_to_name
from kvpfs.kvp.records import RECORD_SIZE, encode_record, parse, visible
from kvpfs.kvp.view import KvpView

from .helpers import HERE
from .test_concurrency import kvpfs_writer

ROOT = HERE.parent.parent
CLOUD_INIT = ROOT / ".cache/peers/cloud-init/usr/lib/python3/dist-packages"


def hyperkv_cli() -> str:
    found = shutil.which("hyperkv") or str(Path(sys.executable).with_name("hyperkv"))
    if not os.access(found, os.X_OK):
        pytest.skip("the hyperkv command (PyPI hyperkv) is not installed")
    return found


def hyperkv(path: Path) -> dict[str, str]:
    out = subprocess.run(
        [hyperkv_cli(), "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, str] = json.loads(out)
    return result


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hyperv"
    create_pools(str(directory))
    return directory


async def test_hyperkv_reads_what_kvpfs_wrote(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    expected = {
        "HostName": "guest-1",
        "unicode key é": "välue ✓",
        "a/b|c": "slash in key",
        "k" * 254: "v" * 1022,
        "\U0001f600": "\U0001f600" * 511,
        "empty": "",
    }
    for key, value in expected.items():
        await backend.write(("guest", key_to_name(key.encode())), value.encode())
    await backend.write(("guest", "gone"), b"x")
    await backend.write(("guest", "HostName"), b"guest-2")
    await backend.remove(("guest", "gone"))
    await backend.rename(("guest", "empty"), ("guest", "renamed"), replace=False)
    expected["HostName"] = "guest-2"
    expected["renamed"] = expected.pop("empty")
    assert hyperkv(pool_dir / ".kvp_pool_1") == expected


async def test_hyperkv_reads_fields_filled_to_the_format_limit(pool_dir: Path) -> None:
    # hyperkv drops the last byte of a field without NUL: kvpfs always leaves the NUL.
    backend = KvpView(str(pool_dir), limits="format")
    await backend.write(("guest", "k" * 511), b"v" * 2047)
    assert hyperkv(pool_dir / ".kvp_pool_1") == {"k" * 511: "v" * 2047}


async def test_duplicates_first_for_kvpfs_last_for_hyperkv(pool_dir: Path) -> None:
    # A documented difference between readers, not a kvpfs choice: the daemon,
    # and so the host, acts on the first record.
    path = pool_dir / ".kvp_pool_1"
    path.write_bytes(encode_record(b"dup", b"first") + encode_record(b"dup", b"second"))
    assert await KvpView(str(pool_dir)).read(("guest", "dup")) == b"first"
    assert hyperkv(path) == {"dup": "second"}


async def test_hyperkv_no_longer_sees_a_partial_tail_after_a_set(pool_dir: Path) -> None:
    # hyperkv reads a partial tail as one more (bogus) entry; the daemon ignores it.
    # kvpfs puts a new record where the tail was, as the daemon's rewrite would.
    path = pool_dir / ".kvp_pool_1"
    path.write_bytes(encode_record(b"a", b"1") + b"tailkey")
    assert hyperkv(path) == {"a": "1", "tailke": ""}
    backend = KvpView(str(pool_dir))
    assert [name for name, _ in await backend.listdir(("guest",))] == ["a"]
    await backend.write(("guest", "b"), b"2")
    assert hyperkv(path) == {"a": "1", "b": "2"}


def cloud_init(path: Path, count: int, pause_ms: float) -> subprocess.Popen[str]:
    if not (CLOUD_INIT / "cloudinit/reporting/handlers.py").is_file():
        pytest.skip("Debian's cloud-init is not extracted (scripts/setup.sh --test fetches it)")
    env = dict(os.environ, PYTHONPATH=str(CLOUD_INIT))
    return subprocess.Popen(
        [sys.executable, str(HERE / "cloudinit_writer.py"), str(path), str(count), str(pause_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def cloud_init_events(records: dict[bytes, bytes]) -> dict[str, list[int]]:
    """Event name → the msg_i of its records (a split event has several)."""
    found: dict[str, list[int]] = {}
    for key, value in records.items():
        if key.startswith(b"CLOUD_INIT|"):
            data = json.loads(value)
            found.setdefault(data["name"], []).append(data.get("msg_i", 0))
    return {name: sorted(parts) for name, parts in found.items()}


@pytest.mark.timeout(60)
async def test_cloud_init_appends_while_kvpfs_writes_and_lists(pool_dir: Path) -> None:
    path = pool_dir / ".kvp_pool_1"
    backend = KvpView(str(pool_dir))
    proc = cloud_init(path, count=300, pause_ms=3)
    models: list[dict[str, str]] = [{}, {}]
    done = trio.Event()

    async def wait_for_cloud_init() -> None:
        out, err = await trio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 0, err
        assert out == "done\n"
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_cloud_init)
            for task, model in enumerate(models):
                nursery.start_soon(kvpfs_writer, backend, task, model, done)
    finally:
        proc.kill()
        proc.wait()

    data = path.read_bytes()
    assert len(data) % RECORD_SIZE == 0
    records = parse(data)
    assert len({r.key for r in records}) == len(records), "duplicate records"
    current = visible(records)
    # Every event, every part of a split one, exactly once.
    events = cloud_init_events(current)
    assert set(events) == {f"init-local/search-{i}" for i in range(300)}
    for i in range(300):
        assert events[f"init-local/search-{i}"] == ([0, 1, 2, 3] if i % 5 == 0 else [0])
    expected = {name: value for model in models for name, value in model.items()}
    mine = {k.decode(): v.decode() for k, v in current.items() if not k.startswith(b"CLOUD_INIT|")}
    assert mine == expected
    # kvpfs lists every cloud-init key under its escaped name ("/" → "%2f") and reads it.
    listing = dict(await backend.listdir(("guest",)))
    for key, value in current.items():
        name = key_to_name(key)
        assert listing[name].size == len(value)
        assert await backend.read(("guest", name)) == value
        if key.startswith(b"CLOUD_INIT|"):
            assert "init-local%2fsearch-" in name


async def test_cloud_init_truncating_a_stale_pool_is_seen(pool_dir: Path) -> None:
    # cloud-init empties the guest pool once per process when its mtime is older
    # than the boot: a write by kvpfs from before the boot must be gone afterwards.
    path = pool_dir / ".kvp_pool_1"
    backend = KvpView(str(pool_dir))
    await backend.write(("guest", "from-last-boot"), b"old")
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    os.utime(path, (boot - 3600, boot - 3600))
    assert [name for name, _ in await backend.listdir(("guest",))] == ["from-last-boot"]
    proc = cloud_init(path, count=1, pause_ms=0)
    _, err = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 0, err
    names = [name for name, _ in await backend.listdir(("guest",))]
    assert len(names) == 4 and all(n.startswith("CLOUD_INIT|") for n in names)
