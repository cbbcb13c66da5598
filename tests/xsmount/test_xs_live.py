"""Changes made by others reach ``cat``, ``ls`` and the kernel at once; the cache
asks xenstored at most once per node, and not at all when warm.

The kernel may keep names and attributes for 60 s here: only the invalidations
pushed from the watch can make the ``stat`` checks pass.
"""

from __future__ import annotations

import errno
import os
from collections import Counter

import pytest

from kvpfs.fs.operations import FsOptions
from tests.mounting import eventually, in_thread, sh
from tests.xsmount.conftest import XsMountFactory, errno_of, xs, xs_write

pytestmark = pytest.mark.mount

CACHED = FsOptions(attr_timeout=60)


async def test_xenstore_write_is_seen_by_cat_at_once(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, "/vm/state", "1")
    m = await xsmount(xenstored, CACHED)
    f = f"{m.dir}/vm/state"
    assert (await sh(f"cat {f}")).stdout == b"1\n"
    # Growing values: never stale, never cut to the size the kernel cached.
    for value in ("2", "connected", "a-much-longer-value-than-before", "x"):
        out = await sh(f"xenstore-write /vm/state {value} && cat {f}", env={"XENSTORED_PATH": xenstored})
        assert out.stdout == value.encode() + b"\n"

    async def size_pushed() -> bool:
        return (await in_thread(os.stat, f)).st_size == 2

    await eventually(size_pushed)


async def test_new_and_removed_nodes_at_once(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, "/vm/a", "1", "/vm/b", "2", "/vm/sub/c", "3")
    m = await xsmount(xenstored, CACHED)
    d = f"{m.dir}/vm"
    env = {"XENSTORED_PATH": xenstored}
    assert (await sh(f"ls -U {d}")).stdout == b"a\nb\nsub\n"
    assert (await sh(f"cat {d}/sub/c")).stdout == b"3\n"
    out = await sh(f"xenstore-write /vm/new v && ls -U {d} && cat {d}/new", env=env)
    assert out.stdout == b"a\nb\nsub\nnew\nv\n"
    out = await sh(f"xenstore-rm /vm/a && ls -U {d}", env=env)
    assert out.stdout == b"b\nsub\nnew\n"
    out = await sh(f"xenstore-rm /vm/sub && ls -U {d}; cat {d}/sub/c", env=env, check=False)
    assert out.stdout == b"b\nnew\n" and b"No such file" in out.stderr

    # The kernel held a and sub/c for 60 s; the push made it forget them.
    async def forgotten() -> bool:
        a = await in_thread(errno_of, os.stat, f"{d}/a")
        c = await in_thread(errno_of, os.stat, f"{d}/sub/c")
        return a == c == errno.ENOENT

    await eventually(forgotten)
    # Implicit parents (XS_WRITE makes missing ones) appear as directories.
    out = await sh(f"xenstore-write /vm/p/q/r deep && cat {d}/p/q/r", env=env)
    assert out.stdout == b"deep\n"


async def test_file_turns_into_directory_and_back(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, "/vm/node", "")
    m = await xsmount(xenstored, CACHED)
    p = f"{m.dir}/vm/node"
    assert (await sh(f"stat -c %F {p}")).stdout == b"regular file\n"
    await xs_write(xenstored, "/vm/node/child", "1")

    async def kind_is(kind: bytes) -> bool:
        return (await sh(f"stat -c %F {p}")).stdout == kind

    await eventually(lambda: kind_is(b"directory\n"))
    assert (await sh(f"cat {p}/child")).stdout == b"1\n"
    await xs(xenstored, "xenstore-rm", "/vm/node/child")
    await eventually(lambda: kind_is(b"regular file\n"))
    assert (await sh(f"cat {p}")).stdout == b"\n"


async def test_permission_change_by_others_is_seen(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, "/vm/k", "v")
    m = await xsmount(xenstored, CACHED)
    attr = f"getfattr --only-values -n user.xenstore.perms {m.dir}/vm/k"
    assert (await sh(attr)).stdout == b"n0"
    out = await sh(f"xenstore-chmod /vm/k n0 r7 && {attr}", env={"XENSTORED_PATH": xenstored})
    assert out.stdout == b"n0,r7"


def tree_args(domains: int, per_domain: int) -> list[str]:
    pairs: list[str] = []
    for d in range(domains):
        for i in range(per_domain):
            pairs += [f"/local/domain/{d}/device/vbd/{51712 + i}/state", str(i % 7)]
        pairs += [f"/local/domain/{d}/name", f"guest{d}"]
    return pairs


async def test_find_cat_asks_once_per_node_then_never(xsmount: XsMountFactory, xenstored: str) -> None:
    await xs_write(xenstored, *tree_args(4, 12))
    # One directory too big for one DIRECTORY reply (E2BIG, then DIRECTORY_PART).
    await xs_write(xenstored, *[x for i in range(400) for x in (f"/wide/entry-{i:04d}", str(i))])
    m = await xsmount(xenstored, CACHED)
    start = len(m.requests)
    cold = await sh(f"find {m.dir} -type f -exec cat {{}} + | wc -l")
    files = int(cold.stdout)
    counts = m.counts(start)
    directories = Counter(path for (op, path) in counts.elements() if op == "DIRECTORY")
    reads = Counter(path for (op, path) in counts.elements() if op == "READ")
    assert files == 4 * 12 + 4 + 400 + 1  # + /tool/xenstored
    assert max(directories.values()) == 1 and max(reads.values()) == 1
    assert len(reads) == files
    # Every node listed once (each leaf's empty listing is what makes it a file).
    # root, tool, local, local/domain, wide; per domain: itself, device, vbd, 12 vbds
    assert len(directories) == files + 5 + 4 * 15
    assert set(op for op, _ in counts) <= {"DIRECTORY", "DIRECTORY_PART", "READ"}
    assert all(p == "/wide" for op, p in counts if op == "DIRECTORY_PART")
    # Warm: nothing at all reaches xenstored.
    start = len(m.requests)
    warm = await sh(f"find {m.dir} -type f -exec cat {{}} + | md5sum")
    again = await sh(f"find {m.dir} -type f -exec cat {{}} + | md5sum")
    assert warm.stdout == again.stdout
    assert m.requests[start:] == []
    # A change costs exactly the changed node.
    await xs_write(xenstored, "/local/domain/2/name", "renamed")
    start = len(m.requests)
    await sh(f"find {m.dir} -type f -exec cat {{}} + > /dev/null")
    assert sorted(m.requests[start:]) == [
        ("DIRECTORY", "/local/domain/2"),
        ("DIRECTORY", "/local/domain/2/name"),
        ("READ", "/local/domain/2/name"),
    ]
