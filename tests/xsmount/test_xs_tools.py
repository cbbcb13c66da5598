"""Real programs on the ``xenstore`` view, against the embedded server and cxenstored.

Every test checks the store itself afterwards (``dump``: path, value, permissions
and generation of every node), not only what the mount shows.
"""

from __future__ import annotations

import errno
import os

import pytest

from kvpfs.fs.operations import FsOptions
from tests.mounting import in_thread, read_bytes, sh
from tests.xsmount.conftest import (
    VIM,
    XsMountFactory,
    dump,
    errno_of,
    mount_paths,
    node_paths,
    xs,
    xs_write,
)

pytestmark = pytest.mark.mount

SEED = [
    "/local/domain/1/name", "guest1",
    "/local/domain/1/device/vbd/51712/state", "4",
    "/local/domain/1/device/vbd/51712/backend-id", "0",
    "/flag", "",
    "/dirval/x", "1",
]


async def seed(server: str) -> None:
    await xs_write(server, *SEED)
    await xs_write(server, "/dirval", "hello")
    await xs(server, "xenstore-chmod", "/local/domain/1/name", "n0", "r1")


def changed(before: list, after: list) -> dict[str, tuple]:  # type: ignore[type-arg]
    """Nodes whose value or permissions differ, or that appeared (None: vanished)."""
    b = {p: (v, perms) for p, v, perms, _ in before}
    a = {p: (v, perms) for p, v, perms, _ in after}
    out: dict[str, tuple] = {}  # type: ignore[type-arg]
    for p in b.keys() | a.keys():
        if b.get(p) != a.get(p):
            out[p.decode()] = a.get(p)  # type: ignore[assignment]
    return out


