"""kvpfs as a system tool: independent mounts, errors, unmount, logs, fstab, systemd.

Every test drives the real command (and mount, umount, findmnt where they apply).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpfs.fs.mount import force_unmount, mounted_at
from tests.conftest import fuse_usable
from tests.mount.cli_support import KVPFS, kvpfs_pid, run, wait_gone
from tests.mount.kvp_fixtures import Pools, rec

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("private_runtime_dir")]

README = Path(__file__).resolve().parents[2] / "README.md"


def socket_of(stderr: str) -> str:
    found = re.search(r"XENSTORED_PATH=(\S+)", stderr)
    assert found, stderr
    return found.group(1)


def xs_env(socket: str) -> dict[str, str]:
    return {**os.environ, "XENSTORED_PATH": socket}


def unmount(path: Path) -> None:
    pid = kvpfs_pid(path)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    force_unmount(str(path))


@pytest.fixture
def mnt2(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "mnt2"
    path.mkdir()
    try:
        yield path
    finally:
        unmount(path)
        assert not mounted_at(str(path))


def test_two_mounts_are_independent(mnt: Path, mnt2: Path, pools: Pools, tmp_path: Path) -> None:
    first = run(str(mnt), "--kvp-dir", str(pools.directory))
    assert first.returncode == 0, first.stderr
    sock_a = socket_of(first.stderr)
    # A script that exported the first mount's socket must not make the second
    # mount take it for a Xen host.
    second = run(str(mnt2), "--kvp-dir", str(pools.directory), env=xs_env(sock_a))
    assert second.returncode == 0, second.stderr
    sock_b = socket_of(second.stderr)
    assert sock_a != sock_b
    assert (mnt2 / ".kvpfs/xenstored-path").read_text() == f"{sock_b}\n"
    assert (mnt2 / ".kvpfs/xenstore").read_text() == "embedded\n"
    (mnt / "xenstore/tool/only-a").write_text("a\n")
    assert not (mnt2 / "xenstore/tool/only-a").exists()
    # The first mount ends; the second keeps serving, its attach included. On this
    # machine /etc/xen/scripts/block may exist: a simulated attach never runs it.
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 10
    while os.path.exists(sock_a) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(sock_a)
    assert (mnt2 / "xenstore/local/domain/1/name").read_text() == "guest1\n"
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    (mnt2 / "vbd/attach").write_text(f"1 {image},raw,xvdb,rw\n")
    assert (mnt2 / "vbd/xbdback1i51728/hotplug-status").read_text() == "connected\n"
    os.rmdir(mnt2 / "vbd/xbdback1i51728")


def test_sharing_an_embedded_xenstored_on_purpose(mnt: Path, mnt2: Path, pools: Pools) -> None:
    first = run(str(mnt), "--kvp-dir", str(pools.directory))
    sock = socket_of(first.stderr)
    second = run(str(mnt2), "--kvp-dir", str(pools.directory), "--xenstore", sock)
    assert second.returncode == 0, second.stderr
    assert f"sharing another kvpfs's embedded xenstored: XENSTORED_PATH={sock}" in second.stderr
    (mnt / "xenstore/tool/shared").write_text("yes\n")
    assert (mnt2 / "xenstore/tool/shared").read_text() == "yes\n"
    assert (mnt2 / ".kvpfs/xenstore").read_text() == "shared\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log", "/nonexistent/dir/log"], "cannot open log file /nonexistent/dir/log: No such file or directory"),
        (["--xenstore", "/nonexistent.sock"], "no xenstored at /nonexistent.sock: No such file or directory"),
        (["-o", "timeout=-5"], "mount option 'timeout=-5' needs a number of seconds more than 0"),
        (["-o", "timeout=0"], "mount option 'timeout=0' needs a number of seconds more than 0"),
        (["-o", "attr_timeout=nan"], "mount option 'attr_timeout=nan' needs a number of seconds 0 or more"),
        (["-o", "vbd_timeout=-1"], "mount option 'vbd_timeout=-1' needs a number of seconds more than 0"),
        (["-o", "uid=-1"], "mount option 'uid=-1' needs an id from 0 to 4294967294"),
        (["--bogus"], "unrecognized arguments: --bogus (see kvpfs --help)"),
        (["nowhere", "{mnt}"], "unknown source 'nowhere' (one of: auto, embedded, host, kvpfs, real)"),
    ],
)
def test_one_line_errors_and_nothing_mounted(mnt: Path, pools: Pools, argv: list[str], message: str) -> None:
    args = [a.format(mnt=mnt) for a in argv]
    if "{mnt}" not in argv:
        args = [str(mnt), "--kvp-dir", str(pools.directory), *args]
    result = run(*args)
    assert result.returncode != 0
    assert result.stderr == f"kvpfs: {message}\n"
    assert not mounted_at(str(mnt))


def test_allow_other_without_user_allow_other(tmp_path: Path) -> None:
    """A non-root user asking for allow_other gets one line, from a fuse.conf without it."""
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*nobody, sys.executable, "-c", "import kvpfs.cli"], capture_output=True, check=False).returncode:
        pytest.skip("this checkout's Python is not reachable by an unprivileged user")
    mnt = Path(os.path.realpath("/tmp")) / f"kvpfs-other-{os.getpid()}"
    mnt.mkdir(mode=0o777, exist_ok=True)
    os.chmod(mnt, 0o777)
    empty = tmp_path / "fuse.conf"
    empty.write_text("# nothing allowed\n")
    state = Path(os.path.realpath("/tmp")) / f"kvpfs-other-state-{os.getpid()}"
    script = (
        f"mount --bind {empty} /etc/fuse.conf && "
        f"exec {' '.join(nobody)} {' '.join(KVPFS)} {mnt} -o allow_other --xenstore off"
    )
    env = {**os.environ, "HOME": str(state), "XDG_STATE_HOME": str(state)}
    try:
        result = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True, text=True, timeout=30, check=False, env=env,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
        os.rmdir(mnt)
    assert result.returncode == 1
    assert result.stderr == (
        "kvpfs: allow_other and allow_root need 'user_allow_other' in /etc/fuse.conf "
        "when not mounting as root\n"
    )


def test_unmount_refuses_what_kvpfs_did_not_mount(tmp_path: Path) -> None:
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        (other / "busy").write_text("x")
        with open(other / "busy") as busy:
            result = run("unmount", str(other))
            assert busy.read() == "x"
        assert result.returncode == 1
        assert result.stderr == f"kvpfs: {other} is not a kvpfs mount (tmpfs); nothing unmounted\n"
        assert mounted_at(str(other))
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_dead_mount_is_reported_as_such(mnt: Path, pools: Pools) -> None:
    assert run(str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", "off").returncode == 0
    pid = kvpfs_pid(mnt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    result = run(str(mnt), "--kvp-dir", str(pools.directory))
    assert result.returncode == 1
    assert result.stderr == (
        f"kvpfs: mountpoint {mnt} is a dead mount (not connected): run `kvpfs unmount {mnt}`\n"
    )
    cleaned = run("unmount", str(mnt))
    assert cleaned.returncode == 0, cleaned.stderr
    assert not mounted_at(str(mnt))


def test_shutdown_is_bounded_when_the_store_hangs(mnt: Path, pools: Pools, tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    server = subprocess.Popen(
        [*KVPFS, "xenstored", "--socket", sock, "--initial", "domains"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == f"XENSTORED_PATH={sock}\n"
        result = run(str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", sock)
        assert result.returncode == 0, result.stderr
        pid = kvpfs_pid(mnt)
        assert pid is not None
        assert (mnt / "xenstore/local/domain/1/name").read_text() == "guest1\n"
        server.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, timeout=20)
        assert time.monotonic() - started < 15
        assert not mounted_at(str(mnt))
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=10)


def test_verbose_log_in_background_and_foreground(mnt: Path, pools: Pools, tmp_path: Path) -> None:
    log = tmp_path / "kvpfs.log"
    result = run(str(mnt), "-v", "--log", str(log), "--kvp-dir", str(pools.directory), "--xenstore", "off")
    assert result.returncode == 0, result.stderr
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 10
    while "mounted on" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"INFO kvpfs: mounted on {mnt}" in log.read_text()
    assert "KVP pools: " in log.read_text()
    # --log works in the foreground too, beside stderr.
    fg_log = tmp_path / "fg.log"
    proc = subprocess.Popen(
        [*KVPFS, str(mnt), "-f", "-v", "--log", str(fg_log), "--kvp-dir", str(pools.directory), "--xenstore", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not mounted_at(str(mnt)) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert f"mounted on {mnt}" in err
    assert f"mounted on {mnt}" in fg_log.read_text()


def test_version_names_what_it_runs_on() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvpfs", "--version"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(
        r"kvpfs \S+, pyfuse3 \S+, trio \S+, libfuse 3\.\S+\n", result.stdout
    ), result.stdout


def test_fstab_line_through_mount_and_umount(pools: Pools, tmp_path: Path) -> None:
    """mount(8) runs mount.fuse3, which runs ``kvpfs SOURCE MOUNTPOINT -o OPTIONS``
    from the default PATH: in a private mount namespace, kvpfs is put there."""
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 (Debian: fuse3) is not installed")
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kvpfs").symlink_to(Path(sys.executable).parent / "kvpfs")
    pools.set_bytes("guest", rec(b"K", b"v"))
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"embedded {mnt} fuse.kvpfs kvp_dir={pools.directory},xenstore=off,nosuid,nodev,"
        "_netdev,nofail,x-systemd.automount,noatime 0 0\n"
    )
    script = (
        f"mount --bind {bindir} /usr/local/bin && mount -T {fstab} {mnt} && "
        f"cat {mnt}/kvp/guest/K && "
        f"findmnt -n -t fuse.kvpfs -o SOURCE,FSTYPE,OPTIONS {mnt} && "
        f"umount {mnt} && findmnt {mnt} || echo unmounted"
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    value, shown, last = done.stdout.splitlines()
    assert value == "v"
    source, fstype, options = shown.split()
    assert (source, fstype) == ("kvpfs:kvp-dir", "fuse.kvpfs")
    assert {"nosuid", "nodev", "noatime"} <= set(options.split(","))
    assert last == "unmounted"


def _readme_block(title: str) -> str:
    text = README.read_text()
    found = re.search(rf"{re.escape(title)}\n\n```ini\n(.*?)```", text, re.S)
    assert found, f"README has no ini block after {title!r}"
    return found.group(1)


def test_systemd_unit_from_the_readme_runs(mnt: Path, tmp_path: Path) -> None:
    """The README's kvpfs@.service, run as systemd would where there is no systemd."""
    unit = _readme_block("`/etc/systemd/system/kvpfs@.service`:")
    lines = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    kvpfs = " ".join(KVPFS)

    def command(key: str) -> list[str]:
        return lines[key].replace("/usr/local/bin/kvpfs", kvpfs).replace("%f", str(mnt)).split()

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    service = subprocess.Popen(command("ExecStart"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not mounted_at(str(mnt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mounted_at(str(mnt))
        assert (mnt / ".kvpfs/source").read_text().startswith("kvpfs:kvp-embedded")
        stop = subprocess.run(command("ExecStop"), env=env, capture_output=True, text=True, timeout=30, check=False)
        assert stop.returncode == 0, stop.stderr
        assert service.wait(timeout=15) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert not mounted_at(str(mnt))


def test_a_mount_the_kernel_refuses_is_one_line(pools: Pools, tmp_path: Path) -> None:
    """In a user namespace without a mount namespace, libfuse cannot mount."""
    mnt = tmp_path / "refused"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-U", "-r", *KVPFS, str(mnt), "--kvp-dir", str(pools.directory), "--xenstore", "off"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if done.returncode == 0:  # pragma: no cover - a kernel that allows it
        force_unmount(str(mnt))
        pytest.skip("this kernel lets an unprivileged user namespace mount FUSE")
    ours = [line for line in done.stderr.splitlines() if line.startswith("kvpfs: ")]
    assert ours == [f"kvpfs: mounting on {mnt} failed: fuse_session_mount failed"], done.stderr
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr
    assert not mounted_at(str(mnt))
