"""The pytest plugin as a downstream project uses it: each fixture in a temporary
project run by pytest in a subprocess, passing, failing and skipping, and nothing
left behind (no mount, no kvpfs process, no socket directory) in every case."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import pytest

import kvpfs
from tests.plugin.support import Downstream, can_mount

pytest_plugins = ["pytester"]

needs_mount = pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))
needs_xenstore_utils = pytest.mark.skipif(
    shutil.which("xenstore-ls") is None, reason="xenstore-utils is not installed"
)


@pytest.fixture
def downstream(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Downstream:
    return Downstream(pytester, monkeypatch)


def test_installed_as_a_pytest11_plugin_with_type_information() -> None:
    [entry] = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "kvpfs"]
    assert entry.value == "kvpfs.pytest_plugin"
    assert (Path(kvpfs.__file__).parent / "py.typed").is_file()
    files = importlib.metadata.files("kvpfs") or []
    assert any(f.name == "LICENSE" for f in files)


def test_the_plugin_loads_and_its_markers_are_known(downstream: Downstream) -> None:
    downstream.pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvpfs(raw=True)
        @pytest.mark.kvpfs_xenstored(domains=[2])
        def test_nothing():
            pass
        """
    )
    result = downstream.run("--strict-markers", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["plugins:*kvpfs-*"])
    markers = downstream.run("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.kvpfs(**options):*", "@pytest.mark.kvpfs_xenstored(*"])


XENSTORED_TESTS = r'''
import errno
import os
import subprocess
from pathlib import Path

import pytest
import trio

from kvpfs.xenstore.client import XenStoreError

DUMP = (
    '/local = ""   (n0)\n'
    '/local/domain = ""   (n0)\n'
    '/local/domain/0 = ""   (n0)\n'
    '/local/domain/0/name = "Domain-0"   (n0)\n'
    '/local/domain/5 = ""   (n0,r5)\n'
    '/local/domain/5/name = "web"   (n0,r5)\n'
    '/local/domain/5/data = "tab\\there\\001"   (n5)\n'
)


def xs(server, *argv):
    return subprocess.run(
        argv, env={**os.environ, **server.env}, capture_output=True, text=True, check=True
    ).stdout


def test_defaults_as_a_kvpfs_mount_starts(kvpfs_xenstored):
    assert kvpfs_xenstored.env == {"XENSTORED_PATH": kvpfs_xenstored.path}
    assert "XENSTORED_PATH" not in os.environ
    assert xs(kvpfs_xenstored, "xenstore-read", "/local/domain/1/name") == "guest1\n"
    assert kvpfs_xenstored.dump() == xs(kvpfs_xenstored, "xenstore-ls", "-f", "-p")
    assert os.path.exists(kvpfs_xenstored.domain_socket(1))
    with pytest.raises(LookupError, match="domain 2 has no socket"):
        kvpfs_xenstored.domain_socket(2)


def test_load_text_or_file_and_dump_back(kvpfs_xenstored, tmp_path):
    kvpfs_xenstored.load(DUMP)
    assert kvpfs_xenstored.dump() == DUMP
    assert xs(kvpfs_xenstored, "xenstore-ls", "-f", "-p") == DUMP
    kvpfs_xenstored.write("/extra", "x")
    (tmp_path / "dom0.txt").write_text(DUMP)
    kvpfs_xenstored.load(tmp_path / "dom0.txt")
    assert kvpfs_xenstored.dump() == DUMP
    kvpfs_xenstored.write("/extra", "x")
    kvpfs_xenstored.load(str(tmp_path / "dom0.txt"))
    assert kvpfs_xenstored.dump("/local/domain/5") == DUMP.split("\n", 5)[5]


def test_setenv_exports_for_this_test(kvpfs_xenstored, monkeypatch):
    kvpfs_xenstored.setenv(monkeypatch)
    assert os.environ["XENSTORED_PATH"] == kvpfs_xenstored.path
    assert subprocess.run(["xenstore-read", "/local/domain/1/name"], capture_output=True,
                          text=True, check=True).stdout == "guest1\n"


def test_and_only_there():
    assert "XENSTORED_PATH" not in os.environ


@pytest.mark.kvpfs_xenstored(domains={3: "web", 4: "db"})
def test_guest_domains_from_the_marker(kvpfs_xenstored):
    assert sorted(kvpfs_xenstored.domain_sockets) == [3, 4]
    assert kvpfs_xenstored.read("/local/domain/4/name") == b"db"
    guest3 = {"XENSTORED_PATH": kvpfs_xenstored.domain_socket(3)}
    run = lambda *argv: subprocess.run(argv, env={**os.environ, **guest3}, capture_output=True, text=True)
    assert run("xenstore-read", "/local/domain/3/name").stdout == "web\n"
    assert run("xenstore-read", "/local/domain/4/name").returncode != 0
    assert run("xenstore-write", "/local/domain/3/device/suspend/event-channel", "7").returncode == 0


@pytest.mark.trio
async def test_trio_client_introduce_and_release(kvpfs_xenstored):
    async with kvpfs_xenstored.client() as client:
        assert await client.read("/local/domain/1/name") == b"guest1"
        async with client.watch("@introduceDomain") as introduced, \
                   client.watch("@releaseDomain") as released:
            await introduced.__anext__()
            await released.__anext__()
            kvpfs_xenstored.introduce(7, "new")
            with trio.fail_after(5):
                assert (await introduced.__anext__()).path == "@introduceDomain"
            assert await client.read("/local/domain/7/name") == b"new"
            kvpfs_xenstored.release(7)
            with trio.fail_after(5):
                assert (await released.__anext__()).path == "@releaseDomain"
            assert not await client.exists("/local/domain/7")
    async with kvpfs_xenstored.client(domid=1) as guest:
        with pytest.raises(XenStoreError) as refused:
            await guest.write("/local/domain/0/name", b"x")
        assert refused.value.errno == errno.EACCES


def test_factory_seeds_and_takes_the_guests_of_a_dump(kvpfs_xenstored_factory, kvpfs_xenstored):
    seeded = kvpfs_xenstored_factory(load=DUMP)
    assert seeded.path != kvpfs_xenstored.path
    assert seeded.domains == {5: "web"}
    assert seeded.read("/local/domain/5/data") == b"tab\there\x01"
    guest = {"XENSTORED_PATH": seeded.domain_socket(5)}
    assert subprocess.run(["xenstore-read", "data"], env={**os.environ, **guest},
                          capture_output=True, text=True, check=True).stdout == "tab\\there\\001\n"
    bare = kvpfs_xenstored_factory(domains=())
    assert bare.dump() == '/tool = ""   (n0)\n/tool/xenstored = ""   (n0)\n'


def test_session_one(kvpfs_xenstored_session):
    kvpfs_xenstored_session.write("/session/mark", "1")


def test_session_two(kvpfs_xenstored_session, kvpfs_xenstored):
    assert kvpfs_xenstored_session.read("/session/mark") == b"1"
    assert not kvpfs_xenstored.exists("/session/mark")
'''


