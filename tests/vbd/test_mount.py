"""``vbd/`` through the kernel, driven by real programs (``ls``, ``cat``, ``echo``,
``rmdir``, ``readlink``), against the embedded server and the real cxenstored 4.17,
with the simulated xbdback and blkfront attached to either.

The attach happens inside write(2), so shell redirections report its errno; one
test checks this with bash's builtin echo.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from kvpfs.compose import EMBEDDED_GUESTS
from kvpfs.fs.mount import Session, force_unmount, fuse_options, mounted_at, serve
from kvpfs.fs.operations import FsOptions, Operations
from kvpfs.peers.xendrivers import SimulatedXen
from kvpfs.vbd.toolstack import Toolstack
from kvpfs.vbd.view import VbdView
from kvpfs.xenstore.client import XenStoreClient
from kvpfs.xenstore.view import XenStoreView
from tests.conftest import fuse_usable
from tests.mounting import in_thread, sh, stop_sessions
from tests.xenstore.conftest import ServerPath

from .conftest import GUEST, axs_ls, ls_order, parse_ls

pytestmark = [pytest.mark.mount, pytest.mark.realxen]

Mounter = Callable[..., Awaitable[tuple[str, VbdView]]]


@pytest.fixture
async def vbd_mount(
    nursery: trio.Nursery, xs: ServerPath
) -> AsyncIterator[Mounter]:
    """``await vbd_mount(**VbdView options)`` → (mountpoint, backend).

    The mountpoint is a fresh 0755 directory under /tmp (so that another user can
    reach it with ``allow_other``); the xenstore view is mounted beside ``vbd`` so
    that the symlinks resolve.  Always unmounted.
    """
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    sessions: list[Session] = []
    dirs: list[str] = []

    async def factory(*, allow_other: bool = False, **options: object) -> tuple[str, VbdView]:
        mnt = tempfile.mkdtemp(prefix="kvpfs-vbd-")
        os.chmod(mnt, 0o755)
        dirs.append(mnt)
        if options.pop("simulate", True):
            await start_drivers(nursery, xs, play_hotplug=not options.get("hotplug", False))
        vbd = VbdView(xs, **options)  # type: ignore[arg-type]
        ops = Operations([XenStoreView(xs), vbd], FsOptions())
        session: Session = await nursery.start(
            serve, ops, mnt, fuse_options(allow_other=allow_other)
        )
        sessions.append(session)
        return mnt, vbd

    try:
        yield factory
    finally:
        await stop_sessions(sessions)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)



async def start_drivers(nursery: trio.Nursery, xs: ServerPath, *, play_hotplug: bool) -> None:
    """The simulated xbdback and blkfront, as the composition root starts them
    beside an embedded xenstored (with guest 1 laid out)."""
    drivers = SimulatedXen(xs, play_hotplug=play_hotplug, create_domains=EMBEDDED_GUESTS)
    await nursery.start(drivers.run)

async def cat(path: str) -> str:
    return (await sh(["cat", path])).stdout.decode()


async def wait_file(path: str, value: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                if await in_thread(lambda: Path(path).read_text()) == value + "\n":
                    return
            except FileNotFoundError:
                pass
            await trio.sleep(0.01)


async def attach_errno(mnt: str, request: str) -> int:
    """Write ``request`` to vbd/attach as a program does; the errno of the write()."""

    def attempt() -> int:
        fd = os.open(f"{mnt}/vbd/attach", os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, request.encode() + b"\n")
        except OSError as exc:
            return exc.errno or 0
        finally:
            os.close(fd)
        return 0

    return await in_thread(attempt, timeout=30)


# --------------------------------------------------------------------------- basics


async def test_attach_summary_detach(xs: ServerPath, vbd_mount: Mounter, image: Path) -> None:
    mnt, _ = await vbd_mount()
    before = await axs_ls(xs)
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\n"
    spec = f"1 format=raw, vdev=xvdb, access=rw, target={image}"
    await sh(f'/bin/echo "{spec}" > {mnt}/vbd/attach')
    dev = f"{mnt}/vbd/xbdback1i51728"
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\nxbdback1i51728\n"
    await wait_file(f"{dev}/frontend-state", "4")
    listing = (await sh(["ls", dev])).stdout.decode().split()
    assert listing == sorted(
        [
            "domain", "devid", "vdev", "backend-state", "backend-state-name",
            "frontend-state", "frontend-state-name", "target", "mode", "size",
            "hotplug-status", "backend", "frontend",
        ]
    )
    got = {name: await cat(f"{dev}/{name}") for name in listing if name not in ("backend", "frontend")}
    assert got == {
        "domain": "1\n",
        "devid": "51728\n",
        "vdev": "xvdb\n",
        "backend-state": "4\n",
        "backend-state-name": "Connected\n",
        "frontend-state": "4\n",
        "frontend-state-name": "Connected\n",
        "target": f"{image}\n",
        "mode": "w\n",
        "size": f"{4 << 20}\n",
        "hotplug-status": "connected\n",
    }
    links = (await sh(["readlink", f"{dev}/backend", f"{dev}/frontend"])).stdout.decode()
    assert links == (
        "../../xenstore/local/domain/0/backend/vbd/1/51728\n"
        "../../xenstore/local/domain/1/device/vbd/51728\n"
    )
    # The links lead into the xenstore view.
    assert await cat(f"{dev}/backend/params") == f"{image}\n"
    assert await cat(f"{dev}/frontend/virtual-device") == "51728\n"
    # Never a syscall on the mount from this (the filesystem's own) thread.
    modes = {
        p: stat.filemode((await in_thread(os.stat, f"{mnt}/vbd/{p}")).st_mode)
        for p in ("attach", "xbdback1i51728", "xbdback1i51728/size")
    }
    assert modes == {"attach": "--w-------", "xbdback1i51728": "dr-xr-xr-x", "xbdback1i51728/size": "-r--r--r--"}

    await sh(["rmdir", dev])
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\n"
    assert not await in_thread(os.path.exists, dev)
    assert await axs_ls(xs) == before


async def test_domain_by_name_and_hda1(xs: ServerPath, vbd_mount: Mounter, image: Path) -> None:
    mnt, _ = await vbd_mount()
    await sh(f"/bin/echo 'guest1 {image},,hda1' > {mnt}/vbd/attach")
    dev = f"{mnt}/vbd/xbdback1i769"
    assert await cat(f"{dev}/vdev") == "hda1\n"
    await wait_file(f"{dev}/backend-state-name", "Connected")
    await sh(["rmdir", dev])


async def test_changes_by_others_are_seen_at_once(
    xs: ServerPath, vbd_mount: Mounter, image: Path
) -> None:
    """A device attached and detached by another toolstack appears and goes in
    ``ls`` without waiting for the kernel's cache timeout."""
    mnt, _ = await vbd_mount()
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\n"
    with pytest.raises(FileNotFoundError):
        await in_thread(os.stat, f"{mnt}/vbd/xbdback1i51728")  # a negative entry now
    async with XenStoreClient(xs) as client:
        ts = Toolstack(client)
        await ts.attach(GUEST, f"{image},,xvdb")
        await trio.sleep(0.3)
        assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\nxbdback1i51728\n"
        await wait_file(f"{mnt}/vbd/xbdback1i51728/frontend-state-name", "Connected")
        await ts.detach(GUEST, 51728)
        await trio.sleep(0.3)
        assert (await sh(["ls", f"{mnt}/vbd"])).stdout == b"attach\n"


