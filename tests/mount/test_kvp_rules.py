"""Names, limits and refusals through the kernel: exact errno, pool bytes unchanged."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from kvpfs.kvp.names import key_to_name
from tests.mount.kvp_fixtures import Pools, mount_kvp, rec
from tests.mounting import in_thread, read_bytes, renameat2_noreplace, sh, write_bytes

pytestmark = pytest.mark.mount


def errno_of(fn: Callable[..., object], *args: object) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def mknod(path: str) -> None:
    os.mknod(path, 0o600 | 0o010000)  # a FIFO


def create(path: str, data: bytes = b"v\n") -> None:
    write_bytes(path, data)


@pytest.fixture
def seeded(pools: Pools) -> Pools:
    pools.set_bytes("guest", rec(b"G", b"g"))
    pools.set_bytes("external", rec(b"HostKey", b"host"))
    pools.set_bytes("auto_internal", rec(b"I", b"i"))
    return pools


BMP_254 = "k" * 254
ASTRAL = "\U0001f600"  # two UTF-16 units, four UTF-8 bytes

# (pool, operation, expected errno) -- every row leaves every pool byte-identical.
REFUSALS: list[tuple[str, Callable[[str], None], int]] = [
    ("guest: key over 254 UTF-16 units", lambda k: create(f"{k}/guest/{'k' * 255}"), errno.ENAMETOOLONG),
    ("guest: astral chars count twice", lambda k: create(f"{k}/guest/{'k' * 253}{ASTRAL}"), errno.ENAMETOOLONG),
    ("guest: value over 1022 UTF-16 units", lambda k: create(f"{k}/guest/G", b"v" * 1023 + b"\n"), errno.EFBIG),
    ("guest: invalid UTF-8 value", lambda k: create(f"{k}/guest/G", b"\xff\xfe\n"), errno.EILSEQ),
    ("guest: invalid UTF-8 key", lambda k: create(f"{k}/guest/{key_to_name(b'bad' + bytes([0xFF]))}"), errno.EILSEQ),
    ("any pool: key over 511 bytes", lambda k: create(f"{k}/auto_internal/{'k' * 512}"), errno.ENAMETOOLONG),
    ("any pool: value over 2047 bytes", lambda k: create(f"{k}/auto_internal/I", b"v" * 2048 + b"\n"), errno.EFBIG),
    ("host pool is read-only", lambda k: create(f"{k}/external/HostKey"), errno.EROFS),
    ("host pool: no new keys", lambda k: create(f"{k}/auto_external/New"), errno.EROFS),
    ("auto pool is read-only", lambda k: create(f"{k}/auto/New"), errno.EROFS),
    ("host pool: no rm", lambda k: os.unlink(f"{k}/external/HostKey"), errno.EROFS),
    ("host pool: no mv", lambda k: os.rename(f"{k}/external/HostKey", f"{k}/external/X"), errno.EROFS),
    ("no mv across pools", lambda k: os.rename(f"{k}/guest/G", f"{k}/auto_internal/G"), errno.EXDEV),
    ("mv -n onto an existing key", lambda k: renameat2_noreplace(f"{k}/guest/G", f"{k}/guest/G2"), errno.EEXIST),
    ("no mkdir in a pool", lambda k: os.mkdir(f"{k}/guest/d"), errno.EPERM),
    ("no mkdir of a pool", lambda k: os.mkdir(f"{k}/newpool"), errno.EPERM),
    ("no symlink", lambda k: os.symlink("G", f"{k}/guest/l"), errno.EPERM),
    ("no hard link", lambda k: os.link(f"{k}/guest/G", f"{k}/guest/l"), errno.EPERM),
    ("no mknod", lambda k: mknod(f"{k}/guest/fifo"), errno.EPERM),
    ("no xattrs", lambda k: os.setxattr(f"{k}/guest/G", "user.x", b"1"), errno.EOPNOTSUPP),
    ("non-canonical escape", lambda k: create(f"{k}/guest/%61"), errno.EINVAL),
    ("no such key", lambda k: os.unlink(f"{k}/guest/Missing"), errno.ENOENT),
    ("rm a pool", lambda k: os.rmdir(f"{k}/guest"), errno.EPERM),
]


@pytest.mark.parametrize(("case", "operation", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refused_operation(mount, seeded: Pools, case: str, operation, expected: int) -> None:  # type: ignore[no-untyped-def]
    seeded.set_bytes("guest", rec(b"G", b"g") + rec(b"G2", b"g2"))
    before = seeded.snapshot()
    _, kvp = await mount_kvp(mount, seeded)
    assert await in_thread(errno_of, operation, kvp) == expected, case
    assert seeded.snapshot() == before, case


async def test_limits_that_fit(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await in_thread(create, f"{kvp}/guest/{BMP_254}", b"v" * 1022 + b"\n")
    await in_thread(create, f"{kvp}/auto_internal/{'k' * 511}", b"w" * 2047 + b"\n")
    assert seeded.bytes("guest") == rec(b"G", b"g") + rec(BMP_254.encode(), b"v" * 1022)
    assert seeded.bytes("auto_internal") == rec(b"I", b"i") + rec(b"k" * 511, b"w" * 2047)


async def test_format_limits_option(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded, limits="format")
    await in_thread(create, f"{kvp}/guest/{'k' * 511}", b"v" * 2047 + b"\n")
    await in_thread(create, f"{kvp}/guest/raw", b"\xff\n")
    assert seeded.bytes("guest") == rec(b"G", b"g") + rec(b"k" * 511, b"v" * 2047) + rec(
        b"raw", b"\xff"
    )
    assert await in_thread(errno_of, create, f"{kvp}/guest/G", b"v" * 2048) == errno.EFBIG


async def test_all_writable_option(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded, all_writable=True)
    await sh(f"echo set-by-host > {kvp}/external/HostKey && echo n > {kvp}/auto_external/VmName")
    assert seeded.bytes("external") == rec(b"HostKey", b"set-by-host")
    assert seeded.bytes("auto_external") == rec(b"VmName", b"n")


async def test_read_only_mount(mount, seeded: Pools) -> None:
    before = seeded.snapshot()
    _, kvp = await mount_kvp(mount, seeded, read_only=True)
    assert await in_thread(errno_of, create, f"{kvp}/guest/G") == errno.EROFS
    assert await in_thread(errno_of, os.unlink, f"{kvp}/guest/G") == errno.EROFS
    assert await in_thread(read_bytes, f"{kvp}/guest/G") == b"g\n"
    assert seeded.snapshot() == before


KEYS = [
    b"with/slash",
    b"100%",
    b".hidden",
    b"",
    b"tab\there",
    b"caf\xc3\xa9",
    b"4913",
    b"backup~",
    b"CLOUD_INIT|1700000000|start|init-local/search|0123",
    b"x" * 511,
    b"/" * 511,  # escaped it would be 1533 bytes, past FUSE's 1024: the compact name
    b"\xff" * 300 + b"z",
]


async def test_every_key_has_one_reachable_name(mount, pools: Pools) -> None:
    pools.set_bytes("auto_internal", b"".join(rec(k, b"v-" + str(i).encode()) for i, k in enumerate(KEYS)))
    _, kvp = await mount_kvp(mount, pools)
    listed = sorted(os.fsdecode(n) for n in (await sh(f"ls -A {kvp}/auto_internal")).stdout.split(b"\n") if n)
    assert listed == sorted(key_to_name(k) for k in KEYS)
    for i, key in enumerate(KEYS):
        name = key_to_name(key)
        assert await in_thread(read_bytes, f"{kvp}/auto_internal/{name}") == b"v-%d\n" % i
    # and created from the file side, they land under the right key
    for i, key in enumerate(KEYS):
        await in_thread(create, f"{kvp}/auto_internal/{key_to_name(key)}", b"w-%d\n" % i)
    assert pools.bytes("auto_internal") == b"".join(rec(k, b"w-" + str(i).encode()) for i, k in enumerate(KEYS))


async def test_statfs_name_length(mount, pools: Pools) -> None:
    _, kvp = await mount_kvp(mount, pools)
    assert (await in_thread(os.statvfs, kvp)).f_namemax >= 511


async def test_refused_new_key_leaves_no_name_behind(mount, pools: Pools) -> None:
    from kvpfs.fs.operations import FsOptions

    _, kvp = await mount_kvp(mount, pools, options=FsOptions(attr_timeout=60))
    # coreutils report a failed close of stdout (bash ignores it for its own redirections).
    result = await sh(f"printf '%02000d' 0 | cat > {kvp}/guest/Fresh", check=False)
    assert result.returncode != 0 and b"File too large" in result.stderr
    assert pools.bytes("guest") == b""
    # The kernel's entry from create() is dropped, so the name can be used at once.
    await sh(f"echo ok > {kvp}/guest/Fresh")
    assert pools.bytes("guest") == rec(b"Fresh", b"ok")