@needs_xenstore_utils
def test_xenstored_fixtures(downstream: Downstream) -> None:
    downstream.pytester.makepyfile(test_xs=XENSTORED_TESTS)
    result = downstream.run("-v")
    result.assert_outcomes(passed=9)


MOUNT_TESTS = r'''
import os
import subprocess

import pytest
import trio

from kvpfs.testing import KvpfsMount


def test_a_mount_with_xenstore_kvp_and_a_disk(kvpfs_mount):
    assert isinstance(kvpfs_mount, KvpfsMount)
    root = kvpfs_mount.root
    assert sorted(os.listdir(root)) == [".kvpfs", "kvp", "vbd", "xenstore"]
    (root / "kvp/guest/Key").write_text("value\n")
    assert (root / "kvp/guest/Key").read_text() == "value\n"
    assert (kvpfs_mount.kvp_dir / ".kvp_pool_1").stat().st_size == 2560
    xs = kvpfs_mount.xenstored
    assert xs.path == (root / ".kvpfs/xenstored-path").read_text().strip()
    assert (root / "xenstore/local/domain/1/name").read_text() == "guest1\n"
    assert subprocess.run(["xenstore-read", "/local/domain/1/name"], env={**os.environ, **xs.env},
                          capture_output=True, text=True, check=True).stdout == "guest1\n"
    disk = kvpfs_mount.attach()
    assert disk.name == "xbdback1i51728"
    assert (disk / "backend-state-name").read_text() == "Connected\n"
    assert xs.read("/local/domain/0/backend/vbd/1/51728/state") == b"4"
    os.rmdir(disk)
    assert not xs.exists("/local/domain/0/backend/vbd/1/51728")
    with pytest.raises(LookupError):
        xs.domain_socket(1)


@pytest.mark.kvpfs(raw=True, attr_timeout=0, kvp_writable="all")
def test_options_from_the_marker(kvpfs_mount):
    root = kvpfs_mount.root
    (root / "kvp/external/Host").write_bytes(b"raw")
    assert (root / "kvp/external/Host").read_bytes() == b"raw"
    options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(root)],
                             capture_output=True, text=True, check=True).stdout
    assert "rw" in options


@pytest.mark.trio
async def test_trio_uses_the_mount_from_its_own_thread(kvpfs_mount):
    # The filesystem is served by another process: no deadlock here.
    assert "guest" in os.listdir(kvpfs_mount.root / "kvp")
    (kvpfs_mount.root / "kvp/guest/T").write_text("t\n")
    async with kvpfs_mount.xenstored.client() as client:
        await client.write("/local/domain/1/data-x", b"y")
        assert (kvpfs_mount.root / "xenstore/local/domain/1/data-x").read_text() == "y\n"


def test_factory_mounts_more(kvpfs_mount_factory, kvpfs_mount):
    kvp_only = kvpfs_mount_factory(xenstore="off")
    assert kvp_only.xenstored is None
    assert sorted(os.listdir(kvp_only.root)) == [".kvpfs", "kvp"]
    shared_pools = kvpfs_mount_factory(kvp_dir=kvpfs_mount.kvp_dir)
    (kvpfs_mount.root / "kvp/guest/Both").write_text("1\n")
    assert (shared_pools.root / "kvp/guest/Both").read_text() == "1\n"
    assert shared_pools.xenstored.path != kvpfs_mount.xenstored.path


def test_a_bad_option_fails_loudly(kvpfs_mount_factory):
    with pytest.raises(RuntimeError, match="kvpfs: malformed value in mount option 'attr_timeout=soon'"):
        kvpfs_mount_factory(attr_timeout="soon")
'''