# --------------------------------------------------------------------------- the reference tree

#: Reference §12.7: ``xl block-attach 1 phy:/dev/loop0,xvda,w`` on cxenstored 4.17.
REFERENCE = r"""
/local/domain/1/device = "" (n0,r1)
/local/domain/1/device/vbd = "" (n0)
/local/domain/1/device/vbd/51712 = "" (n1,r0)
/local/domain/1/device/vbd/51712/backend = "/local/domain/0/backend/vbd/1/51712" (n1,r0)
/local/domain/1/device/vbd/51712/backend-id = "0" (n1,r0)
/local/domain/1/device/vbd/51712/state = "4" (n1,r0)
/local/domain/1/device/vbd/51712/virtual-device = "51712" (n1,r0)
/local/domain/1/device/vbd/51712/device-type = "disk" (n1,r0)
/local/domain/1/device/vbd/51712/trusted = "1" (n1,r0)
/local/domain/1/device/vbd/51712/protocol = "x86_64-abi" (n1,r0)
/local/domain/1/device/vbd/51712/ring-ref = "8" (n1,r0)
/local/domain/1/device/vbd/51712/event-channel = "12" (n1,r0)
/local/domain/1/device/vbd/51712/feature-persistent = "1" (n1,r0)
/local/domain/1/device/suspend = "" (n0,r1)
/local/domain/1/device/suspend/event-channel = "" (n1)
/local/domain/1/name = "guest1" (n0,r1)
/local/domain/0/backend/vbd = "" (n0)
/local/domain/0/backend/vbd/1 = "" (n0)
/local/domain/0/backend/vbd/1/51712 = "" (n0,r1)
/local/domain/0/backend/vbd/1/51712/frontend = "/local/domain/1/device/vbd/51712" (n0,r1)
/local/domain/0/backend/vbd/1/51712/params = "/dev/loop0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/script = "/etc/xen/scripts/block" (n0,r1)
/local/domain/0/backend/vbd/1/51712/frontend-id = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/online = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/removable = "0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/bootable = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/state = "4" (n0,r1)
/local/domain/0/backend/vbd/1/51712/dev = "xvda" (n0,r1)
/local/domain/0/backend/vbd/1/51712/type = "phy" (n0,r1)
/local/domain/0/backend/vbd/1/51712/mode = "w" (n0,r1)
/local/domain/0/backend/vbd/1/51712/device-type = "disk" (n0,r1)
/local/domain/0/backend/vbd/1/51712/discard-enable = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/specification = "xen" (n0,r1)
/local/domain/0/backend/vbd/1/51712/feature-max-indirect-segments = "256" (n0,r1)
/local/domain/0/backend/vbd/1/51712/multi-queue-max-queues = "4" (n0,r1)
/local/domain/0/backend/vbd/1/51712/max-ring-page-order = "4" (n0,r1)
/local/domain/0/backend/vbd/1/51712/physical-device = "7:0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/physical-device-path = "/dev/loop0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/hotplug-status = "connected" (n0,r1)
/local/domain/0/backend/vbd/1/51712/feature-flush-cache = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/discard-granularity = "512" (n0,r1)
/local/domain/0/backend/vbd/1/51712/discard-alignment = "0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/discard-secure = "0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/feature-discard = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/feature-barrier = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/feature-persistent = "1" (n0,r1)
/local/domain/0/backend/vbd/1/51712/sectors = "2097152" (n0,r1)
/local/domain/0/backend/vbd/1/51712/info = "0" (n0,r1)
/local/domain/0/backend/vbd/1/51712/sector-size = "512" (n0,r1)
/local/domain/0/backend/vbd/1/51712/physical-sector-size = "512" (n0,r1)
/libxl/1 = "" (n0)
/libxl/1/device = "" (n0)
/libxl/1/device/vbd = "" (n0)
/libxl/1/device/vbd/51712 = "" (n0)
/libxl/1/device/vbd/51712/frontend = "/local/domain/1/device/vbd/51712" (n0)
/libxl/1/device/vbd/51712/backend = "/local/domain/0/backend/vbd/1/51712" (n0)
/libxl/1/device/vbd/51712/params = "/dev/loop0" (n0)
/libxl/1/device/vbd/51712/script = "/etc/xen/scripts/block" (n0)
/libxl/1/device/vbd/51712/frontend-id = "1" (n0)
/libxl/1/device/vbd/51712/online = "1" (n0)
/libxl/1/device/vbd/51712/removable = "0" (n0)
/libxl/1/device/vbd/51712/bootable = "1" (n0)
/libxl/1/device/vbd/51712/state = "1" (n0)
/libxl/1/device/vbd/51712/dev = "xvda" (n0)
/libxl/1/device/vbd/51712/type = "phy" (n0)
/libxl/1/device/vbd/51712/mode = "w" (n0)
/libxl/1/device/vbd/51712/device-type = "disk" (n0)
/libxl/1/device/vbd/51712/discard-enable = "1" (n0)
/libxl/1/device/vbd/51712/specification = "xen" (n0)
"""

