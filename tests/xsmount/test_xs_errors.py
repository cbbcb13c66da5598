"""Refused operations: the errno each tool gets, and nothing left in the store.

Each refusal compares a dump of the whole store (path, value, permissions,
generation of every node) before and after.  Permission denials need a guest
connection, which only the embedded server offers (domain sockets); the server
going away is tested against both servers.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

import pytest
import trio

from kvpfs.fs.operations import FsOptions
from tests.mounting import eventually, in_thread, renameat2_noreplace, sh, write_bytes
from tests.xenstore.conftest import ServerPath
from tests.xsmount.conftest import (
    Restartable,
    XsMountFactory,
    dump,
    errno_of,
    xs,
    xs_write,
)

pytestmark = pytest.mark.mount

LONG = "p" * 1000


def create(path: str, data: bytes = b"v\n") -> None:
    write_bytes(path, data)


# (what, operation on the mount's xenstore dir, errno) -- each leaves the store as it was.
REFUSALS: list[tuple[str, Callable[[str], object], int]] = [
    ("create: space in name", lambda x: create(f"{x}/a b"), errno.EINVAL),
    ("create: dot in name", lambda x: create(f"{x}/a.txt"), errno.EINVAL),
    ("create: colon in name", lambda x: create(f"{x}/d/a:b"), errno.EINVAL),
    ("create: non-ASCII name", lambda x: create(f"{x}/caf\u00e9"), errno.EINVAL),
    ("mkdir: invalid name", lambda x: os.mkdir(f"{x}/q:r"), errno.EINVAL),
    ("mkdir: leading dot (no overlay for directories)", lambda x: os.mkdir(f"{x}/.hid"), errno.EINVAL),
    ("mkdir: trailing tilde", lambda x: os.mkdir(f"{x}/d~"), errno.EINVAL),
    ("mkdir: existing node", lambda x: os.mkdir(f"{x}/d"), errno.EEXIST),
    ("mkdir: existing file", lambda x: os.mkdir(f"{x}/d/k"), errno.EEXIST),
    ("lookup: invalid name", lambda x: os.stat(f"{x}/a.b"), errno.ENOENT),
    ("lookup: missing node", lambda x: os.stat(f"{x}/nothing"), errno.ENOENT),
    ("path over 2048 bytes", lambda x: create(f"{x}/{LONG}/{'c' * 1100}"), errno.ENAMETOOLONG),
    ("value over one 4096-byte message", lambda x: create(f"{x}/d/k", b"v" * 4100), errno.EFBIG),
    ("new node, value too big", lambda x: create(f"{x}/d/big", b"v" * 4100), errno.EFBIG),
    ("rmdir: not empty", lambda x: os.rmdir(f"{x}/d"), errno.ENOTEMPTY),
    ("rmdir: a file", lambda x: os.rmdir(f"{x}/d/k"), errno.ENOTDIR),
    ("unlink: a directory", lambda x: os.unlink(f"{x}/d"), errno.EISDIR),
    ("unlink: missing", lambda x: os.unlink(f"{x}/d/nothing"), errno.ENOENT),
    ("rename: directory", lambda x: os.rename(f"{x}/d", f"{x}/e"), errno.EXDEV),
    ("rename: onto invalid name (mv then copies, and its create fails)", lambda x: os.rename(f"{x}/d/k", f"{x}/d/k.bak"), errno.EXDEV),
    ("rename: noreplace onto existing", lambda x: renameat2_noreplace(f"{x}/d/k", f"{x}/d/j"), errno.EEXIST),
    ("rename: missing", lambda x: os.rename(f"{x}/d/nothing", f"{x}/d/z"), errno.ENOENT),
    ("setxattr: bad permission letter", lambda x: os.setxattr(f"{x}/d/k", "user.xenstore.perms", b"q5"), errno.EINVAL),
    ("setxattr: empty permission list", lambda x: os.setxattr(f"{x}/d/k", "user.xenstore.perms", b""), errno.EINVAL),
    ("setxattr: value too big", lambda x: os.setxattr(f"{x}/d", "user.xenstore.value", b"v" * 4100), errno.EFBIG),
    ("setxattr: other name", lambda x: os.setxattr(f"{x}/d/k", "user.other", b"1"), errno.ENOTSUP),
    ("getxattr: other name", lambda x: os.getxattr(f"{x}/d/k", "user.other"), errno.ENODATA),
    ("removexattr", lambda x: os.removexattr(f"{x}/d/k", "user.xenstore.value"), errno.ENOTSUP),
    ("symlink", lambda x: os.symlink("k", f"{x}/d/l"), errno.EPERM),
    ("hard link", lambda x: os.link(f"{x}/d/k", f"{x}/d/l"), errno.EPERM),
]


async def test_refusals(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, "/d/k", "v", "/d/j", "w", f"/{LONG}/c", "1")
    m = await xsmount(xenstored)
    x = m.dir
    before = await dump(xenstored)
    got = {what: await in_thread(errno_of, op, x) for what, op, _ in REFUSALS}
    assert got == {what: code for what, _, code in REFUSALS}
    assert await dump(xenstored) == before
    # Editor-style scratch names are accepted, but live in the mount's memory only.
    await sh(f"echo mem > {x}/.hidden && echo mem > {x}/d/k~ && cat {x}/.hidden")
    assert await dump(xenstored) == before
    assert (await sh(f"ls -A {x}/d")).stdout == b"j\nk\nk~\n"
    moved = await sh(f"mv {x}/d/j {x}/d/j.bak", check=False)
    assert moved.returncode == 1 and b"cannot create regular file" in moved.stderr
    assert b"Invalid argument" in moved.stderr
    assert await dump(xenstored) == before


async def test_guest_permissions(xsmount: XsMountFactory, xenstored_guests: ServerPath) -> None:
    server = xenstored_guests
    home = "/local/domain/1"
    await xs_write(server, f"{home}/mine", "m", f"{home}/ro", "r", f"{home}/secret", "s", f"{home}/dir/x", "1")
    for node, perms in [
        (home, ["n1", "r0"]),
        (f"{home}/mine", ["n1"]),
        (f"{home}/ro", ["n0", "r1"]),
        (f"{home}/secret", ["n0"]),
        (f"{home}/dir", ["n0", "r1"]),
        (f"{home}/dir/x", ["n0", "r1"]),
    ]:
        await xs(server, "xenstore-chmod", node, *perms)
    m = await xsmount(server.domain_sockets[1], domid=1)
    d = f"{m.dir}{home}"
    # Mode bits are what domain 1 may do.
    modes = (await sh(f"stat -c '%n %A' {d}/mine {d}/ro {d}/secret {d}/dir")).stdout.decode()
    assert modes.split("\n")[:4] == [
        f"{d}/mine -rw-r--r--",
        f"{d}/ro -r--r--r--",
        f"{d}/secret d--x--x--x",
        f"{d}/dir dr-xr-xr-x",
    ]
    assert (await sh(f"cat {d}/ro {d}/mine")).stdout == b"r\nm\n"
    before = await dump(server)
    refusals: list[tuple[str, Callable[[], object], int]] = [
        ("list a node without r", lambda: os.listdir(f"{d}/secret"), errno.EACCES),
        ("below a node without r", lambda: os.listdir(f"{d}/secret/x"), errno.EACCES),
        ("write a read-only node", lambda: create(f"{d}/ro"), errno.EACCES),
        ("create in a read-only directory", lambda: create(f"{d}/dir/new"), errno.EACCES),
        ("mkdir in a read-only directory", lambda: os.mkdir(f"{d}/dir/sub"), errno.EACCES),
        ("rm from a read-only directory", lambda: os.unlink(f"{d}/dir/x"), errno.EACCES),
        ("list /, which only dom0 may read", lambda: os.listdir(m.dir), errno.EACCES),
        # Below a node it may not read, any name answers EACCES: it looks like an
        # unreadable (but traversable) directory, so creating a file there is EISDIR.
        ("create under /", lambda: create(f"{m.dir}/top"), errno.EISDIR),
        ("give the node away", lambda: os.setxattr(f"{d}/mine", "user.xenstore.perms", b"n2"), errno.EPERM),
        ("chmod someone else's node", lambda: os.setxattr(f"{d}/ro", "user.xenstore.perms", b"n0,b1"), errno.EACCES),
        ("over the guest node-size quota", lambda: create(f"{d}/mine", b"v" * 2100), errno.EDQUOT),
        ("more than 5 permission entries", lambda: os.setxattr(f"{d}/mine", "user.xenstore.perms", b"n1,r2,r3,r4,r5,r6"), errno.EDQUOT),
    ]
    got = {what: await in_thread(errno_of, op) for what, op, _ in refusals}
    assert got == {what: code for what, _, code in refusals}
    assert await dump(server) == before
    # What domain 1 may do works, with the permissions it gets.
    await sh(f"echo guest > {d}/mine && echo new > {d}/created && setfattr -n user.xenstore.perms -v n1,r2 {d}/mine")
    listing = (await xs(server, "xenstore-ls", "-p", home)).decode()
    assert 'mine = "guest"' in listing and "(n1,r2)" in listing and 'created = "new"' in listing
    # dom0 makes the node read-only for domain 1 while mounted: refused at once.
    await xs(server, "xenstore-chmod", f"{home}/mine", "n0", "r1")
    assert await in_thread(errno_of, create, f"{d}/mine") == errno.EACCES
    assert (await sh(f"cat {d}/mine")).stdout == b"guest\n"


async def test_server_killed_then_back(xsmount: XsMountFactory, restartable: Restartable) -> None:
    server = restartable.path
    await xs_write(server, "/vm/state", "4", "/vm/name", "guest")
    m = await xsmount(server, FsOptions(attr_timeout=60), timeout=5.0)
    d = f"{m.dir}/vm"
    assert (await sh(f"cat {d}/state {d}/name")).stdout == b"4\nguest\n"
    await trio.to_thread.run_sync(restartable.kill)
    # Fails at once, cached or not, and never hangs.
    for cmd in (f"cat {d}/state", f"ls {d}", f"echo x > {d}/state", f"echo x > {d}/new", f"mkdir {d}/m"):
        started = time.monotonic()
        result = await sh(cmd, check=False)
        assert result.returncode != 0 and b"Input/output error" in result.stderr, cmd
        assert time.monotonic() - started < 1.0, cmd
    # A fresh server on the same socket: the mount reconnects, the cache is rebuilt
    # (the old nodes are gone from the new store, the kernel forgets them too).
    await trio.to_thread.run_sync(restartable.start)

    async def back() -> bool:
        return (await sh(f"ls {m.dir}", check=False)).stdout == b"tool\n"

    await eventually(back, timeout=10)
    assert await in_thread(errno_of, os.stat, f"{d}/state") == errno.ENOENT
    await sh(f"mkdir {d} && echo 1 > {d}/state")
    assert await xs(server, "xenstore-read", "/vm/state") == b"1\n"
    assert (await sh(f"cat {d}/state")).stdout == b"1\n"


async def test_server_stopped_gives_eio_after_the_timeout(
    xsmount: XsMountFactory, xenstored_real: ServerPath
) -> None:
    await xs_write(xenstored_real, "/vm/cached", "1", "/other/x", "2")
    m = await xsmount(xenstored_real, timeout=1.0)
    assert (await sh(f"ls {m.dir}/vm && cat {m.dir}/vm/cached")).stdout == b"cached\n1\n"
    assert xenstored_real.pid is not None
    os.kill(xenstored_real.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = await sh(f"cat {m.dir}/other/x", check=False)
        elapsed = time.monotonic() - started
        assert b"Input/output error" in result.stderr and 0.9 < elapsed < 5
        # Nothing changes while the server is stopped: the cache may still answer.
        assert (await sh(f"cat {m.dir}/vm/cached")).stdout == b"1\n"
    finally:
        os.kill(xenstored_real.pid, signal.SIGCONT)
    assert (await sh(f"cat {m.dir}/other/x")).stdout == b"2\n"
