"""Changes made to the pool files by others (the daemon, cloud-init) show up at once."""

from __future__ import annotations

import errno
import os

import pytest

from kvpfs.fs.operations import FsOptions
from tests.mount.kvp_fixtures import Pools, mount_kvp, rec
from tests.mounting import eventually, in_thread, read_bytes, sh

pytestmark = pytest.mark.mount

# A long kernel cache timeout: only pushed invalidations can make these pass.
CACHED = FsOptions(attr_timeout=60)


def stat_errno(path: str) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


async def test_daemon_style_rewrite_is_seen(mount, pools: Pools) -> None:
    pools.set_bytes("external", rec(b"HostKey", b"v1"))
    _, kvp = await mount_kvp(mount, pools, options=CACHED)
    path = f"{kvp}/external/HostKey"
    assert await in_thread(read_bytes, path) == b"v1\n"
    assert (await in_thread(os.stat, path)).st_size == 3
    # Same size, same inode, rewritten in place: only mtime/ctime tell.
    pools.set_bytes("external", rec(b"HostKey", b"v2"))
    assert await in_thread(read_bytes, path) == b"v2\n"
    pools.set_bytes("external", rec(b"HostKey", b"value-two"))
    # cat never returns a stale or truncated value, whatever the kernel cached.
    assert (await sh(f"cat {path}")).stdout == b"value-two\n"
    assert await in_thread(read_bytes, path) == b"value-two\n"

    async def size_fresh() -> bool:
        return (await in_thread(os.stat, path)).st_size == 10

    await eventually(size_fresh)


async def test_added_and_removed_keys(mount, pools: Pools) -> None:
    pools.set_bytes("auto_external", rec(b"VirtualMachineName", b"vm1"))
    _, kvp = await mount_kvp(mount, pools, options=CACHED)
    d = f"{kvp}/auto_external"
    assert (await sh(f"ls {d}")).stdout == b"VirtualMachineName\n"
    assert await in_thread(stat_errno, f"{d}/HostName") == errno.ENOENT
    pools.set_bytes("auto_external", rec(b"VirtualMachineName", b"vm1") + rec(b"HostName", b"h"))
    assert (await sh(f"ls {d}")).stdout == b"HostName\nVirtualMachineName\n"
    assert (await sh(f"cat {d}/HostName")).stdout == b"h\n"
    pools.set_bytes("auto_external", rec(b"HostName", b"h"))

    async def gone() -> bool:
        return await in_thread(stat_errno, f"{d}/VirtualMachineName") == errno.ENOENT

    await eventually(gone)
    assert (await sh(f"ls {d}")).stdout == b"HostName\n"


async def test_partial_tail_is_ignored_then_overwritten(mount, pools: Pools) -> None:
    # An interrupted appender left 100 bytes: readers ignore them, the next new
    # record goes to the record boundary, as the daemon's rewrite would.
    pools.set_bytes("guest", rec(b"A", b"1") + b"P" * 100)
    _, kvp = await mount_kvp(mount, pools)
    assert (await sh(f"ls {kvp}/guest")).stdout == b"A\n"
    await sh(f"echo 2 > {kvp}/guest/B")
    assert pools.bytes("guest") == rec(b"A", b"1") + rec(b"B", b"2")


async def test_duplicates_first_wins(mount, pools: Pools) -> None:
    pools.set_bytes("guest", rec(b"dup", b"first") + rec(b"dup", b"second"))
    _, kvp = await mount_kvp(mount, pools)
    assert (await sh(f"ls {kvp}/guest")).stdout == b"dup\n"
    assert (await sh(f"cat {kvp}/guest/dup")).stdout == b"first\n"
    await sh(f"echo changed > {kvp}/guest/dup")
    assert pools.bytes("guest") == rec(b"dup", b"changed") + rec(b"dup", b"second")
    await sh(f"rm {kvp}/guest/dup")
    assert pools.bytes("guest") == rec(b"dup", b"second")
    assert (await sh(f"cat {kvp}/guest/dup")).stdout == b"second\n"


async def test_pool_file_replaced_by_a_new_inode(mount, pools: Pools) -> None:
    pools.set_bytes("guest", rec(b"A", b"1"))
    _, kvp = await mount_kvp(mount, pools)
    assert (await sh(f"cat {kvp}/guest/A")).stdout == b"1\n"
    tmp = pools.directory / "replacement"
    tmp.write_bytes(rec(b"A", b"new-inode"))
    os.replace(tmp, pools.path("guest"))
    assert (await sh(f"cat {kvp}/guest/A")).stdout == b"new-inode\n"
    await sh(f"echo w > {kvp}/guest/A")
    assert pools.bytes("guest") == rec(b"A", b"w")
