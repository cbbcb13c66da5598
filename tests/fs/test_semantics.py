"""FUSE-layer semantics with real programs, against the dict-backed store.

Every test asserts what the store saw, not only what the file shows: the commit
rule is about what reaches the store and how often.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio

from kvpfs.fs.operations import FsOptions
from tests.fs.memory_view import MemoryView
from tests.mounting import in_thread, nano_append, read_bytes, sh, write_bytes

pytestmark = pytest.mark.mount

VIM = "vim -N -u NONE -i NONE --noplugin -n"


@pytest.fixture
def store() -> MemoryView:
    b = MemoryView()
    b.add_dir(("d",))
    b.add_dir(("ro",), read_only=True)
    b.tree[("d",)]["k"] = b"a-long-value"
    b.tree[("ro",)]["fixed"] = b"host"
    return b


def key_writes(store: MemoryView, name: str) -> list[bytes | None]:
    return [e[2] for e in store.writes() if e[1] == ("d", name)]


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


async def test_shorter_overwrite_truncates(mount, store: MemoryView) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    await sh(f"echo x > {k}")
    assert store.value(("d", "k")) == b"x"
    await in_thread(write_bytes, k, b"yz\n")
    assert store.value(("d", "k")) == b"yz"
    assert key_writes(store, "k") == [b"x", b"yz"]


async def test_append_and_printf_and_empty(mount, store: MemoryView) -> None:
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"
    await sh(f"echo more >> {d}/k")
    assert store.value(("d", "k")) == b"a-long-value\nmore"
    await sh(f"printf 'no-newline' > {d}/p")
    assert store.value(("d", "p")) == b"no-newline"
    await sh(f": > {d}/empty")
    assert store.value(("d", "empty")) == b""
    assert (await sh(f"cat {d}/empty")).stdout == b"\n"
    await sh(f"touch {d}/touched")
    assert store.value(("d", "touched")) == b""


async def test_cat_copy_preserves_value_exactly(mount, store: MemoryView) -> None:
    store.tree[("d",)]["multi"] = b"line1\nline2\n\n"
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"
    await sh(f"cat {d}/multi > {d}/copy && cp {d}/multi {d}/copy2 && cp -a {d}/multi {d}/copy3")
    for name in ("copy", "copy2", "copy3"):
        assert store.value(("d", name)) == b"line1\nline2\n\n"


async def test_truncate_and_rm(mount, store: MemoryView) -> None:
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"
    await sh(f"truncate -s 3 {d}/k")
    assert store.value(("d", "k")) == b"a-l"
    await sh(f"rm {d}/k")
    assert store.value(("d", "k")) is None
    assert (await sh(f"ls -A {d}")).stdout == b""


async def test_mv_rename_noreplace_and_over(mount, store: MemoryView) -> None:
    store.tree[("d",)]["other"] = b"o"
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"
    await sh(f"mv {d}/k {d}/k2")
    assert store.value(("d", "k2")) == b"a-long-value" and store.value(("d", "k")) is None
    await sh(f"mv {d}/k2 {d}/other")
    assert store.value(("d", "other")) == b"a-long-value"
    # mv -n / RENAME_NOREPLACE onto an existing name is refused by the store.
    store.tree[("d",)]["x"] = b"x"

    def noreplace() -> int:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, f"{d}/x".encode(), -100, f"{d}/other".encode(), 1)
        return 0 if rc == 0 else ctypes.get_errno()

    assert await in_thread(noreplace) == errno.EEXIST
    assert store.value(("d", "other")) == b"a-long-value"
    assert await in_thread(errno_of, os.rename, f"{d}/x", f"{s.mountpoint}/mem/ro/x") in (
        errno.EXDEV,
        errno.EROFS,
    )


async def test_sed_in_place_is_one_atomic_put(mount, store: MemoryView) -> None:
    s = await mount([store])
    await sh(f"sed -i 's/long/short/' {s.mountpoint}/mem/d/k")
    assert store.value(("d", "k")) == b"a-short-value"
    assert key_writes(store, "k") == [b"a-short-value"]
    assert sorted(store.tree[("d",)]) == ["k"]  # no sedXXXXXX debris


@pytest.mark.parametrize("backupcopy", ["auto", "yes", "no"])
async def test_vim_save_modes(mount, store: MemoryView, backupcopy: str) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    # backupskip= matters: the default skips backups under /tmp, where pytest mounts.
    await sh(
        f"{VIM} --cmd 'set backupskip=' --cmd 'set backupcopy={backupcopy}' "
        f"-c 's/long/vim/' -c 'wq' {k}",
        stdin=b"",
    )
    assert store.value(("d", "k")) == b"a-vim-value"
    assert sorted(store.tree[("d",)]) == ["k"]
    # The key was never removed from the store, and was written exactly once.
    assert [e for e in store.writes() if e[0] != "write"] == []
    assert key_writes(store, "k") == [b"a-vim-value"]
    assert (await sh(f"ls -A {s.mountpoint}/mem/d")).stdout == b"k\n"


async def test_nano_save(mount, store: MemoryView) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    await nano_append(f"{k}", " edited")
    assert store.value(("d", "k")) == b"a-long-value edited"
    assert sorted(store.tree[("d",)]) == ["k"]


async def test_python_replace_idiom(mount, store: MemoryView) -> None:
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"

    def replace() -> None:
        write_bytes(f"{d}/k.tmp", b"replaced\n")
        os.replace(f"{d}/k.tmp", f"{d}/k")

    await in_thread(replace)
    assert store.value(("d", "k")) == b"replaced"
    assert key_writes(store, "k") == [b"replaced"]
    assert sorted(store.tree[("d",)]) == ["k"]


async def test_commit_error_reaches_close(mount, store: MemoryView) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    store.fail_next_write = errno.ENOSPC
    assert await in_thread(errno_of, write_bytes, k, b"x\n") == errno.ENOSPC
    assert store.value(("d", "k")) == b"a-long-value"
    assert await in_thread(errno_of, write_bytes, k, b"x" * 3000) == errno.EFBIG
    assert store.value(("d", "k")) == b"a-long-value"


async def test_refusals(mount, store: MemoryView) -> None:
    s = await mount([store])
    d = f"{s.mountpoint}/mem/d"
    assert await in_thread(errno_of, os.symlink, "k", f"{d}/link") == errno.EPERM
    assert await in_thread(errno_of, os.link, f"{d}/k", f"{d}/hard") == errno.EPERM
    assert await in_thread(errno_of, os.mkdir, f"{d}/sub") == errno.EPERM
    assert await in_thread(errno_of, os.getxattr, f"{d}/k", "user.x") == errno.ENOTSUP
    assert await in_thread(errno_of, write_bytes, f"{s.mountpoint}/mem/ro/new", b"x") == errno.EROFS
    assert await in_thread(errno_of, os.unlink, f"{s.mountpoint}/mem/ro/fixed") == errno.EROFS
    assert await in_thread(errno_of, os.chmod, f"{d}/k", 0o600) == 0
    assert (await in_thread(os.stat, f"{d}/k")).st_mode & 0o777 == 0o600
    assert store.value(("ro", "fixed")) == b"host"


async def test_external_change_is_seen_at_once(mount, store: MemoryView) -> None:
    s = await mount([store], FsOptions(attr_timeout=60))
    k = f"{s.mountpoint}/mem/d/k"
    assert await in_thread(read_bytes, k) == b"a-long-value\n"
    store.external_write(("d", "k"), b"v")
    await s.ops.invalidator.settle()
    assert (await in_thread(os.stat, k)).st_size == 2
    assert await in_thread(read_bytes, k) == b"v\n"
    store.external_remove(("d", "k"))
    await s.ops.invalidator.settle()
    await trio.sleep(0.05)
    assert await in_thread(errno_of, os.stat, k) == errno.ENOENT
    store.external_write(("d", "fresh"), b"f")
    assert await in_thread(read_bytes, f"{s.mountpoint}/mem/d/fresh") == b"f\n"


async def test_hung_store_gives_eio_not_a_hang(mount, store: MemoryView) -> None:
    s = await mount([store], FsOptions(store_timeout=0.5))
    store.hang = True
    result = await sh(f"cat {s.mountpoint}/mem/d/k", check=False, timeout=10)
    assert result.returncode != 0
    assert b"Input/output error" in result.stderr
    store.hang = False


async def test_raw_mode(mount, store: MemoryView) -> None:
    s = await mount([store], FsOptions(raw=True))
    k = f"{s.mountpoint}/mem/d/k"
    assert await in_thread(read_bytes, k) == b"a-long-value"
    await sh(f"echo x > {k}")
    assert store.value(("d", "k")) == b"x\n"