BE = "/local/domain/0/backend/vbd/1/51712"
FE = "/local/domain/1/device/vbd/51712"
#: Written by Linux's blkback and block script only; NetBSD's xbdback (which the
#: simulated backend plays) and its script write none of them.
LINUX_ONLY = {
    f"{BE}/{k}"
    for k in (
        "feature-max-indirect-segments",
        "multi-queue-max-queues",
        "max-ring-page-order",
        "physical-device-path",
        "discard-granularity",
        "discard-alignment",
        "discard-secure",
        "feature-discard",
        "feature-barrier",
        "feature-persistent",
        "physical-sector-size",
    )
}
#: The reference says these are example values.
VARIABLE = {f"{FE}/ring-ref", f"{FE}/event-channel", f"{BE}/sectors"}
#: Differences the reference itself documents or that follow from NetBSD's backend.
EXPECTED = {
    # §12.7: an implicitly created node copies its parent's permissions, so under a
    # device node of (n0,r1) libxl's vbd node is (n0,r1); the recording shows (n0).
    "/local/domain/1/device/vbd": ("", "n0,r1"),
    # NetBSD's block script writes the decimal dev_t (stat -f %r): 7:0 is 1792.
    f"{BE}/physical-device": (str(os.makedev(7, 0)), "n0,r1"),
}


