"""Random operations through a real mount, checked against a model after every step.

A hypothesis state machine drives the kvpfs command's mount through the kernel:
create, write, append, truncate, rename (plain and RENAME_NOREPLACE), unlink,
mkdir, rmdir and xattrs on ``kvp/guest`` and on a ``xenstore/`` subtree, mixed
with writes by outside programs: a cloud-init style flock appender on the guest
pool (``tests/kvp/peer_writer.py append-flock``) and ``xenstore-write`` /
``xenstore-rm``.  After every step three things must equal the model:

* the mount: names, file or directory, every file's bytes (the text convention),
  and on ``xenstore/`` every node's value and permission xattrs;
* the guest pool file, byte for byte (records in file order, duplicates kept);
* the store, read over the XenStore protocol: every node's value, permissions
  and children.

After the mount's own operations everything must agree at once, with one
documented exception: a create with nothing written (``: > k``) is committed at
release, which the kernel sends after close() has returned, so the pool and the
store may lag it briefly.  After an outside program's change the mount must agree
within a few seconds (changes by others are pushed to the kernel).

The model states the README's rules: the text convention (one trailing newline
dropped on write, added on read), the guest pool's record rules (in place for an
existing key, appended for a new one, the first record of a key is the one that
counts), and for XenStore that a childless node is a directory only while this
mount remembers making it (mkdir, or removing its last child through the mount).
An outside program never removes a node the mount remembers making: whether the
mount then forgets it depends on what its cache held at the time.

Budget: 25 examples of up to 40 steps (about 10 s).  To run it long::

    KVPFS_MODEL_EXAMPLES=500 KVPFS_MODEL_STEPS=200 \\
        .venv/bin/python -m pytest -p no:cacheprovider tests/mount/test_model.py
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from kvpfs.fs.mount import mounted_at
from kvpfs.xenstore.protocol import Op
from tests.kvp.helpers import HERE as KVP_TESTS
from tests.kvp.helpers import child_env
from tests.mount.cli_support import kvpfs_pid, run, wait_gone
from tests.mount.kvp_fixtures import Pools, rec
from tests.mounting import renameat2_noreplace
from tests.xenstore.conftest import RawConn

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("private_runtime_dir")]

EXAMPLES = int(os.environ.get("KVPFS_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("KVPFS_MODEL_STEPS", "40"))
LONG = "KVPFS_MODEL_EXAMPLES" in os.environ or "KVPFS_MODEL_STEPS" in os.environ

#: Keys of the guest pool.  The outside appender (peer_writer.py append-flock with
#: one operation) appends the key PREFIX + "0" with the value PREFIX + "0=appended".
KEYS = ("a0", "b0", "c0")
#: XenStore: directories under the subtree's root, and leaves in them.
DIRS = ("d", "e")
LEAVES = ("k", "l")
PERMS = (("n0",), ("n0", "r1"), ("b0", "w2"), ("n1", "r0", "w3"))

#: What writes through the mount carry: text, newlines included.
DATA = st.builds(
    lambda body, end: (body + end).encode(),
    st.text(alphabet="ab \n", max_size=8),
    st.sampled_from(["", "\n", "\n\n", "c\n", "c"]),
)
#: What outside programs write (an argument of xenstore-write).
WORD = st.text(alphabet="xyz019", min_size=1, max_size=8)

OUTSIDE_WAIT = 5.0

Outcome = int | None  # the errno, or None for success


def strip1(data: bytes) -> bytes:
    """The text convention: a write drops exactly one trailing newline."""
    return data[:-1] if data.endswith(b"\n") else data


def outcome(fn: Callable[[], object]) -> Outcome:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def write_file(path: str, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)  # where the store's refusal arrives


CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
APPEND = os.O_WRONLY | os.O_APPEND


# --------------------------------------------------------------------------- models


@dataclass
class KvpModel:
    """The guest pool: its records in file order (an appender may duplicate keys)."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)

    def first(self, key: bytes) -> int | None:
        for i, (k, _) in enumerate(self.records):
            if k == key:
                return i
        return None

    def get(self, key: bytes) -> bytes | None:
        i = self.first(key)
        return None if i is None else self.records[i][1]

    def visible(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for k, v in self.records:
            out.setdefault(k, v)
        return out

    def set(self, key: bytes, value: bytes) -> None:
        i = self.first(key)
        if i is None:
            self.records.append((key, value))
        else:
            self.records[i] = (key, value)

    def delete(self, key: bytes) -> None:
        i = self.first(key)
        assert i is not None
        del self.records[i]

    def rename(self, old: bytes, new: bytes) -> None:
        i = self.first(old)
        assert i is not None
        value = self.records[i][1]
        j = self.first(new)
        if j is None:
            self.records[i] = (new, value)  # the key field rewritten in place
        else:
            self.records[j] = (new, value)
            del self.records[i]

    def file_bytes(self) -> bytes:
        return b"".join(rec(k, v) for k, v in self.records)


XsPath = tuple[str, ...]


@dataclass
class XsNode:
    value: bytes
    perms: tuple[str, ...]


@dataclass
class XsModel:
    """A XenStore subtree (paths relative to its root), and the childless nodes the
    mount shows as directories because it made them (mkdir) or removed their last
    child itself."""

    nodes: dict[XsPath, XsNode]
    made: set[XsPath]

    def kids(self, path: XsPath) -> list[str]:
        n = len(path)
        return [p[-1] for p in self.nodes if len(p) == n + 1 and p[:n] == path]

    def is_dir(self, path: XsPath) -> bool:
        return path == () or path in self.made or bool(self.kids(path))

    def resolve(self, path: XsPath) -> Outcome:
        """The errno the kernel's lookup of ``path`` gives, None if it exists."""
        for i in range(1, len(path) + 1):
            if path[:i] not in self.nodes:
                return errno.ENOENT
            if i < len(path) and not self.is_dir(path[:i]):
                return errno.ENOTDIR
        return None

    def parent_error(self, path: XsPath) -> Outcome:
        """The errno of creating ``path``: its parent must be an existing directory."""
        err = self.resolve(path[:-1])
        if err is None and not self.is_dir(path[:-1]):
            return errno.ENOTDIR
        return err

    def create(self, path: XsPath, value: bytes) -> None:
        """A node written where there was none: missing parents made on the way,
        each inheriting its parent's permissions (xenstored's rule)."""
        for i in range(1, len(path) + 1):
            if path[:i] not in self.nodes:
                self.nodes[path[:i]] = XsNode(b"", self.nodes[path[: i - 1]].perms)
        self.nodes[path].value = value

    def remove(self, path: XsPath) -> None:
        n = len(path)
        for p in [p for p in self.nodes if p[:n] == path]:
            del self.nodes[p]
            self.made.discard(p)


# --------------------------------------------------------------------------- the mount


@dataclass
class Env:
    mnt: Path
    pools: Pools
    xenstored: str
    #: Examples run so far: each gets a XenStore subtree of its own.
    examples: int = 0
    steps: int = 0


def _lock_and_empty(path: Path) -> None:
    """Empty a pool file as a well-behaved writer: OFD write lock, then flock."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _wait_until(check: Callable[[], None], timeout: float = OUTSIDE_WAIT) -> None:
    """Until ``check()`` stops failing; its last failure otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _dump_subtree(path: str, root: bytes) -> dict[XsPath, tuple[bytes, tuple[str, ...], set[str]]]:
    out: dict[XsPath, tuple[bytes, tuple[str, ...], set[str]]] = {}
    with RawConn(path) as c:
        stack: list[XsPath] = [()]
        while stack:
            rel = stack.pop()
            node = b"/".join([root, *(p.encode() for p in rel)])
            value = c.rq(Op.READ, node + b"\0")
            perms = c.rq(Op.GET_PERMS, node + b"\0")
            names = c.rq(Op.DIRECTORY, node + b"\0")
            assert not value.startswith(b"E:"), (node, value)
            kids = [n.decode() for n in names.split(b"\0") if n]
            out[rel] = (value, tuple(p.decode() for p in perms.split(b"\0") if p), set(kids))
            stack.extend((*rel, k) for k in kids)
    return out


class ModelMachine(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.kvp = KvpModel()
        self.xs = XsModel({(): XsNode(b"", ("n0",))}, {()})
        self.outside = False
        #: The last step was a create with nothing written: kvpfs commits it at
        #: release, which the kernel sends after close() has returned.
        self.at_release = False
        self.root = ""

    # -- paths

    @property
    def guest(self) -> str:
        return f"{self.env.mnt}/kvp/guest"

    def gpath(self, key: str) -> str:
        return f"{self.guest}/{key}"

    def xpath(self, path: XsPath) -> str:
        return "/".join([f"{self.env.mnt}/xenstore/{self.root}", *path])

    def xs_store_path(self, path: XsPath) -> str:
        return "/".join([f"/{self.root}", *path])

    def expect(self, got: Outcome, want: Outcome, what: str) -> None:
        assert got == want, (
            f"{what}: got {errno.errorcode.get(got or 0, got)}, "
            f"want {errno.errorcode.get(want or 0, want)}"
        )

    # -- set-up of each example

    @initialize()
    def fresh_state(self) -> None:
        env = self.env
        env.examples += 1
        if env.examples > 1:
            with RawConn(env.xenstored) as c:
                c.rq(Op.RM, f"/model{env.examples - 1}\0".encode())
        self.root = f"model{env.examples}"
        os.mkdir(f"{env.mnt}/xenstore/{self.root}")
        _lock_and_empty(env.pools.path("guest"))
        self.outside = True  # the emptied pool reaches the mount by its push

    # -- KVP through the mount

    @rule(key=st.sampled_from(KEYS), data=DATA)
    def kvp_write(self, key: str, data: bytes) -> None:
        self.outside = False
        self.at_release = not data
        self.expect(outcome(lambda: write_file(self.gpath(key), data, CREATE)), None, "write")
        self.kvp.set(key.encode(), strip1(data))

    @rule(key=st.sampled_from(KEYS))
    def kvp_write_too_long(self, key: str) -> None:
        self.outside = False
        got = outcome(lambda: write_file(self.gpath(key), b"v" * 1100, CREATE))
        self.expect(got, errno.EFBIG, "write of 1100 characters")

    @rule(key=st.sampled_from(KEYS), data=DATA)
    def kvp_append(self, key: str, data: bytes) -> None:
        self.outside = False
        got = outcome(lambda: write_file(self.gpath(key), data, APPEND))
        old = self.kvp.get(key.encode())
        self.expect(got, errno.ENOENT if old is None else None, "append")
        if old is not None:
            self.kvp.set(key.encode(), strip1(old + b"\n" + data))

    @rule(key=st.sampled_from(KEYS), size=st.integers(0, 16))
    def kvp_truncate(self, key: str, size: int) -> None:
        self.outside = False
        got = outcome(lambda: os.truncate(self.gpath(key), size))
        old = self.kvp.get(key.encode())
        if old is None:
            self.expect(got, errno.ENOENT, "truncate")
            return
        content = old + b"\n"
        if size > len(content):
            # NUL padding: a pool value cannot hold a NUL.
            self.expect(got, errno.EINVAL, "truncate beyond the end")
            return
        self.expect(got, None, "truncate")
        self.kvp.set(key.encode(), strip1(content[:size]))

    @rule(old=st.sampled_from(KEYS), new=st.sampled_from(KEYS), noreplace=st.booleans())
    def kvp_rename(self, old: str, new: str, noreplace: bool) -> None:
        self.outside = False
        if noreplace:
            got = outcome(lambda: renameat2_noreplace(self.gpath(old), self.gpath(new)))
        else:
            got = outcome(lambda: os.rename(self.gpath(old), self.gpath(new)))
        visible = self.kvp.visible()
        if old.encode() not in visible:
            self.expect(got, errno.ENOENT, "rename")
        elif noreplace and new.encode() in visible:
            self.expect(got, errno.EEXIST, "rename without replacing")
        else:
            self.expect(got, None, "rename")
            if old != new:
                self.kvp.rename(old.encode(), new.encode())

    @rule(key=st.sampled_from(KEYS))
    def kvp_unlink(self, key: str) -> None:
        self.outside = False
        got = outcome(lambda: os.unlink(self.gpath(key)))
        exists = self.kvp.get(key.encode()) is not None
        self.expect(got, None if exists else errno.ENOENT, "unlink")
        if exists:
            self.kvp.delete(key.encode())

    @rule(key=st.sampled_from(KEYS))
    def kvp_mkdir_and_rmdir(self, key: str) -> None:
        self.outside = False
        exists = self.kvp.get(key.encode()) is not None
        got = outcome(lambda: os.mkdir(self.gpath(key)))
        self.expect(got, errno.EEXIST if exists else errno.EPERM, "mkdir in a pool")
        got = outcome(lambda: os.rmdir(self.gpath(key)))
        self.expect(got, errno.ENOTDIR if exists else errno.ENOENT, "rmdir in a pool")

    @rule(key=st.sampled_from(KEYS))
    def kvp_xattrs(self, key: str) -> None:
        self.outside = False
        path = self.gpath(key)
        exists = self.kvp.get(key.encode()) is not None
        missing = None if exists else errno.ENOENT
        self.expect(outcome(lambda: os.listxattr(path)), missing, "listxattr")
        got = outcome(lambda: os.getxattr(path, "user.xenstore.perms"))
        self.expect(got, errno.ENODATA if exists else errno.ENOENT, "getxattr on a key")
        got = outcome(lambda: os.setxattr(path, "user.note", b"1"))
        self.expect(got, errno.ENOTSUP if exists else errno.ENOENT, "setxattr on a key")
        if exists:
            assert os.listxattr(path) == []

    # -- KVP by an outside program

    @rule(prefix=st.sampled_from([k[:-1] for k in KEYS]), seed=st.integers(0, 9))
    def outside_appender(self, prefix: str, seed: int) -> None:
        self.outside = True
        subprocess.run(
            [sys.executable, str(KVP_TESTS / "peer_writer.py"), str(self.env.pools.path("guest")),
             "append-flock", prefix, "1", str(seed)],
            check=True, capture_output=True, timeout=30, env=child_env(),
        )
        key = f"{prefix}0".encode()
        self.kvp.records.append((key, key + b"=appended"))

    # -- XenStore through the mount

    @rule(d=st.sampled_from(DIRS))
    def xs_mkdir(self, d: str) -> None:
        self.outside = False
        got = outcome(lambda: os.mkdir(self.xpath((d,))))
        if (d,) in self.xs.nodes:
            self.expect(got, errno.EEXIST, "mkdir")
            return
        self.expect(got, None, "mkdir")
        self.xs.create((d,), b"")
        self.xs.made.add((d,))

    @rule(d=st.sampled_from(DIRS), k=st.sampled_from(LEAVES), data=DATA, append=st.booleans())
    def xs_write(self, d: str, k: str, data: bytes, append: bool) -> None:
        self.outside = False
        self.at_release = not data and not append
        path = (d, k)
        got = outcome(lambda: write_file(self.xpath(path), data, APPEND if append else CREATE))
        err = self.xs.parent_error(path)
        if err is None and append and path not in self.xs.nodes:
            err = errno.ENOENT
        self.expect(got, err, "append" if append else "write")
        if err is not None:
            return
        if append:
            self.xs.nodes[path].value = strip1(self.xs.nodes[path].value + b"\n" + data)
        elif path in self.xs.nodes:
            self.xs.nodes[path].value = strip1(data)
        else:
            self.xs.create(path, strip1(data))

    @rule(d=st.sampled_from(DIRS), k=st.sampled_from(LEAVES), size=st.integers(0, 16))
    def xs_truncate(self, d: str, k: str, size: int) -> None:
        self.outside = False
        path = (d, k)
        got = outcome(lambda: os.truncate(self.xpath(path), size))
        err = self.xs.resolve(path)
        self.expect(got, err, "truncate")
        if err is None:
            content = (self.xs.nodes[path].value + b"\n")[:size]
            self.xs.nodes[path].value = strip1(content.ljust(size, b"\0"))

    @rule(
        d1=st.sampled_from(DIRS), k1=st.sampled_from(LEAVES),
        d2=st.sampled_from(DIRS), k2=st.sampled_from(LEAVES),
    )
    def xs_rename_leaf(self, d1: str, k1: str, d2: str, k2: str) -> None:
        self.outside = False
        old, new = (d1, k1), (d2, k2)
        got = outcome(lambda: os.rename(self.xpath(old), self.xpath(new)))
        # The kernel walks both parents before it looks up the old name.
        err = self.xs.parent_error(old) or self.xs.parent_error(new)
        if err is None and old not in self.xs.nodes:
            err = errno.ENOENT
        self.expect(got, err, "rename")
        if err is not None or old == new:
            return
        node = self.xs.nodes.pop(old)
        self.xs.nodes[new] = XsNode(node.value, node.perms)  # value and permissions move

    @rule(d1=st.sampled_from(DIRS), d2=st.sampled_from(DIRS))
    def xs_rename_directory(self, d1: str, d2: str) -> None:
        self.outside = False
        if (d1,) not in self.xs.nodes or not self.xs.is_dir((d1,)) or (d2,) in self.xs.nodes:
            return
        got = outcome(lambda: os.rename(self.xpath((d1,)), self.xpath((d2,))))
        self.expect(got, errno.EXDEV, "rename of a directory")

    @rule(path=st.sampled_from([(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]))
    def xs_unlink(self, path: XsPath) -> None:
        self.outside = False
        got = outcome(lambda: os.unlink(self.xpath(path)))
        err = self.xs.resolve(path)
        if err is None and self.xs.is_dir(path):
            err = errno.EISDIR
        self.expect(got, err, "unlink")
        if err is None:
            self.xs.remove(path)
            self.xs.made.add(path[:-1])

    @rule(path=st.sampled_from([(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]))
    def xs_rmdir(self, path: XsPath) -> None:
        self.outside = False
        got = outcome(lambda: os.rmdir(self.xpath(path)))
        err = self.xs.resolve(path)
        if err is None and not self.xs.is_dir(path):
            err = errno.ENOTDIR
        elif err is None and self.xs.kids(path):
            err = errno.ENOTEMPTY
        self.expect(got, err, "rmdir")
        if err is None:
            self.xs.remove(path)
            self.xs.made.add(path[:-1])

    @rule(
        path=st.sampled_from([(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]),
        value=DATA,
    )
    def xs_set_value_xattr(self, path: XsPath, value: bytes) -> None:
        self.outside = False
        got = outcome(lambda: os.setxattr(self.xpath(path), "user.xenstore.value", value))
        err = self.xs.resolve(path)
        self.expect(got, err, "setxattr user.xenstore.value")
        if err is None:
            self.xs.nodes[path].value = value  # raw bytes: no text convention

    @rule(
        path=st.sampled_from([(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]),
        perms=st.sampled_from(PERMS),
    )
    def xs_set_perms_xattr(self, path: XsPath, perms: tuple[str, ...]) -> None:
        self.outside = False
        text = ",".join(perms).encode()
        got = outcome(lambda: os.setxattr(self.xpath(path), "user.xenstore.perms", text))
        err = self.xs.resolve(path)
        self.expect(got, err, "setxattr user.xenstore.perms")
        if err is None:
            self.xs.nodes[path].perms = perms

    # -- XenStore by outside programs

    def _tool(self, *argv: str) -> None:
        env = dict(os.environ, XENSTORED_PATH=self.env.xenstored)
        subprocess.run(argv, check=True, capture_output=True, timeout=30, env=env)

    @rule(d=st.sampled_from(DIRS), k=st.sampled_from(LEAVES), word=WORD)
    def outside_xenstore_write(self, d: str, k: str, word: str) -> None:
        self.outside = True
        path = (d, k)
        self._tool("xenstore-write", self.xs_store_path(path), word)
        if path in self.xs.nodes:
            self.xs.nodes[path].value = word.encode()
        else:
            self.xs.create(path, word.encode())

    @rule(path=st.sampled_from([(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]))
    def outside_xenstore_rm(self, path: XsPath) -> None:
        if path not in self.xs.nodes or path in self.xs.made:
            # Not a node the mount remembers making: whether it forgets a removed
            # one depends on what its cache held (reported, not modelled).
            return
        self.outside = True
        self._tool("xenstore-rm", self.xs_store_path(path))
        self.xs.remove(path)

    # -- the checks

    def check_pool(self) -> None:
        got = self.env.pools.bytes("guest")
        want = self.kvp.file_bytes()
        assert got == want, f"pool file: {len(got)} bytes, model {self.kvp.records}"

    def check_kvp_mount(self) -> None:
        visible = self.kvp.visible()
        names = sorted(os.listdir(self.guest))
        assert names == sorted(k.decode() for k in visible), (names, visible)
        for key, value in visible.items():
            path = self.gpath(key.decode())
            with open(path, "rb") as f:
                assert f.read() == value + b"\n", (key, value)
            assert os.stat(path).st_size == len(value) + 1, (key, value)
        for key in KEYS:
            if key.encode() not in visible:
                assert not os.path.lexists(self.gpath(key)), (key, "should be gone")

    def check_store(self) -> None:
        got = _dump_subtree(self.env.xenstored, f"/{self.root}".encode())
        want = {
            path: (node.value, node.perms, set(self.xs.kids(path)))
            for path, node in self.xs.nodes.items()
        }
        assert got == want

    def check_xs_mount(self) -> None:
        for path in [(d,) for d in DIRS] + [(d, k) for d in DIRS for k in LEAVES]:
            if path not in self.xs.nodes and self.xs.resolve(path[:-1]) is None:
                assert not os.path.lexists(self.xpath(path)), (path, "should be gone")
        for path, node in self.xs.nodes.items():
            where = self.xpath(path)
            mode = os.lstat(where).st_mode
            if self.xs.is_dir(path):
                assert stat.S_ISDIR(mode), (path, "should be a directory")
                assert sorted(os.listdir(where)) == sorted(self.xs.kids(path)), path
            else:
                assert stat.S_ISREG(mode), (path, "should be a file")
                with open(where, "rb") as f:
                    assert f.read() == node.value + b"\n", (path, node)
            assert os.getxattr(where, "user.xenstore.value") == node.value, (path, node)
            perms = os.getxattr(where, "user.xenstore.perms").decode()
            assert perms == ",".join(node.perms), (path, node)

    @invariant()
    def mount_pool_and_store_match_the_model(self) -> None:
        self.env.steps += 1
        # The mount only learns of an outside program's change by its push; the
        # pool and the store get an empty create only at release (see at_release).
        # Everything else must hold at once.
        for check, lags in [
            (self.check_pool, self.at_release),
            (self.check_store, self.at_release),
            (self.check_kvp_mount, self.outside),
            (self.check_xs_mount, self.outside),
        ]:
            if lags:
                _wait_until(check)
            else:
                check()
        self.at_release = False


# --------------------------------------------------------------------------- the test


@pytest.fixture
def kvpfs_mount(mnt: Path, pools: Pools) -> Iterator[Env]:
    """The kvpfs command's mount, with an embedded xenstored; unmounted afterwards
    (the ``mnt`` fixture kills and lazily unmounts whatever is left)."""
    result = run("embedded", str(mnt), "--kvp-dir", str(pools.directory))
    assert result.returncode == 0, result.stderr
    pid = kvpfs_pid(mnt)
    try:
        xenstored = (mnt / ".kvpfs/xenstored-path").read_text().strip()
        yield Env(mnt, pools, xenstored)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        if pid is not None:
            wait_gone(pid)
        assert not mounted_at(str(mnt))


@pytest.mark.timeout(0 if LONG else 120)
def test_random_operations_against_a_model(kvpfs_mount: Env) -> None:
    class Machine(ModelMachine):
        env = kvpfs_mount

    started = time.monotonic()
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    print(
        f"model test: {kvpfs_mount.examples} examples, {kvpfs_mount.steps} checked steps "
        f"in {time.monotonic() - started:.1f} s"
    )

