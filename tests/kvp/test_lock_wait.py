"""KvpView's waits for another process's lock are bounded: EIO after lock_timeout.

README, KVP "Limits and errors": a store that does not answer in time is EIO, and
a pool that another process keeps locked is such a store.  The mount passes its
``timeout=S`` as ``lock_timeout`` (tests/mount/test_kvp_lock_timeout.py checks
that through the command).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.kvp.location import create_pools, pool_path
from kvpfs.kvp.records import encode_record
from kvpfs.kvp.view import KvpView

from .helpers import lock_held

BOUND = 0.4


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pools"
    create_pools(str(directory))
    Path(pool_path(str(directory), 1)).write_bytes(encode_record(b"k", b"old"))
    return directory


def guest(directory: Path) -> Path:
    return Path(pool_path(str(directory), 1))


async def timed_failure(call: Callable[..., Awaitable[object]], *args: object) -> tuple[int, float]:
    start = trio.current_time()
    with trio.fail_after(BOUND + 5), pytest.raises(FsError) as info:
        await call(*args)
    return info.value.errno, trio.current_time() - start


@pytest.mark.parametrize("kind", ["ofd", "posix", "flock"])
async def test_changes_wait_at_most_lock_timeout_then_eio(pool_dir: Path, kind: str) -> None:
    view = KvpView(str(pool_dir), lock_timeout=BOUND)
    assert await view.read(("guest", "k")) == b"old"
    before = guest(pool_dir).read_bytes()
    with lock_held(guest(pool_dir), kind, seconds=30):
        for call, args in [
            (view.write, (("guest", "k"), b"new")),
            (view.write, (("guest", "fresh"), b"v")),
            (view.remove, (("guest", "k"),)),
            (functools.partial(view.rename, replace=True), (("guest", "k"), ("guest", "k2"))),
        ]:
            err, waited = await timed_failure(call, *args)
            assert err == errno.EIO
            assert BOUND * 0.9 <= waited < BOUND + 2
        assert guest(pool_dir).read_bytes() == before
    # The holder is gone: the next change goes through at once.
    with trio.fail_after(2):
        await view.write(("guest", "k"), b"new")
    assert await view.read(("guest", "k")) == b"new"
    await view.aclose()


async def test_a_read_of_a_changed_pool_waits_at_most_lock_timeout(pool_dir: Path) -> None:
    """A writer that keeps the pool locked while changing it (as the daemon's rewrite
    does): the changed file cannot be read without the lock, and the read gives up."""
    view = KvpView(str(pool_dir), lock_timeout=BOUND)
    assert await view.read(("guest", "k")) == b"old"
    with lock_held(guest(pool_dir), "posix", seconds=30):
        with open(guest(pool_dir), "ab") as f:  # the holder's half-done change
            f.write(encode_record(b"other", b"v"))
        err, waited = await timed_failure(view.read, ("guest", "k"))
        assert err == errno.EIO
        assert BOUND * 0.9 <= waited < BOUND + 2
        err, _ = await timed_failure(view.listdir, ("guest",))
        assert err == errno.EIO
    with trio.fail_after(2):
        assert sorted(n for n, _ in await view.listdir(("guest",))) == ["k", "other"]
    await view.aclose()


async def test_default_is_ten_seconds_and_the_errno_eio() -> None:
    view = KvpView("/nonexistent")
    pool = view.pool("guest")
    assert pool.lock_timeout == 10.0
    assert pool.timeout_errno == errno.EIO
    assert KvpView("/nonexistent", lock_timeout=2.5).pool("guest").lock_timeout == 2.5