def reference() -> dict[str, tuple[str, str]]:
    return parse_ls(REFERENCE.strip())


@pytest.mark.skipif(
    not (os.path.exists("/dev/loop0") and stat.S_ISBLK(os.stat("/dev/loop0").st_mode)),
    reason="needs the block device /dev/loop0 (the reference's target)",
)
async def test_attach_writes_the_libxl_tree(xs: ServerPath, vbd_mount: Mounter) -> None:
    """``1 phy:/dev/loop0,xvda,w`` gives reference §12.7's tree, node for node,
    value for value, permission for permission, in libxl's creation order; the
    detach leaves the tree exactly as before."""
    mnt, _ = await vbd_mount()
    before = await axs_ls(xs)
    await sh(f'/bin/echo "1 phy:/dev/loop0,xvda,w" > {mnt}/vbd/attach')
    await wait_file(f"{mnt}/vbd/xbdback1i51712/frontend-state", "4")
    dump = await axs_ls(xs)
    got = parse_ls(dump)
    ref = reference()
    for path, (value, perms) in ref.items():
        if path in LINUX_ONLY:
            assert path not in got, path
            continue
        assert path in got, path
        if path in VARIABLE:
            assert got[path][1] == perms, path
            continue
        assert got[path] == EXPECTED.get(path, (value, perms)), path
    # Nothing else in the device's subtrees.
    roots = ("/local/domain/1/device/vbd", "/local/domain/0/backend/vbd", "/libxl/1/device")
    extra = {p for p in got if p.startswith(roots) and p not in ref}
    assert extra == set()
    # Creation order: the nodes of each device directory in libxl's order; in the
    # backend's directory libxl's keys come first, then what the driver wrote, in
    # NetBSD's order (its connect transaction writes sectors first, Linux's
    # feature-flush-cache).
    for root in (FE, BE, "/libxl/1/device/vbd/51712"):
        ours = [p for p in ls_order(dump) if p.startswith(root + "/")]
        theirs = [p for p in ls_order(REFERENCE.strip()) if p.startswith(root + "/") and p in got]
        if root == BE:
            libxl_keys = theirs[: theirs.index(f"{BE}/specification") + 1]
            assert ours[: len(libxl_keys)] == libxl_keys
            driver = [p.rsplit("/", 1)[1] for p in ours[len(libxl_keys) :]]
            assert driver == [
                "physical-device", "hotplug-status", "sectors", "info", "sector-size",
                "feature-flush-cache",
            ]
        else:
            assert ours == theirs, root
    await sh(["rmdir", f"{mnt}/vbd/xbdback1i51712"])
    assert await axs_ls(xs) == before


