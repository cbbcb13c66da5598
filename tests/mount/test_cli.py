"""The kvpfs command as a user runs it: a subprocess, a real mount, signals, errors."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvpfs.fs.mount import mounted_at
from tests.mount.cli_support import KVPFS, kvpfs_pid, run, wait_gone
from tests.mount.kvp_fixtures import Pools, rec

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("private_runtime_dir")]


def test_returns_when_ready_and_serves_in_background(mnt: Path, pools: Pools) -> None:
    pools.set_bytes("guest", rec(b"K", b"v"))
    result = run(str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", "off")
    assert result.returncode == 0, result.stderr
    # Said before the command returns: where the data comes from.
    assert result.stdout == ""
    assert result.stderr == f"kvpfs: KVP pools: {pools.directory} (the directory given)\n"
    assert sorted(os.listdir(mnt)) == [".kvpfs", "kvp"]
    assert (mnt / ".kvpfs/xenstore").read_bytes() == b"off\n"
    # `kvpfs MNT && ls MNT` must work: the mount is ready when the command returns.
    assert sorted(os.listdir(mnt / "kvp")) == [
        "auto", "auto_external", "auto_internal", "external", "guest",
    ]
    assert (mnt / "kvp/guest/K").read_bytes() == b"v\n"
    pid = kvpfs_pid(mnt)
    assert pid is not None
    assert subprocess.run(["fusermount3", "-u", str(mnt)], check=False).returncode == 0
    assert wait_gone(pid)
    assert not mounted_at(str(mnt))


def test_sigterm_commits_open_file_and_unmounts(mnt: Path, pools: Pools) -> None:
    assert run(str(mnt), "--kvp-dir", str(pools.directory)).returncode == 0
    pid = kvpfs_pid(mnt)
    assert pid is not None
    # A writer that has written but not yet closed when the mount is told to stop.
    fd = os.open(mnt / "kvp/guest/Pending", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"unsaved\n")
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
    finally:
        # ENOTCONN: the mount is gone under the open file, as documented.
        with contextlib.suppress(OSError):
            os.close(fd)
    assert not mounted_at(str(mnt))
    assert pools.bytes("guest") == rec(b"Pending", b"unsaved")


def test_sigint_in_foreground(mnt: Path, pools: Pools) -> None:
    proc = subprocess.Popen(
        [*KVPFS, str(mnt), "-f", "--kvp-dir", str(pools.directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not mounted_at(str(mnt)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mounted_at(str(mnt))
        (mnt / "kvp/guest/F").write_bytes(b"fg\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not mounted_at(str(mnt))
    assert pools.bytes("guest") == rec(b"F", b"fg")


def test_options(mnt: Path, pools: Pools) -> None:
    pools.set_bytes("external", rec(b"H", b"h"))
    assert run(str(mnt), "--kvp-dir", str(pools.directory), "-o", "raw,kvp_writable=all").returncode == 0
    assert (mnt / "kvp/external/H").read_bytes() == b"h"
    (mnt / "kvp/external/H").write_bytes(b"host-set")
    assert pools.bytes("external") == rec(b"H", b"host-set")
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_ro_option(mnt: Path, pools: Pools) -> None:
    assert run(str(mnt), "--kvp-dir", str(pools.directory), "-o", "ro").returncode == 0
    with pytest.raises(OSError) as info:
        (mnt / "kvp/guest/x").write_bytes(b"1")
    assert info.value.errno == 30  # EROFS
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/missing"], "mountpoint {tmp}/missing does not exist"),
        (["{tmp}/file"], "mountpoint {tmp}/file is not a directory"),
        (["{mnt}", "--kvp-dir", "{tmp}/nodir"], "{tmp}/nodir"),
        (["{mnt}", "-o", "bogus"], "unknown or malformed mount option 'bogus'"),
        (["{mnt}", "-o", "uid=abc"], "malformed value in mount option 'uid=abc'"),
    ],
)
def test_one_line_errors(mnt: Path, tmp_path: Path, argv: list[str], message: str) -> None:
    (tmp_path / "file").write_text("x")
    fmt = {"tmp": str(tmp_path), "mnt": str(mnt)}
    result = run(*(a.format(**fmt) for a in argv))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvpfs: ") and message.format(**fmt) in lines[0]
    assert not mounted_at(str(mnt))


def test_busy_mountpoint(mnt: Path, pools: Pools) -> None:
    assert run(str(mnt), "--kvp-dir", str(pools.directory)).returncode == 0
    result = run(str(mnt), "--kvp-dir", str(pools.directory))
    assert result.returncode == 1
    assert result.stderr == f"kvpfs: mountpoint {mnt} is busy: something is already mounted there\n"
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_no_dev_fuse(mnt: Path, pools: Pools) -> None:
    script = (
        "mount -t tmpfs tmpfs /dev && "
        f"exec {' '.join(KVPFS)} {mnt} --kvp-dir {pools.directory}"
    )
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=20, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("kvpfs: cannot open /dev/fuse: No such file or directory")
    assert len(result.stderr.strip().splitlines()) == 1


def test_embedded_default_creates_pools(mnt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    result = subprocess.run([*KVPFS, str(mnt)], env=env, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    state = tmp_path / "state/kvpfs/kvp"
    assert sorted(p.name for p in state.iterdir()) == [f".kvp_pool_{n}" for n in range(5)]
    (mnt / "kvp/guest/Hello").write_bytes(b"world\n")
    assert (state / ".kvp_pool_1").read_bytes() == rec(b"Hello", b"world")
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_embedded_xen_beside_kvp(mnt: Path, pools: Pools, tmp_path: Path) -> None:
    """No xenstored here: the mount serves its own, announces it, and vbd/ attaches."""
    result = run(str(mnt), "--kvp-dir", str(pools.directory))
    assert result.returncode == 0, result.stderr
    # A socket of this mount's own, named after the process that serves it.
    socket_path = tmp_path / f"runtime/kvpfs/xenstored-{kvpfs_pid(mnt)}.sock"
    assert result.stderr == (
        f"kvpfs: KVP pools: {pools.directory} (the directory given)\n"
        f"kvpfs: embedded xenstored: XENSTORED_PATH={socket_path}\n"
    )
    assert sorted(os.listdir(mnt)) == [".kvpfs", "kvp", "vbd", "xenstore"]
    # A script finds the socket inside the mount, too.
    assert (mnt / ".kvpfs/xenstored-path").read_bytes() == f"{socket_path}\n".encode()
    env = {**os.environ, "XENSTORED_PATH": str(socket_path)}
    # The xenstore-* tools work beside the mount, on the same store.
    subprocess.run(["xenstore-write", "/tool/kvpfs-test", "from-the-tool"], env=env, check=True)
    assert (mnt / "xenstore/tool/kvpfs-test").read_bytes() == b"from-the-tool\n"
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    (mnt / "vbd/attach").write_bytes(f"1 format=raw, vdev=xvdb, access=rw, target={image}\n".encode())
    device = mnt / "vbd/xbdback1i51728"
    # The write returns once the backend waits for the guest (as xl block-attach);
    # the size is there once the simulated guest has connected.
    deadline = time.monotonic() + 10
    while (device / "frontend-state").read_bytes() != b"4\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (device / "size").read_bytes() == b"1048576\n"
    assert (device / "vdev").read_bytes() == b"xvdb\n"
    listing = subprocess.run(
        ["xenstore-read", "/local/domain/0/backend/vbd/1/51728/params"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert listing.stdout == f"{image}\n"
    os.rmdir(device)
    assert os.listdir(mnt / "vbd") == ["attach"]
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    pid_gone_deadline = time.monotonic() + 10
    while socket_path.exists() and time.monotonic() < pid_gone_deadline:
        time.sleep(0.05)
    assert not socket_path.exists()


def test_unmount_command_even_while_busy(mnt: Path, pools: Pools) -> None:
    assert run(str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", "off").returncode == 0
    pid = kvpfs_pid(mnt)
    assert pid is not None
    fd = os.open(mnt / "kvp/guest", os.O_RDONLY)  # keeps the mount busy
    try:
        result = run("unmount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not mounted_at(str(mnt))
    finally:
        os.close(fd)
    assert wait_gone(pid)
    result = run("unmount", str(mnt))
    assert result.returncode == 1
    assert result.stderr == f"kvpfs: {mnt} is not mounted\n"
