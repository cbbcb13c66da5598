"""KvpView: the tree, the errno of every refusal, and reported outside changes."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from kvpfs.errors import FsError
from kvpfs.fs.view import Node, NodeKind, View
from kvpfs.kvp.limits import LimitsMode
from kvpfs.kvp.location import create_pools
from kvpfs.kvp.records import RECORD_SIZE, encode_record
from kvpfs.kvp.view import POOL_NAMES, KvpView

from .helpers import raw_record


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hyperv"
    create_pools(str(directory))
    (directory / ".kvp_pool_1").write_bytes(
        raw_record(b"a/b", b"slash", b"", b"junk")
        + raw_record(b"plain", b"first")
        + raw_record(b"plain", b"second")
        + raw_record(b"\xff", b"\xfe")
        + raw_record(b"", b"empty key")
        + b"tail"
    )
    (directory / ".kvp_pool_3").write_bytes(encode_record(b"VirtualMachineName", b"vm1"))
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_root_lists_the_five_pools(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    listing = await backend.listdir(())
    assert [name for name, _ in listing] == [
        "external", "guest", "auto", "auto_external", "auto_internal",
    ]
    assert all(node.kind is NodeKind.DIR for _, node in listing)
    assert {name: node.writable for name, node in listing} == {
        "external": False, "guest": True, "auto": False, "auto_external": False,
        "auto_internal": True,
    }
    root = await backend.lookup(())
    assert root.kind is NodeKind.DIR and not root.writable
    guest = await backend.lookup(("guest",))
    assert guest.mtime_ns == (pool_dir / ".kvp_pool_1").stat().st_mtime_ns


async def test_pool_lists_each_key_once_by_escaped_name(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    listing = await backend.listdir(("guest",))
    mtime = (pool_dir / ".kvp_pool_1").stat().st_mtime_ns
    assert listing == [
        ("a%2fb", Node(NodeKind.FILE, size=5, writable=True, mtime_ns=mtime)),
        ("plain", Node(NodeKind.FILE, size=5, writable=True, mtime_ns=mtime)),
        ("%ff", Node(NodeKind.FILE, size=1, writable=True, mtime_ns=mtime)),
        ("%00", Node(NodeKind.FILE, size=9, writable=True, mtime_ns=mtime)),
    ]
    assert await backend.read(("guest", "plain")) == b"first"
    assert await backend.read(("guest", "%ff")) == b"\xfe"
    assert await backend.read(("guest", "%00")) == b"empty key"
    assert await backend.read(("auto_external", "VirtualMachineName")) == b"vm1"
    node = await backend.lookup(("auto_external", "VirtualMachineName"))
    assert node == Node(
        NodeKind.FILE, size=3, writable=False,
        mtime_ns=(pool_dir / ".kvp_pool_3").stat().st_mtime_ns,
    )
    assert await backend.listdir(("auto",)) == []


async def test_write_read_remove_rename(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    await backend.check_new_name(("guest", "new key"))
    await backend.write(("guest", "new key"), b"value")
    assert await backend.read(("guest", "new key")) == b"value"
    await backend.write(("guest", "new key"), b"v2")
    await backend.rename(("guest", "new key"), ("guest", "renamed"), replace=False)
    with pytest.raises(FsError):
        await backend.lookup(("guest", "new key"))
    assert await backend.read(("guest", "renamed")) == b"v2"
    await backend.rename(("guest", "renamed"), ("guest", "plain"), replace=True)
    assert await backend.read(("guest", "plain")) == b"v2"
    await backend.remove(("guest", "plain"))
    assert await backend.read(("guest", "plain")) == b"second"  # the daemon's view: next duplicate
    await backend.remove(("guest", "plain"))
    await backend.write(("auto_internal", "x"), b"1" * 2047)
    names = [name for name, _ in await backend.listdir(("guest",))]
    assert names == ["a%2fb", "%ff", "%00"]


async def test_all_writable_plays_the_host(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir), all_writable=True)
    for pool_name in POOL_NAMES:
        await backend.write((pool_name, "k"), b"v")
        assert (await backend.lookup((pool_name, "k"))).writable
    assert await backend.read(("external", "k")) == b"v"


Op = Callable[[View], Awaitable[object]]


def _write(*path: str, value: bytes = b"v") -> Op:
    return lambda b: b.write(path, value)


def _check(*path: str) -> Op:
    return lambda b: b.check_new_name(path)


def _remove(*path: str) -> Op:
    return lambda b: b.remove(path)


def _rename(old: Sequence[str], new: Sequence[str], replace: bool = True) -> Op:
    return lambda b: b.rename(tuple(old), tuple(new), replace=replace)


def _lookup(*path: str) -> Op:
    return lambda b: b.lookup(path)


def _read(*path: str) -> Op:
    return lambda b: b.read(path)


_REFUSALS: list[tuple[str, dict[str, object], Op, int]] = [
    # Writability.
    ("external is read-only", {}, _write("external", "k"), errno.EROFS),
    ("auto is read-only", {}, _write("auto", "k"), errno.EROFS),
    ("auto_external is read-only", {}, _write("auto_external", "VirtualMachineName"), errno.EROFS),
    ("create in external", {}, _check("external", "k"), errno.EROFS),
    ("remove in auto_external", {}, _remove("auto_external", "VirtualMachineName"), errno.EROFS),
    ("rename in external", {}, _rename(["external", "a"], ["external", "b"]), errno.EROFS),
    ("ro mount write", {"read_only": True}, _write("guest", "k"), errno.EROFS),
    ("ro mount create", {"read_only": True}, _check("guest", "k"), errno.EROFS),
    ("ro mount remove", {"read_only": True}, _remove("guest", "plain"), errno.EROFS),
    ("ro mount rename", {"read_only": True}, _rename(["guest", "plain"], ["guest", "x"]),
     errno.EROFS),
    ("ro all_writable", {"read_only": True, "all_writable": True}, _write("external", "k"),
     errno.EROFS),
    ("ro mkdir", {"read_only": True}, lambda b: b.mkdir(("guest", "d")), errno.EROFS),
    ("mkdir", {}, lambda b: b.mkdir(("guest", "d")), errno.EPERM),
    ("mkdir pool", {}, lambda b: b.mkdir(("newpool",)), errno.EPERM),
    ("rmdir pool", {}, lambda b: b.rmdir(("guest",)), errno.EPERM),
    # Shape of the path.
    ("file at the top", {}, _write("newpool"), errno.EPERM),
    ("create at the top", {}, _check("newpool"), errno.EPERM),
    ("write a pool dir", {}, _write("guest"), errno.EISDIR),
    ("write the kvp dir", {}, _write(), errno.EISDIR),
    ("below a key", {}, _write("guest", "plain", "x"), errno.ENOTDIR),
    ("unknown pool", {}, _write("nopool", "k"), errno.ENOENT),
    ("rename a pool", {}, _rename(["guest"], ["other"]), errno.EPERM),
    ("across pools", {"all_writable": True}, _rename(["guest", "plain"], ["external", "plain"]),
     errno.EXDEV),
    ("across pools, ro source", {}, _rename(["auto_external", "VirtualMachineName"],
                                            ["guest", "x"]), errno.EXDEV),
    # Names.
    ("non-canonical create", {}, _write("guest", "%61"), errno.EINVAL),
    ("uppercase escape", {}, _check("guest", "a%2Fb"), errno.EINVAL),
    ("scratch-looking name", {}, _check("guest", "x.tmp"), errno.EINVAL),
    ("raw invalid UTF-8 name", {}, _check("guest", os.fsdecode(b"\xff")), errno.EINVAL),
    ("rename to non-canonical", {}, _rename(["guest", "plain"], ["guest", "%2Fx"]), errno.EINVAL),
    ("non-canonical lookup", {}, _lookup("guest", "%70lain"), errno.ENOENT),
    ("non-canonical read", {}, _read("guest", "%70lain"), errno.ENOENT),
    ("non-canonical remove", {}, _remove("guest", "%70lain"), errno.ENOENT),
    ("missing remove", {}, _remove("guest", "nope"), errno.ENOENT),
    ("missing rename", {}, _rename(["guest", "nope"], ["guest", "x"]), errno.ENOENT),
    ("no-replace rename", {}, _rename(["guest", "plain"], ["guest", "a%2fb"], False), errno.EEXIST),
    ("lookup below a key", {}, _lookup("guest", "plain", "x"), errno.ENOTDIR),
    ("read a pool dir", {}, _read("guest"), errno.EISDIR),
    ("listdir a key", {}, lambda b: b.listdir(("guest", "plain")), errno.ENOTDIR),
    # Format limits (every pool).
    ("key 512 bytes", {}, _write("guest", "k" * 512), errno.ENAMETOOLONG),
    ("key 512 bytes, format", {"limits": "format"}, _check("guest", "k" * 512),
     errno.ENAMETOOLONG),
    ("key 512 bytes, auto_internal", {}, _check("auto_internal", "k" * 512), errno.ENAMETOOLONG),
    ("lookup key 512 bytes", {}, _lookup("guest", "k" * 512), errno.ENAMETOOLONG),
    ("value 2048 bytes", {"limits": "format"}, _write("guest", "k", value=b"v" * 2048),
     errno.EFBIG),
    ("value 2048, auto_internal", {}, _write("auto_internal", "k", value=b"v" * 2048),
     errno.EFBIG),
    ("value with NUL", {"limits": "format"}, _write("guest", "k", value=b"a\0b"), errno.EINVAL),
    # What the host can read of the guest pool.
    ("key 255 units", {}, _write("guest", "k" * 255), errno.ENAMETOOLONG),
    ("key 128 emoji = 256 units", {}, _check("guest", "\U0001f600" * 128), errno.ENAMETOOLONG),
    ("key not UTF-8", {}, _write("guest", "%ff"), errno.EILSEQ),
    ("create key not UTF-8", {}, _check("guest", "ok%c3"), errno.EILSEQ),
    ("rename to key not UTF-8", {}, _rename(["guest", "plain"], ["guest", "%ff%fe"]),
     errno.EILSEQ),
    ("value 1023 units", {}, _write("guest", "k", value=b"v" * 1023), errno.EFBIG),
    ("value 512 emoji = 1024 units", {}, _write("guest", "k", value="\U0001f600".encode() * 512),
     errno.EFBIG),
    ("value not UTF-8", {}, _write("guest", "k", value=b"\xc3("), errno.EILSEQ),
]


@pytest.mark.parametrize(
    ("options", "op", "code"),
    [pytest.param(options, op, code, id=label) for label, options, op, code in _REFUSALS],
)
async def test_refusals(pool_dir: Path, options: dict[str, object], op: Op, code: int) -> None:
    before = snapshot(pool_dir)
    backend = KvpView(str(pool_dir), **options)  # type: ignore[arg-type]
    with pytest.raises(FsError) as info:
        await op(backend)
    assert info.value.errno == code, info.value
    assert snapshot(pool_dir) == before


@pytest.mark.parametrize(
    ("limits", "pool_name", "name", "value"),
    [
        ("host", "guest", "k" * 254, b"v" * 1022),
        ("host", "guest", "\U0001f600" * 127, "é".encode() * 1022),
        ("host", "auto_internal", "k" * 511, b"\xff" * 2047),
        ("host", "auto_internal", "%ff", b"x"),
        ("format", "guest", "k" * 511, b"v" * 2047),
        ("format", "guest", "%ff", b"\xfe"),
    ],
)
async def test_limits_accept_up_to_the_edge(
    pool_dir: Path, limits: LimitsMode, pool_name: str, name: str, value: bytes
) -> None:
    backend = KvpView(str(pool_dir), limits=limits)
    await backend.check_new_name((pool_name, name))
    await backend.write((pool_name, name), value)
    assert await backend.read((pool_name, name)) == value


async def test_existing_bad_keys_stay_removable(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    await backend.remove(("guest", "%ff"))
    assert "%ff" not in [name for name, _ in await backend.listdir(("guest",))]


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []

    def value_changed(self, backend: View, path: tuple[str, ...]) -> None:
        self.events.append(("value", path, ()))

    def entries_changed(
        self, backend: View, directory: tuple[str, ...], names: Sequence[str]
    ) -> None:
        self.events.append(("entries", directory, tuple(sorted(names))))


async def _wait_for(sink: Sink, count: int) -> None:
    with trio.fail_after(3):
        while len(sink.events) < count:
            await trio.sleep(0.01)


async def test_run_reports_changes_made_by_others(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir), poll_interval=0.02)
    sink = Sink()
    path = pool_dir / ".kvp_pool_3"
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, sink)
        await backend.write(("guest", "mine"), b"1")  # own changes are not reported
        await backend.remove(("guest", "mine"))
        with path.open("r+b") as f:  # the daemon: truncate and rewrite in place
            f.truncate(0)
            f.write(encode_record(b"VirtualMachineName", b"vm2") + encode_record(b"Host/x", b"h"))
        await _wait_for(sink, 2)
        assert sorted(sink.events) == [
            ("entries", ("auto_external",), ("Host%2fx",)),
            ("value", ("auto_external", "VirtualMachineName"), ()),
        ]
        sink.events.clear()
        path.write_bytes(b"")
        await _wait_for(sink, 1)
        assert sink.events == [
            ("entries", ("auto_external",), ("Host%2fx", "VirtualMachineName")),
        ]
        sink.events.clear()
        path.unlink()  # a missing pool file is an empty pool: nothing to report
        (pool_dir / ".kvp_pool_0").write_bytes(encode_record(b"NdDriverVersion", b"142.0"))
        await _wait_for(sink, 1)
        assert sink.events == [("entries", ("external",), ("NdDriverVersion",))]
        nursery.cancel_scope.cancel()
    await backend.aclose()


async def test_lookups_report_what_they_notice(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir), poll_interval=3600)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, sink)
        with (pool_dir / ".kvp_pool_1").open("r+b") as f:
            f.truncate(4 * RECORD_SIZE)  # drops the empty key and the tail
        assert await backend.listdir(("guest",)) == (await backend.listdir(("guest",)))
        assert sink.events == [("entries", ("guest",), ("%00",))]
        nursery.cancel_scope.cancel()


async def test_listing_is_reused_while_the_pool_is_unchanged(pool_dir: Path) -> None:
    backend = KvpView(str(pool_dir))
    await trio.sleep(0.03)
    first = await backend.listdir(("guest",))
    second = await backend.listdir(("guest",))
    assert first == second and first is not second