# --------------------------------------------------------------------------- refusals


async def test_bad_requests(
    xs: ServerPath, vbd_mount: Mounter, images: Callable[..., Path], tmp_path: Path
) -> None:
    mnt, _ = await vbd_mount()
    busy = images("busy.img")
    await sh(f"/bin/echo '1 {busy},,xvdb' > {mnt}/vbd/attach")
    await wait_file(f"{mnt}/vbd/xbdback1i51728/frontend-state", "4")
    before = await axs_ls(xs)
    cases = [
        ("", errno.EINVAL),
        ("1", errno.EINVAL),
        (f"one {busy},,xvdc", errno.ENOENT),
        (f"1 {busy},,xvdc,rx", errno.EINVAL),
        (f"1 {busy},,floppy", errno.EINVAL),
        (f"1 {busy},qcow2,xvdc", errno.EINVAL),
        (f"1 {busy},,xvdc,no-such-key=1", errno.EINVAL),
        (f"7 {busy},,xvdc", errno.ENOENT),
        (f"1 {images('other.img')},,xvdb", errno.EEXIST),
        (f"1 {tmp_path}/missing.img,,xvdc", errno.EIO),
        (f"1 {busy},,xvdd", errno.EBUSY),
    ]
    for request, expected in cases:
        assert await attach_errno(mnt, request) == expected, request
        assert await axs_ls(xs) == before, request
    # The same errors reach a shell through /bin/echo.
    out = await sh(f"/bin/echo '7 {busy},,xvdc' > {mnt}/vbd/attach", check=False)
    assert out.returncode == 1 and b"No such file or directory" in out.stderr
    out = await sh(f"/bin/echo '1 {busy},,xvdd' > {mnt}/vbd/attach", check=False)
    assert out.returncode == 1 and b"Device or resource busy" in out.stderr
    # and through bash's builtin echo, which reports write errors but not close errors
    out = await sh(f"echo '1 {busy},,xvdc,rx' > {mnt}/vbd/attach", check=False)
    assert out.returncode == 1 and b"write error: Invalid argument" in out.stderr

    # A failed attach keeps its directory, with the reasons, until removed.
    failed = f"{mnt}/vbd/xbdback1i51760"  # xvdd
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout.split() == [
        b"attach", b"xbdback1i51728", b"xbdback1i51744", b"xbdback1i51760",
    ]
    assert await cat(f"{failed}/error") == (
        f"EBUSY: hotplug: device in use: {busy} is already attached read-write as xbdback1i51728\n"
    )
    assert await cat(f"{failed}/hotplug-status") == "busy\n"
    assert await cat(f"{failed}/backend-state-name") == "InitWait\n"
    assert "does not exist" in await cat(f"{mnt}/vbd/xbdback1i51744/hotplug-error")
    assert not await in_thread(os.path.lexists, f"{failed}/backend")
    await sh(["rmdir", failed, f"{mnt}/vbd/xbdback1i51744"])
    assert (await sh(["ls", f"{mnt}/vbd"])).stdout.split() == [b"attach", b"xbdback1i51728"]
    assert await axs_ls(xs) == before
    await sh(["rmdir", f"{mnt}/vbd/xbdback1i51728"])


