"""One libxenstore scenario through ctypes; prints every observable as JSON.

Run as ``python -m tests.xenstore.libxs_scenario`` with ``XENSTORED_PATH`` set
to a server's socket (libxenstore reads it at ``xs_open``).  The scenario runs in
a process of its own: libxenstore's calls block, and a crash inside it must not
take the test process down.  Output: one JSON list of ``[label, value]`` pairs,
bytes as hex; failures are ``["error", ERRNO_NAME]``.

What it covers: a directory too big for one DIRECTORY reply (libxenstore falls
back to DIRECTORY_PART), values with every byte, transactions with a conflict and
a retry, an aborted transaction, watches on a subtree that is removed and on
nodes that do not exist yet, permission inheritance, relative paths, and the
special watches around INTRODUCE, SET_TARGET and RELEASE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import sys
from typing import Any

_xs = ctypes.CDLL("libxenstore.so.4", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None

H = ctypes.c_void_p
T = ctypes.c_uint32
UINTP = ctypes.POINTER(ctypes.c_uint)


class Perm(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("perms", ctypes.c_uint)]


def _sig(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(_xs, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("xs_open", H, ctypes.c_ulong)
_sig("xs_close", None, H)
_sig("xs_read", ctypes.c_void_p, H, T, ctypes.c_char_p, UINTP)
_sig("xs_write", ctypes.c_bool, H, T, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint)
_sig("xs_mkdir", ctypes.c_bool, H, T, ctypes.c_char_p)
_sig("xs_rm", ctypes.c_bool, H, T, ctypes.c_char_p)
_sig("xs_directory", ctypes.c_void_p, H, T, ctypes.c_char_p, UINTP)
_sig("xs_get_permissions", ctypes.c_void_p, H, T, ctypes.c_char_p, UINTP)
_sig("xs_set_permissions", ctypes.c_bool, H, T, ctypes.c_char_p, ctypes.POINTER(Perm), ctypes.c_uint)
_sig("xs_watch", ctypes.c_bool, H, ctypes.c_char_p, ctypes.c_char_p)
_sig("xs_unwatch", ctypes.c_bool, H, ctypes.c_char_p, ctypes.c_char_p)
_sig("xs_check_watch", ctypes.c_void_p, H)
_sig("xs_transaction_start", T, H)
_sig("xs_transaction_end", ctypes.c_bool, H, T, ctypes.c_bool)
_sig("xs_introduce_domain", ctypes.c_bool, H, ctypes.c_uint, ctypes.c_ulong, ctypes.c_uint)
_sig("xs_release_domain", ctypes.c_bool, H, ctypes.c_uint)
_sig("xs_set_target", ctypes.c_bool, H, ctypes.c_uint, ctypes.c_uint)
_sig("xs_get_domain_path", ctypes.c_void_p, H, ctypes.c_uint)
_sig("xs_is_domain_introduced", ctypes.c_bool, H, ctypes.c_uint)

NO_TX = 0


class XsError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.name = errno.errorcode.get(err, str(err))


def _fail() -> XsError:
    return XsError(ctypes.get_errno())


def _ok(result: bool) -> None:
    if not result:
        raise _fail()


class Handle:
    def __init__(self) -> None:
        ctypes.set_errno(0)
        h = _xs.xs_open(0)
        if not h:
            raise _fail()
        self.h = h

    def close(self) -> None:
        _xs.xs_close(self.h)

    def read(self, path: bytes, t: int = NO_TX) -> bytes:
        n = ctypes.c_uint()
        p = _xs.xs_read(self.h, t, path, ctypes.byref(n))
        if not p:
            raise _fail()
        try:
            return ctypes.string_at(p, n.value)
        finally:
            _libc.free(p)

    def write(self, path: bytes, value: bytes, t: int = NO_TX) -> None:
        _ok(_xs.xs_write(self.h, t, path, value, len(value)))

    def mkdir(self, path: bytes, t: int = NO_TX) -> None:
        _ok(_xs.xs_mkdir(self.h, t, path))

    def rm(self, path: bytes, t: int = NO_TX) -> None:
        _ok(_xs.xs_rm(self.h, t, path))

    def directory(self, path: bytes, t: int = NO_TX) -> list[bytes]:
        n = ctypes.c_uint()
        p = _xs.xs_directory(self.h, t, path, ctypes.byref(n))
        if not p:
            raise _fail()
        try:
            vec = ctypes.cast(p, ctypes.POINTER(ctypes.c_char_p))
            return [vec[i] for i in range(n.value)]
        finally:
            _libc.free(p)

    def get_perms(self, path: bytes, t: int = NO_TX) -> list[tuple[int, int]]:
        n = ctypes.c_uint()
        p = _xs.xs_get_permissions(self.h, t, path, ctypes.byref(n))
        if not p:
            raise _fail()
        try:
            vec = ctypes.cast(p, ctypes.POINTER(Perm))
            return [(vec[i].id, vec[i].perms) for i in range(n.value)]
        finally:
            _libc.free(p)

    def set_perms(self, path: bytes, perms: list[tuple[int, int]], t: int = NO_TX) -> None:
        arr = (Perm * len(perms))(*[Perm(i, p) for i, p in perms])
        _ok(_xs.xs_set_permissions(self.h, t, path, arr, len(perms)))

    def watch(self, path: bytes, token: bytes) -> None:
        _ok(_xs.xs_watch(self.h, path, token))

    def unwatch(self, path: bytes, token: bytes) -> None:
        _ok(_xs.xs_unwatch(self.h, path, token))

    def events(self) -> list[list[str]]:
        """Every watch event received so far (call after a request on this handle:
        whatever the server sent before that reply is queued by then)."""
        got = []
        while True:
            ctypes.set_errno(0)
            p = _xs.xs_check_watch(self.h)
            if not p:
                err = ctypes.get_errno()
                if err != errno.EAGAIN:
                    raise XsError(err)
                return got
            try:
                vec = ctypes.cast(p, ctypes.POINTER(ctypes.c_char_p))
                got.append([(vec[0] or b"").decode(), (vec[1] or b"").decode()])
            finally:
                _libc.free(p)

    def sync(self) -> list[list[str]]:
        self.domain_path(0)
        return self.events()

    def start(self) -> int:
        t = _xs.xs_transaction_start(self.h)
        if not t:
            raise _fail()
        return int(t)

    def end(self, t: int, abort: bool = False) -> None:
        _ok(_xs.xs_transaction_end(self.h, t, abort))

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        _ok(_xs.xs_introduce_domain(self.h, domid, mfn, port))

    def release(self, domid: int) -> None:
        _ok(_xs.xs_release_domain(self.h, domid))

    def set_target(self, domid: int, target: int) -> None:
        _ok(_xs.xs_set_target(self.h, domid, target))

    def domain_path(self, domid: int) -> bytes:
        p = _xs.xs_get_domain_path(self.h, domid)
        if not p:
            raise _fail()
        try:
            return ctypes.string_at(p)
        finally:
            _libc.free(p)

    def introduced(self, domid: int) -> bool:
        ctypes.set_errno(0)
        got = bool(_xs.xs_is_domain_introduced(self.h, domid))
        return got


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Recorder:
    def __init__(self) -> None:
        self.out: list[list[Any]] = []

    def __call__(self, label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except XsError as exc:
            self.out.append([label, ["error", exc.name]])
            return None
        self.out.append([label, _plain(result)])
        return result


# --------------------------------------------------------------------------- the scenario

PERM_NONE, PERM_READ, PERM_WRITE, PERM_BOTH = 0, 1, 2, 3


def big_directory(rec: Recorder, a: Handle) -> None:
    # 300 names of 40 bytes: about 12 KB of names, three times one DIRECTORY reply.
    names = [b"child-%03d-" % i + b"x" * 30 for i in range(300)]
    t = a.start()
    for n in names:
        a.write(b"/big/" + n, b"v", t)
    a.end(t)
    listed = rec("big: directory (DIRECTORY_PART)", a.directory, b"/big")
    rec("big: every name, in order", lambda: listed == names)
    t = a.start()
    rec("big: directory inside a transaction", lambda: a.directory(b"/big", t) == names)
    a.write(b"/big/zz-in-tx", b"v", t)
    rec("big: the transaction's own child at the end", lambda: a.directory(b"/big", t)[-1])
    a.end(t, abort=True)
    rec("big: aborted child gone", lambda: len(a.directory(b"/big")))
    rec("big: rm", a.rm, b"/big")


def every_byte(rec: Recorder, a: Handle) -> None:
    allbytes = bytes(range(256))
    rec("bytes: write all 256", a.write, b"/bytes/all", allbytes)
    rec("bytes: read all 256", a.read, b"/bytes/all")
    rec("bytes: reversed, twice", a.write, b"/bytes/rev", allbytes[::-1] * 2)
    rec("bytes: read reversed", a.read, b"/bytes/rev")
    rec("bytes: empty", a.write, b"/bytes/empty", b"")
    rec("bytes: read empty", a.read, b"/bytes/empty")
    rec("bytes: NULs only", a.write, b"/bytes/nuls", b"\0" * 64)
    rec("bytes: read NULs", a.read, b"/bytes/nuls")
    big = bytes((i * 7) % 256 for i in range(4000))
    rec("bytes: 4000 of them", a.write, b"/bytes/big", big)
    rec("bytes: read 4000", lambda: a.read(b"/bytes/big") == big)
    rec("bytes: too big for a message", a.write, b"/bytes/huge", b"h" * 4096)
    rec("bytes: directory", a.directory, b"/bytes")


def transactions(rec: Recorder, a: Handle, b: Handle) -> None:
    a.write(b"/tx/counter", b"0")
    for attempt in range(5):
        t = a.start()
        value = int(a.read(b"/tx/counter", t))
        if attempt == 0:
            # Someone else changes what this transaction read: its commit must fail.
            rec("tx: outside write", b.write, b"/tx/counter", b"10")
        a.write(b"/tx/counter", str(value + 1).encode(), t)
        a.write(b"/tx/log/%d" % attempt, b"try", t)
        result = rec(f"tx: commit attempt {attempt}", a.end, t)
        if result is None and rec.out[-1][1] == ["error", "EAGAIN"]:
            continue
        break
    rec("tx: counter after retries", a.read, b"/tx/counter")
    rec("tx: log of the committed try only", a.directory, b"/tx/log")
    t = a.start()
    a.write(b"/tx/aborted", b"x", t)
    rec("tx: own write visible inside", a.read, b"/tx/aborted", t)
    rec("tx: not visible outside", b.read, b"/tx/aborted")
    rec("tx: abort", a.end, t, True)
    rec("tx: gone after abort", a.read, b"/tx/aborted")
    # Two transactions creating siblings conflict (both change the parent); writing
    # two existing nodes they do not; writing the same node, the second fails.
    t1, t2 = a.start(), b.start()
    a.write(b"/tx/p", b"1", t1)
    b.write(b"/tx/q", b"2", t2)
    rec("tx: new siblings first", a.end, t1)
    rec("tx: new siblings second", b.end, t2)
    b.write(b"/tx/q", b"0")
    t1, t2 = a.start(), b.start()
    a.write(b"/tx/p", b"3", t1)
    b.write(b"/tx/q", b"4", t2)
    rec("tx: existing nodes first", a.end, t1)
    rec("tx: existing nodes second", b.end, t2)
    rec("tx: both committed", lambda: (a.read(b"/tx/p"), a.read(b"/tx/q")))
    t1, t2 = a.start(), b.start()
    a.write(b"/tx/same", b"1", t1)
    b.write(b"/tx/same", b"2", t2)
    rec("tx: same node first", a.end, t1)
    rec("tx: same node second", b.end, t2)
    rec("tx: same node value", a.read, b"/tx/same")
    t = a.start()
    rec("tx: rm inside", a.rm, b"/tx/log", t)
    rec("tx: removed inside", a.directory, b"/tx/log", t)
    rec("tx: still there outside", b.directory, b"/tx/log")
    rec("tx: commit rm", a.end, t)
    rec("tx: directory after", a.directory, b"/tx")
    rec("tx: unknown transaction", a.read, b"/tx/p", 999)


def watches(rec: Recorder, w: Handle, b: Handle) -> None:
    for path in (b"/ws/a/b/c", b"/ws/a/b/d", b"/ws/a/e", b"/ws/f"):
        b.write(path, b"v")
    rec("watch: /ws/a", w.watch, b"/ws/a", b"tok-a")
    rec("watch: /ws/a/b/c", w.watch, b"/ws/a/b/c", b"tok-c")
    rec("watch: nonexistent /nx/y", w.watch, b"/nx/y", b"tok-nx")
    rec("watch: nonexistent deep /nx/y/z/w", w.watch, b"/nx/y/z/w", b"tok-deep")
    rec("watch: relative", w.watch, b"relw", b"tok-rel")
    rec("watch: initial events", w.sync)
    rec("watch: write below /ws/a", b.write, b"/ws/a/b/c", b"changed")
    rec("watch: events of the write", w.sync)
    rec("watch: rm the subtree /ws/a", b.rm, b"/ws/a")
    rec("watch: events of the removal", w.sync)
    rec("watch: rm again", b.rm, b"/ws/a")
    rec("watch: no event for a no-op rm", w.sync)
    rec("watch: create under the nonexistent node", b.write, b"/nx/y/z/w/v", b"1")
    rec("watch: events of the creation", w.sync)
    rec("watch: mkdir existing", b.mkdir, b"/nx/y")
    rec("watch: events of mkdir on an existing node", w.sync)
    rec("watch: rm /nx", b.rm, b"/nx")
    rec("watch: events of rm /nx", w.sync)
    rec("watch: relative node written", b.write, b"/local/domain/0/relw/k", b"1")
    rec("watch: events of the relative watch", w.sync)
    t = b.start()
    b.write(b"/ws/a/new", b"1", t)
    b.write(b"/nx/y", b"1", t)
    rec("watch: nothing before commit", w.sync)
    rec("watch: commit", b.end, t)
    rec("watch: events at commit", w.sync)
    rec("watch: unwatch", w.unwatch, b"/ws/a", b"tok-a")
    rec("watch: unwatch unknown", w.unwatch, b"/ws/a", b"tok-a")
    b.write(b"/ws/a/new", b"2")
    rec("watch: events after unwatch", w.sync)


def permissions(rec: Recorder, a: Handle) -> None:
    a.write(b"/perm/a", b"top")
    rec("perm: default", a.get_perms, b"/perm/a")
    rec("perm: set n0 r5 w6", a.set_perms, b"/perm/a", [(0, PERM_NONE), (5, PERM_READ), (6, PERM_WRITE)])
    rec("perm: write creates two levels", a.write, b"/perm/a/b/c", b"v")
    rec("perm: inherited by the middle", a.get_perms, b"/perm/a/b")
    rec("perm: inherited by the leaf", a.get_perms, b"/perm/a/b/c")
    rec("perm: mkdir inherits", a.mkdir, b"/perm/a/m")
    rec("perm: mkdir'd node", a.get_perms, b"/perm/a/m")
    rec("perm: owner 7, others read", a.set_perms, b"/perm/a/b", [(7, PERM_READ)])
    rec("perm: new child of b", a.write, b"/perm/a/b/new", b"v")
    rec("perm: inherited from the nearest parent", a.get_perms, b"/perm/a/b/new")
    rec("perm: existing child kept its own", a.get_perms, b"/perm/a/b/c")
    rec("perm: rewriting a node keeps its perms", a.write, b"/perm/a/b/c", b"w")
    rec("perm: still", a.get_perms, b"/perm/a/b/c")
    rec("perm: both", a.set_perms, b"/perm/a/m", [(0, PERM_BOTH), (9, PERM_NONE)])
    rec("perm: read back both", a.get_perms, b"/perm/a/m")
    rec("perm: of a missing node", a.get_perms, b"/perm/none")
    rec("perm: set on a missing node", a.set_perms, b"/perm/none", [(0, PERM_NONE)])
    rec("perm: of /", a.get_perms, b"/")


def special(rec: Recorder, w: Handle, b: Handle) -> None:
    rec("special: watch @introduceDomain", w.watch, b"@introduceDomain", b"intro")
    rec("special: watch @releaseDomain", w.watch, b"@releaseDomain", b"release")
    rec("special: initial events", w.sync)
    rec("special: domain 5 introduced?", b.introduced, 5)
    rec("special: introduce 5", b.introduce, 5, 0x1234, 7)
    rec("special: introduced now", b.introduced, 5)
    rec("special: events of introduce", w.sync)
    rec("special: introduce 5 again", b.introduce, 5, 0x1234, 7)
    rec("special: events of the repeat", w.sync)
    rec("special: introduce 6", b.introduce, 6, 0x99, 8)
    rec("special: domain path of 5", b.domain_path, 5)
    b.write(b"/local/domain/5/data", b"x")
    b.set_perms(b"/local/domain/5", [(5, PERM_NONE)])
    rec("special: set target 6 -> 5", b.set_target, 6, 5)
    rec("special: set target of an unknown domain", b.set_target, 8, 5)
    rec("special: release 6", b.release, 6)
    rec("special: events of release 6", w.sync)
    rec("special: release 5", b.release, 5)
    rec("special: 5 gone", b.introduced, 5)
    rec("special: its home went with it", b.read, b"/local/domain/5/data")
    rec("special: events of release 5", w.sync)
    rec("special: release unknown", b.release, 5)
    rec("special: release 0", b.release, 0)
    rec("special: events of failed releases", w.sync)
    rec("special: relative write", b.write, b"rel/x", b"1")
    rec("special: relative read", b.read, b"/local/domain/0/rel/x")
    rec("special: relative directory", b.directory, b"rel")


def main() -> None:
    rec = Recorder()
    a, b, w = Handle(), Handle(), Handle()
    try:
        big_directory(rec, a)
        every_byte(rec, a)
        transactions(rec, a, b)
        watches(rec, w, b)
        permissions(rec, a)
        special(rec, w, b)
    finally:
        for h in (a, b, w):
            h.close()
    json.dump(rec.out, sys.stdout, indent=0)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