@needs_mount
@needs_xenstore_utils
@pytest.mark.mount
def test_mount_fixtures(downstream: Downstream) -> None:
    downstream.pytester.makepyfile(test_mount=MOUNT_TESTS)
    result = downstream.run("-v")
    result.assert_outcomes(passed=5)


FAILING_TESTS = r'''
import os
import signal

import pytest


def test_fails(kvpfs_mount, kvpfs_xenstored):
    (kvpfs_mount.root / "kvp/guest/K").write_text("v\n")
    assert False, "downstream failure"


def test_fails_holding_a_file_open_in_the_mount(kvpfs_mount):
    held = open(kvpfs_mount.root / "kvp/guest/Held", "w")
    held.write("x")
    os.chdir(kvpfs_mount.root / "kvp")
    assert False, "downstream failure with an open file"


@pytest.mark.trio
async def test_trio_fails(kvpfs_mount, kvpfs_xenstored):
    async with kvpfs_xenstored.client() as client:
        await client.write("/x", b"1")
        raise RuntimeError("downstream trio failure")


def test_the_mount_process_dies(kvpfs_mount):
    os.kill(kvpfs_mount.pid, signal.SIGKILL)
    kvpfs_mount.process.wait()
'''


@needs_mount
@pytest.mark.mount
def test_failing_tests_leave_nothing_behind(downstream: Downstream) -> None:
    downstream.pytester.makepyfile(test_failing=FAILING_TESTS)
    # The failing test chdir()s into the mount: later ones must not care.
    downstream.pytester.makeconftest(
        """
        import os
        import pytest

        @pytest.fixture(autouse=True)
        def _cwd():
            cwd = os.getcwd()
            yield
            os.chdir(cwd)
        """
    )
    result = downstream.run("-v")
    result.assert_outcomes(passed=1, failed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_the_mount_process_dies*",
            "*the kvpfs process of * exited with status -9*",
            "*KvpfsMountWarning: *: the kvpfs process did not end after `kvpfs unmount`"
            " (a file or directory still open in the mount?): sent SIGTERM",
            "*KvpfsMountWarning: *: the mount was still listed: detached it lazily",
        ]
    )


SKIPPING_TESTS = r'''
def test_mount(kvpfs_mount):
    raise AssertionError("never reached")


def test_xenstored_needs_no_mount(kvpfs_xenstored):
    assert kvpfs_xenstored.read("/local/domain/1/name") == b"guest1"
'''


@needs_mount
@pytest.mark.mount
def test_skips_without_the_right_to_mount(downstream: Downstream) -> None:
    """A user namespace without a mount namespace of its own: /dev/fuse opens, the
    mount is refused."""
    downstream.pytester.makepyfile(test_skipping=SKIPPING_TESTS)
    result = downstream.run(prefix=("unshare", "-U", "-r"))
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED*no right to mount here (fusermount3: mount failed: Operation not permitted)"]
    )


@needs_mount
@pytest.mark.mount
def test_skips_without_dev_fuse(downstream: Downstream) -> None:
    """A container started without --device /dev/fuse."""
    downstream.pytester.makepyfile(test_skipping=SKIPPING_TESTS)
    devices = " && ".join(
        f"mknod -m 666 /dev/{name} c 1 {minor}"
        for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9))
    )
    script = f'mount -t tmpfs tmpfs /dev && {devices} && exec "$@"'
    result = downstream.run(
        prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
    )
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*cannot open /dev/fuse: No such file or directory*"])
    assert os.path.exists("/dev/fuse")
