"""PoolFile: exact bytes after each change, freshness, and the two lock families."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.kvp import pool as pool_mod
from kvpfs.kvp.pool import ABSENT, PoolFile
from kvpfs.kvp.records import RECORD_SIZE, encode_record

from .helpers import lock_held, raw_record

R0 = raw_record(b"alpha", b"one", b"old-key-junk", b"old-value-junk")
R1 = raw_record(b"beta", b"two", b"", b"stale bytes after the NUL")
R2 = raw_record(b"alpha", b"shadowed duplicate", b"kj", b"vj")
R3 = raw_record(b"gamma", b"three", b"x" * 500, b"y" * 2000)
TAIL = b"partial record from an interrupted writer"[:100]
BASE = R0 + R1 + R2 + R3 + TAIL


@pytest.fixture
def pool_path(tmp_path: Path) -> Path:
    path = tmp_path / ".kvp_pool_1"
    path.write_bytes(BASE)
    return path


async def test_reads_first_duplicate_and_ignores_leftovers(pool_path: Path) -> None:
    state = await PoolFile(str(pool_path)).state()
    assert state.items() == [(b"alpha", b"one"), (b"beta", b"two"), (b"gamma", b"three")]
    assert state.get(b"alpha") == b"one"
    assert len(state.records) == 4
    assert state.size == len(BASE)
    assert state.mtime_ns == pool_path.stat().st_mtime_ns


async def test_set_existing_key_rewrites_only_its_value_field(pool_path: Path) -> None:
    await PoolFile(str(pool_path)).set(b"beta", b"2")
    value_field = b"2".ljust(2048, b"\0")
    assert pool_path.read_bytes() == R0 + R1[:512] + value_field + R2 + R3 + TAIL


async def test_set_changes_the_first_duplicate(pool_path: Path) -> None:
    await PoolFile(str(pool_path)).set(b"alpha", b"uno")
    assert pool_path.read_bytes() == R0[:512] + b"uno".ljust(2048, b"\0") + R1 + R2 + R3 + TAIL


async def test_set_new_key_appends_at_the_record_boundary(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.set(b"delta", b"four")
    # The partial tail is where the daemon's next rewrite would put a record.
    assert pool_path.read_bytes() == R0 + R1 + R2 + R3 + encode_record(b"delta", b"four")
    await pool.set(b"epsilon", b"")
    assert pool_path.read_bytes() == (
        R0 + R1 + R2 + R3 + encode_record(b"delta", b"four") + encode_record(b"epsilon", b"")
    )


async def test_set_creates_a_missing_pool_file(tmp_path: Path) -> None:
    path = tmp_path / ".kvp_pool_4"
    pool = PoolFile(str(path))
    assert await pool.state() is ABSENT
    await pool.set(b"k", b"v")
    assert path.read_bytes() == encode_record(b"k", b"v")
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_delete_moves_later_records_up_verbatim(pool_path: Path) -> None:
    await PoolFile(str(pool_path)).delete(b"beta")
    # Later records keep their leftovers; the partial tail moves with them.
    assert pool_path.read_bytes() == R0 + R2 + R3 + TAIL


async def test_delete_first_duplicate_exposes_the_next(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.delete(b"alpha")
    assert pool_path.read_bytes() == R1 + R2 + R3 + TAIL
    assert (await pool.state()).get(b"alpha") == b"shadowed duplicate"


async def test_delete_last_record(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    path.write_bytes(R0 + R1)
    await PoolFile(str(path)).delete(b"beta")
    assert path.read_bytes() == R0


async def test_rename_to_a_new_key_rewrites_the_key_field(pool_path: Path) -> None:
    await PoolFile(str(pool_path)).rename(b"beta", b"BETA", replace=False)
    assert pool_path.read_bytes() == R0 + b"BETA".ljust(512, b"\0") + R1[512:] + R2 + R3 + TAIL


async def test_rename_over_an_existing_key(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.rename(b"gamma", b"beta", replace=True)
    assert pool_path.read_bytes() == R0 + R1[:512] + b"three".ljust(2048, b"\0") + R2 + TAIL
    assert (await pool.state()).items() == [(b"alpha", b"one"), (b"beta", b"three")]


async def test_rename_onto_an_earlier_key(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.rename(b"beta", b"alpha", replace=True)
    assert pool_path.read_bytes() == R0[:512] + b"two".ljust(2048, b"\0") + R2 + R3 + TAIL


@pytest.mark.parametrize(
    ("old", "new", "replace", "code"),
    [
        (b"beta", b"gamma", False, errno.EEXIST),
        (b"missing", b"other", True, errno.ENOENT),
        (b"missing", b"beta", True, errno.ENOENT),
    ],
)
async def test_rename_refusals_change_nothing(
    pool_path: Path, old: bytes, new: bytes, replace: bool, code: int
) -> None:
    with pytest.raises(FsError) as info:
        await PoolFile(str(pool_path)).rename(old, new, replace=replace)
    assert info.value.errno == code
    assert pool_path.read_bytes() == BASE


async def test_rename_to_itself_is_a_no_op(pool_path: Path) -> None:
    await PoolFile(str(pool_path)).rename(b"beta", b"beta", replace=False)
    assert pool_path.read_bytes() == BASE


async def test_delete_missing_key(pool_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FsError) as info:
        await PoolFile(str(pool_path)).delete(b"nope")
    assert info.value.errno == errno.ENOENT
    assert pool_path.read_bytes() == BASE
    with pytest.raises(FsError) as info:
        await PoolFile(str(tmp_path / "absent")).delete(b"nope")
    assert info.value.errno == errno.ENOENT
    assert not (tmp_path / "absent").exists()


async def test_set_writes_once_whatever_the_pool_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool"
    path.write_bytes(b"".join(encode_record(b"k%d" % i, b"v") for i in range(2000)))
    pool = PoolFile(str(path))
    await pool.state()
    written: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        written.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    await pool.set(b"k1000", b"new")
    await pool.set(b"fresh", b"new")
    assert written == [2048, RECORD_SIZE]


async def test_own_writes_need_no_read_back(
    pool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = PoolFile(str(pool_path))
    await pool.state()
    await pool.set(b"beta", b"2")
    await pool.set(b"new", b"3")
    state = await pool.state()
    assert state.settled

    def no_read(*args: object) -> bytes:
        raise AssertionError("the file was read again")

    monkeypatch.setattr(os, "pread", no_read)
    await pool.set(b"beta", b"4")
    await pool.delete(b"gamma")  # a delete needs no read either: it knows the bytes
    assert (await pool.state()).items() == [(b"alpha", b"one"), (b"beta", b"4"), (b"new", b"3")]
    monkeypatch.undo()
    # ...and another writer right after, in the same timestamp tick, is still seen.
    with pool_path.open("r+b") as f:
        f.seek(512)
        f.write(b"ONE")
    assert (await pool.state()).get(b"alpha") == b"ONE"


# -- freshness -------------------------------------------------------------------------------


async def test_sees_an_append_by_another_writer(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.state()
    with pool_path.open("r+b") as f:
        f.truncate(4 * RECORD_SIZE)
        f.seek(0, os.SEEK_END)
        f.write(encode_record(b"new", b"N"))
    assert (await pool.state()).get(b"new") == b"N"


async def test_sees_a_same_size_rewrite_in_place(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    before = await pool.state()
    stat = pool_path.stat()
    with pool_path.open("r+b") as f:  # the daemon's way: truncate and rewrite
        f.truncate(0)
        f.write(BASE.replace(b"three", b"THREE"))
    # Even with the old mtime put back, ctime moves.
    os.utime(pool_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = await pool.state()
    assert after is not before
    assert after.get(b"gamma") == b"THREE"


async def test_an_unchanged_file_is_not_read_again(pool_path: Path) -> None:
    await trio.sleep(pool_mod.RACY_NS / 1e9)
    pool = PoolFile(str(pool_path))
    first = await pool.state()
    assert first.settled
    assert await pool.state() is first


async def test_a_recent_change_is_read_again_even_with_an_equal_stamp(
    pool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writes within one timestamp tick leave equal stamps: a parse taken right
    # after a change must not be trusted on its stamp.
    pool = PoolFile(str(pool_path))
    first = await pool.state()
    assert not first.settled
    stamp = pool_path.stat()
    with pool_path.open("r+b") as f:
        f.write(b"ALPHA")
    real_stat = os.stat

    def frozen_stat(path: str | os.PathLike[str], *args: object, **kw: object) -> os.stat_result:
        st = real_stat(path)
        if os.fspath(path) == str(pool_path):
            return stamp
        return st

    monkeypatch.setattr(os, "stat", frozen_stat)
    monkeypatch.setattr(os, "fstat", lambda fd: stamp)
    assert (await pool.state()).get(b"ALPHA") == b"one"


async def test_a_replaced_file_is_reopened(pool_path: Path, tmp_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.set(b"mine", b"1")
    other = tmp_path / "other"
    other.write_bytes(encode_record(b"theirs", b"2"))
    os.replace(other, pool_path)
    assert (await pool.state()).items() == [(b"theirs", b"2")]
    await pool.set(b"mine", b"3")
    assert pool_path.read_bytes() == encode_record(b"theirs", b"2") + encode_record(b"mine", b"3")


async def test_a_removed_file_is_an_empty_pool(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    await pool.state()
    pool_path.unlink()
    assert await pool.state() is ABSENT
    await pool.set(b"k", b"v")
    assert pool_path.read_bytes() == encode_record(b"k", b"v")


async def test_reports_changes_by_others_only(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path))
    seen: list[tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]] = []
    pool.on_change = lambda old, new: seen.append((old.items(), new.items()))
    await pool.state()
    await pool.set(b"mine", b"1")
    await pool.delete(b"mine")
    assert seen == []
    assert pool_path.stat().st_size == 4 * RECORD_SIZE  # the new record replaced the tail
    with pool_path.open("ab") as f:
        f.write(encode_record(b"theirs", b"2"))
    await pool.set(b"mine", b"1")  # a write notices it too, before changing the file
    assert len(seen) == 1
    assert seen[0][1][-1] == (b"theirs", b"2")


# -- locks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ofd", "posix", "flock"])
async def test_waits_for_another_process_lock(pool_path: Path, kind: str) -> None:
    pool = PoolFile(str(pool_path))
    with lock_held(pool_path, kind, seconds=0.4):
        start = trio.current_time()
        await pool.set(b"beta", b"after the lock")
        waited = trio.current_time() - start
    assert waited > 0.2
    assert (await pool.state()).get(b"beta") == b"after the lock"


@pytest.mark.parametrize("kind", ["ofd", "posix", "flock"])
async def test_reads_share_with_readers_and_wait_for_writers(pool_path: Path, kind: str) -> None:
    pool = PoolFile(str(pool_path))
    with lock_held(pool_path, kind, shared=True, seconds=5):
        with trio.fail_after(1):
            assert (await pool.state()).get(b"beta") == b"two"
    with lock_held(pool_path, kind, seconds=0.4):
        os.utime(pool_path)  # make the cached parse stale
        start = trio.current_time()
        await pool.state()
        assert trio.current_time() - start > 0.2


async def test_lock_timeout_leaves_no_lock_behind(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path), lock_timeout=0.2)
    with lock_held(pool_path, "ofd", seconds=30):
        with pytest.raises(FsError) as info:
            await pool.set(b"beta", b"x")
        assert info.value.errno == errno.ETIMEDOUT
    # The abandoned waiter got the lock when the holder died, and let it go.
    await trio.sleep(0.1)
    fd = os.open(pool_path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, pool_mod._WRITE_LOCK)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert pool_path.read_bytes() == BASE
    with trio.fail_after(2):
        await pool.set(b"beta", b"x")


async def test_abandoned_waits_do_not_leak_threads_or_descriptors(pool_path: Path) -> None:
    pool = PoolFile(str(pool_path), lock_timeout=0.05)
    await pool.state()
    baseline = len(os.listdir("/proc/self/fd"))
    with lock_held(pool_path, "ofd", seconds=30):
        # More timeouts than the pool has wait threads: the extra ones time out
        # while queued for a thread, before any thread runs for them.
        for _ in range(pool_mod.LOCK_WAIT_THREADS + 3):
            with pytest.raises(FsError) as info:
                await pool.set(b"beta", b"x")
            assert info.value.errno == errno.ETIMEDOUT
    with trio.fail_after(5):
        while len(os.listdir("/proc/self/fd")) > baseline:
            await trio.sleep(0.02)
        await pool.set(b"beta", b"x")
    assert (await pool.state()).get(b"beta") == b"x"


async def test_takes_ofd_then_flock_and_releases_both(
    pool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fcntl, real_flock = fcntl.fcntl, fcntl.flock

    def spy_fcntl(fd: int, cmd: int, arg: bytes) -> bytes:
        calls.append(f"fcntl {cmd} {arg[:2]!r}")
        return real_fcntl(fd, cmd, arg)

    def spy_flock(fd: int, op: int) -> None:
        calls.append(f"flock {op}")
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "fcntl", spy_fcntl)
    monkeypatch.setattr(fcntl, "flock", spy_flock)
    await PoolFile(str(pool_path)).set(b"beta", b"x")
    wr = fcntl.F_WRLCK.to_bytes(2, "little")
    un = fcntl.F_UNLCK.to_bytes(2, "little")
    assert calls == [
        f"fcntl {fcntl.F_OFD_SETLK} {wr!r}",
        f"flock {fcntl.LOCK_EX | fcntl.LOCK_NB}",
        f"flock {fcntl.LOCK_UN}",
        f"fcntl {fcntl.F_OFD_SETLK} {un!r}",
    ]


async def test_tasks_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    # OFD locks do not exclude one descriptor from itself: the pool's own lock must.
    path = tmp_path / "pool"
    pool = PoolFile(str(path))
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(pool.set, b"k%d" % i, b"v%d" % i)
    state = await PoolFile(str(path)).state()
    assert sorted(state.items()) == sorted((b"k%d" % i, b"v%d" % i) for i in range(50))
    assert path.stat().st_size == 50 * RECORD_SIZE