async def test_backend_that_never_answers(xs: ServerPath, vbd_mount: Mounter, image: Path) -> None:
    mnt, _ = await vbd_mount(simulate=False, hotplug=False, attach_timeout=0.5)
    before = await axs_ls(xs)
    with trio.fail_after(10):
        out = await sh(f"/bin/echo '1 {image},,xvdb' > {mnt}/vbd/attach", check=False)
    assert out.returncode == 1 and b"Connection timed out" in out.stderr
    assert await axs_ls(xs) == before
    assert "no backend driver answered" in await cat(f"{mnt}/vbd/xbdback1i51728/error")


async def test_refused_operations(xs: ServerPath, vbd_mount: Mounter, image: Path) -> None:
    mnt, _ = await vbd_mount(allow_other=True)
    await sh(f"/bin/echo '1 {image},,xvdb' > {mnt}/vbd/attach")
    dev = f"{mnt}/vbd/xbdback1i51728"
    await wait_file(f"{dev}/frontend-state", "4")
    before = await axs_ls(xs)
    nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups"
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing")

    async def fails(cmd: str, message: bytes) -> None:
        out = await sh(cmd, check=False)
        assert out.returncode != 0 and message in out.stderr, (cmd, out)

    # Another user may look but not attach or detach.
    assert (await sh(f"{nobody} cat {dev}/vdev")).stdout == b"xvdb\n"
    await fails(f"{nobody} sh -c \"/bin/echo '1 {image},,xvdc' > {mnt}/vbd/attach\"", b"Permission denied")
    await fails(f"{nobody} rmdir {dev}", b"Permission denied")
    await fails(f"{nobody} cat {mnt}/vbd/attach", b"Permission denied")
    # Even root may not change the summary or the directory's structure.
    await fails(f"/bin/echo 3 > {dev}/domain", b"Permission denied")
    await fails(f"mkdir {mnt}/vbd/xbdback1i51744", b"Operation not permitted")
    await fails(f"touch {mnt}/vbd/new", b"Operation not permitted")
    await fails(f"rm {mnt}/vbd/attach", b"Operation not permitted")
    await fails(f"rm {dev}/vdev", b"Operation not permitted")
    await fails(f"rmdir {mnt}/vbd/attach", b"Not a directory")
    await fails(f"rmdir {mnt}/vbd/xbdback1i51744", b"No such file or directory")
    await fails(f"rmdir {mnt}/vbd/notadevice", b"No such file or directory")
    # Root may read it (DAC override): a write-only device, nothing to read.
    assert (await sh(["cat", f"{mnt}/vbd/attach"])).stdout == b""
    assert await axs_ls(xs) == before
    await sh(["rmdir", dev])


async def test_hotplug_script_through_the_mount(
    xs_embedded: ServerPath, nursery: trio.Nursery, image: Path, tmp_path: Path
) -> None:
    """With ``hotplug`` the view's toolstack runs ``<script_dir>/block`` and the
    simulated backend leaves the script's part to it."""
    from .test_toolstack import STAND_IN

    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    log = tmp_path / "hotplug.log"
    (scripts / "block").write_text(STAND_IN.format(log=log))
    (scripts / "block").chmod(0o755)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    await start_drivers(nursery, xs_embedded, play_hotplug=False)
    vbd = VbdView(xs_embedded, hotplug=True, script_dir=str(scripts))
    ops = Operations([vbd], FsOptions())
    session: Session = await nursery.start(serve, ops, str(mnt), fuse_options())
    try:
        await sh(f"/bin/echo '1 {image},,xvdb' > {mnt}/vbd/attach")
        await wait_file(f"{mnt}/vbd/xbdback1i51728/frontend-state", "4")
        assert await cat(f"{mnt}/vbd/xbdback1i51728/hotplug-status") == "connected\n"
        await sh(["rmdir", f"{mnt}/vbd/xbdback1i51728"])
        assert log.read_text().count("XENBUS_PATH=backend/vbd/1/51728") == 2
    finally:
        with trio.fail_after(15):
            await session.stop()
        if mounted_at(str(mnt)):
            await trio.to_thread.run_sync(force_unmount, str(mnt))