async def test_tree_as_directories_and_files(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    x = m.dir
    # Server order (creation order in cxenstored), one entry per child.
    assert (await sh(f"ls -U {x}")).stdout.split() == [b"tool", b"local", b"flag", b"dirval"]
    listing = (await sh(f"ls -l {x}")).stdout.decode()
    assert "\ndrwxr-xr-x 2 " in listing and " local\n" in listing
    assert "\n-rw-r--r-- 1 root root 1 " in listing and " flag\n" in listing
    assert (await sh(f"cat {x}/local/domain/1/name")).stdout == b"guest1\n"
    assert (await sh(f"cat {x}/flag")).stdout == b"\n"
    # A node with a value and children is a directory; its value is an xattr.
    assert (await sh(f"test -d {x}/dirval && cat {x}/dirval/x")).stdout == b"1\n"
    value = await sh(f"getfattr --only-values -n user.xenstore.value {x}/dirval")
    assert value.stdout == b"hello"
    # find sees exactly the nodes xenstore-ls sees.
    nodes = node_paths(await dump(xenstored))
    assert sorted(await in_thread(mount_paths, x)) == sorted(n for n in nodes if n != "/")
    found = (await sh(f"find {x} -mindepth 1")).stdout.decode().split()
    assert sorted(p[len(x):] for p in found) == sorted(n for n in nodes if n != "/")


async def test_echo_cat_append_rm(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    d = f"{m.dir}/local/domain/1"
    before = await dump(xenstored)
    await sh(f"echo a-long-value > {d}/new")
    assert await xs(xenstored, "xenstore-read", "/local/domain/1/new") == b"a-long-value\n"
    await sh(f"echo x > {d}/new")
    assert (await sh(f"cat {d}/new")).stdout == b"x\n"
    await sh(f"echo more >> {d}/new")
    await sh(f"printf 'no newline at all' > {d}/raw && truncate -s 10 {d}/raw")
    assert await xs(xenstored, "xenstore-read", "-R", "/local/domain/1/new") == b"x\nmore"
    assert await xs(xenstored, "xenstore-read", "/local/domain/1/raw") == b"no newline\n"
    after = await dump(xenstored)
    assert changed(before, after) == {
        "/local/domain/1/new": (b"x\nmore", b"n0\0"),
        "/local/domain/1/raw": (b"no newline", b"n0\0"),
    }
    await sh(f"rm {d}/new {d}/raw")
    assert changed(before, await dump(xenstored)) == {}
    assert (await sh(f"ls -U {d}")).stdout == b"name\ndevice\n"


async def test_mkdir_rmdir_and_rm_r(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    x = m.dir
    before = await dump(xenstored)
    await sh(f"mkdir {x}/made")
    # An empty node made by mkdir stays a directory while empty.
    assert (await sh(f"stat -c %F {x}/made && ls -A {x}/made")).stdout == b"directory\n"
    assert await xs(xenstored, "xenstore-read", "/made") == b"\n"
    await sh(f"mkdir -p {x}/made/a/b && echo v > {x}/made/a/b/leaf && echo w > {x}/made/top")
    result = await sh(f"rmdir {x}/made", check=False)
    assert result.returncode == 1 and b"Directory not empty" in result.stderr
    assert await xs(xenstored, "xenstore-read", "/made/a/b/leaf") == b"v\n"
    await sh(f"rmdir {x}/made/a/b", check=False)  # not empty either
    await sh(f"rm -r {x}/made")
    assert changed(before, await dump(xenstored)) == {}
    assert b"made" not in (await sh(f"ls {x}")).stdout
    # An existing childless node someone else made is a file.
    assert await in_thread(errno_of, os.mkdir, f"{x}/flag") == errno.EEXIST
    assert (await sh(f"stat -c %F {x}/flag")).stdout == b"regular empty file\n" or (
        await sh(f"stat -c %F {x}/flag")
    ).stdout == b"regular file\n"


async def test_sed_in_place_changes_one_value(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    before = await dump(xenstored)
    await sh(f"sed -i 's/guest1/renamed/' {m.dir}/local/domain/1/name")
    # Permissions survive; no sed temporary reached the store.
    assert changed(before, await dump(xenstored)) == {
        "/local/domain/1/name": (b"renamed", b"n0\0r1\0")
    }
    assert (await sh(f"cat {m.dir}/local/domain/1/name")).stdout == b"renamed\n"


@pytest.mark.parametrize("backupcopy", ["auto", "yes"])
async def test_vim_save(xsmount: XsMountFactory, xenstored: str, backupcopy: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    before = await dump(xenstored)
    path = f"{m.dir}/local/domain/1/name"
    await sh(f"{VIM} --cmd 'set backupcopy={backupcopy}' -c 's/guest1/vim/' -c wq {path}")
    assert changed(before, await dump(xenstored)) == {"/local/domain/1/name": (b"vim", b"n0\0r1\0")}
    assert (await sh(f"ls -AU {m.dir}/local/domain/1")).stdout == b"name\ndevice\n"


async def test_vim_new_file(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    before = await dump(xenstored)
    await sh(f"{VIM} -c 'normal ihello' -c wq {m.dir}/local/domain/1/fresh")
    assert changed(before, await dump(xenstored)) == {"/local/domain/1/fresh": (b"hello", b"n0\0")}


async def test_mv_is_one_transaction(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    d = f"{m.dir}/local/domain/1"
    before = await dump(xenstored)
    start = len(m.requests)
    await sh(f"mv {d}/name {d}/moved")
    ops = [op for op, _ in m.requests[start:]]
    # One transaction: read, write the new node, copy permissions, remove the old.
    assert ops.count("TRANSACTION_START") == 1 == ops.count("TRANSACTION_END")
    assert ops.count("WRITE") == 1 and ops.count("RM") == 1 and ops.count("SET_PERMS") == 1
    assert changed(before, await dump(xenstored)) == {
        "/local/domain/1/name": None,
        "/local/domain/1/moved": (b"guest1", b"n0\0r1\0"),
    }
    # Over an existing file, and a directory (mv copies and deletes on EXDEV).
    await sh(f"mv {d}/moved {d}/device/vbd/51712/state")
    assert await xs(xenstored, "xenstore-read", "/local/domain/1/device/vbd/51712/state") == b"guest1\n"
    await sh(f"mv {d}/device {m.dir}/dev2")
    assert await xs(xenstored, "xenstore-read", "/dev2/vbd/51712/backend-id") == b"0\n"
    assert await xs(xenstored, "xenstore-exists", "/local/domain/1/device", check=False) == b""


async def test_xattrs_value_and_perms(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored)
    x = m.dir
    dumped = (await sh(f"getfattr -d {x}/local/domain/1/name")).stdout.decode()
    assert 'user.xenstore.perms="n0,r1"' in dumped and 'user.xenstore.value="guest1"' in dumped
    await sh(f"setfattr -n user.xenstore.perms -v 'n0,r1,b5' {x}/dirval")
    await sh(f"setfattr -n user.xenstore.value -v 'new value' {x}/dirval")
    listing = await xs(xenstored, "xenstore-ls", "-p", "/dirval")
    assert listing.startswith(b"x = \"1\"")
    assert await xs(xenstored, "xenstore-read", "/dirval") == b"new value\n"
    perms = await sh(f"getfattr --only-values -n user.xenstore.perms {x}/dirval")
    assert perms.stdout == b"n0,r1,b5"
    # xenstore-ls -p notation with parentheses is accepted too.
    await sh(f"setfattr -n user.xenstore.perms -v '(n0)' {x}/dirval")
    assert (await sh(f"getfattr --only-values -n user.xenstore.perms {x}/dirval")).stdout == b"n0"
    # The value xattr of a file is its content, without the text convention.
    assert (await sh(f"getfattr --only-values -n user.xenstore.value {x}/flag")).stdout == b""


async def test_raw_option(xsmount: XsMountFactory, xenstored: str) -> None:
    await seed(xenstored)
    m = await xsmount(xenstored, FsOptions(raw=True))
    assert (await sh(f"cat {m.dir}/local/domain/1/name")).stdout == b"guest1"
    await sh(f"printf 'two\\nlines\\n' > {m.dir}/raw")
    assert await xs(xenstored, "xenstore-read", "-R", "/raw") == b"two\nlines\n"
    assert await in_thread(read_bytes, f"{m.dir}/raw") == b"two\nlines\n"
