"""Attach and detach over XenStore (no FUSE): the toolstack with the simulated
xbdback and blkfront, against the embedded server and the real cxenstored 4.17."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from kvpfs.peers.xendrivers import SimulatedXen
from kvpfs.vbd.hotplug import HotplugRunner
from kvpfs.vbd.layout import DevicePaths, device_paths
from kvpfs.vbd.toolstack import Toolstack, VbdError
from kvpfs.xenstore.client import XenStoreClient, XenStoreError
from tests.xenstore.conftest import ServerPath

from .conftest import GUEST, axs_ls, xs_ls

pytestmark = pytest.mark.realxen


@pytest.fixture
async def client(xs: ServerPath) -> AsyncIterator[XenStoreClient]:
    async with XenStoreClient(xs) as c:
        yield c


async def start_host(nursery: trio.Nursery, path: str, **options: object) -> tuple[SimulatedXen, trio.CancelScope]:
    scope = trio.CancelScope()
    host = SimulatedXen(path, **options)  # type: ignore[arg-type]

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await host.run(task_status=task_status)

    await nursery.start(run)
    return host, scope


@pytest.fixture
async def host(xs: ServerPath, nursery: trio.Nursery) -> SimulatedXen:
    h, _ = await start_host(nursery, xs)
    return h


async def read(client: XenStoreClient, path: str) -> bytes | None:
    try:
        return await client.read(path)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


async def wait_states(
    client: XenStoreClient, paths: DevicePaths, backend: bytes, frontend: bytes
) -> None:
    with trio.fail_after(10):
        while True:
            be = await read(client, f"{paths.backend}/state")
            fe = await read(client, f"{paths.frontend}/state")
            if (be, fe) == (backend, frontend):
                return
            await trio.sleep(0.005)


async def attach_error(ts: Toolstack, domid: int, spec: str) -> VbdError:
    with pytest.raises(VbdError) as info:
        await ts.attach(domid, spec)
    return info.value


# --------------------------------------------------------------------------- trees


def test_embedded_domains_tree_is_domain_creation(
    xs_embedded: ServerPath, xs_real: ServerPath
) -> None:
    """The embedded ``initial="domains"`` tree equals cxenstored after the domain
    creation steps of reference §12.2 (plus dom0's name and id)."""
    assert xs_ls(xs_embedded) == xs_ls(xs_real)


async def test_attach_detach_round_trip(
    xs: ServerPath, client: XenStoreClient, host: SimulatedXen, image: Path
) -> None:
    before = await axs_ls(xs)
    ts = Toolstack(client)
    paths = await ts.attach(GUEST, f"format=raw, vdev=xvdb, access=rw, target={image}")
    assert paths == device_paths(GUEST, 0, 51728)
    assert await client.read(f"{paths.backend}/hotplug-status") == b"connected"
    await wait_states(client, paths, b"4", b"4")
    assert await client.read(f"{paths.backend}/sectors") == b"%d" % (4 << 20 >> 9)
    assert await client.read(f"{paths.backend}/info") == b"0"
    assert await client.read(f"{paths.backend}/vnd") == b"/dev/vnd0d"
    assert await client.read(f"{paths.libxl}/state") == b"1"  # libxl's copy never changes
    assert host.backend is not None and host.backend.open_targets == 1
    assert await ts.detach(GUEST, paths.devid) is False
    assert await axs_ls(xs) == before
    assert host.backend.open_targets == 0


async def test_repeated_attach_detach(
    xs: ServerPath, client: XenStoreClient, host: SimulatedXen, image: Path
) -> None:
    """The same device again at once: the drivers must see a new device each time."""
    before = await axs_ls(xs)
    ts = Toolstack(client)
    for mode in ("rw", "ro", "rw"):
        paths = await ts.attach(GUEST, f"{image},raw,xvdc,{mode}")
        await wait_states(client, paths, b"4", b"4")
        expected = b"0" if mode == "rw" else b"4"
        assert await client.read(f"{paths.backend}/info") == expected
        await ts.detach(GUEST, paths.devid)
    assert await axs_ls(xs) == before


async def test_read_only_cdrom(
    xs: ServerPath, client: XenStoreClient, host: SimulatedXen, image: Path
) -> None:
    ts = Toolstack(client)
    paths = await ts.attach(GUEST, f"{image},,hdc,cdrom")
    await wait_states(client, paths, b"4", b"4")
    assert paths.devid == 5632
    assert await client.read(f"{paths.backend}/mode") == b"r"
    assert await client.read(f"{paths.backend}/removable") == b"1"
    assert await client.read(f"{paths.backend}/info") == b"7"  # cdrom, removable, read-only
    # Two read-only users of one image are fine.
    other = await ts.attach(GUEST, f"{image},,xvdd,r")
    await ts.detach(GUEST, other.devid)
    await ts.detach(GUEST, paths.devid)


# --------------------------------------------------------------------------- refusals


async def test_refusals_leave_nothing_behind(
    xs: ServerPath,
    client: XenStoreClient,
    host: SimulatedXen,
    images: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make = images
    busy = make("busy.img")
    ts = Toolstack(client)
    before = await axs_ls(xs)
    cases = [
        (GUEST, "", errno.EINVAL),
        (GUEST, f"{busy},,xvda0", errno.EINVAL),
        (GUEST, f"{busy},qcow2,xvdb", errno.EINVAL),
        (GUEST, f"{busy},,xvdb,colour=blue", errno.EINVAL),
        (GUEST, f"{busy},,xvdb,backend=nosuchdomain", errno.ENOENT),
        (7, f"{busy},,xvdb", errno.ENOENT),
        (GUEST, f"{tmp_path}/missing.img,,xvdb", errno.EIO),
        (GUEST, f"{tmp_path},,xvdb", errno.EIO),
    ]
    for domid, spec, err in cases:
        exc = await attach_error(ts, domid, spec)
        assert exc.errno == err, (spec, exc)
        assert await axs_ls(xs) == before, spec
    missing = await attach_error(ts, GUEST, f"{tmp_path}/missing.img,,xvdb")
    assert "does not exist" in missing.reason and missing.paths is not None
    assert missing.snapshot["hotplug-status"] == b"error"

    # In use: the same vdev again, then the same image read-write elsewhere.
    first = await ts.attach(GUEST, f"{busy},,xvdb")
    await wait_states(client, first, b"4", b"4")
    with_one = await axs_ls(xs)
    assert (await attach_error(ts, GUEST, f"{make('other.img')},,xvdb")).errno == errno.EEXIST
    assert (await attach_error(ts, GUEST, f"{busy},,51728")).errno == errno.EEXIST
    caplog.clear()
    with caplog.at_level(logging.INFO):
        exc = await attach_error(ts, GUEST, f"{busy},,xvdc,r")
    assert exc.errno == errno.EBUSY
    assert "already attached read-write as xbdback1i51728" in exc.reason
    rdev = os.makedev(14, 1 * 8 + 3)
    assert f"xbdback xbdback1i51744: can't VOP_OPEN device {rdev:#x}: 16" in caplog.text
    assert await axs_ls(xs) == with_one
    await ts.detach(GUEST, first.devid)
    assert await axs_ls(xs) == before


async def test_no_backend_times_out(xs: ServerPath, client: XenStoreClient, image: Path) -> None:
    """Nobody plays the backend: ETIMEDOUT after the configured wait, and the nodes go."""
    before = await axs_ls(xs)
    ts = Toolstack(client, attach_timeout=0.3)
    with trio.fail_after(5):
        exc = await attach_error(ts, GUEST, f"{image},,xvdb")
    assert exc.errno == errno.ETIMEDOUT
    assert "no backend driver answered" in exc.reason
    assert await axs_ls(xs) == before


async def test_unprivileged_toolstack_is_refused(xs_embedded: ServerPath, image: Path) -> None:
    """kvpfs running in a guest (a domain connection) may not write dom0's tree."""
    before = await axs_ls(xs_embedded)
    async with XenStoreClient(xs_embedded.domain_sockets[GUEST]) as guest:
        exc = await attach_error(Toolstack(guest), GUEST, f"{image},,xvdb")
    assert exc.errno == errno.EACCES
    assert await axs_ls(xs_embedded) == before


async def test_detach_unknown(xs: ServerPath, client: XenStoreClient) -> None:
    with pytest.raises(VbdError) as info:
        await Toolstack(client).detach(GUEST, 51728)
    assert info.value.errno == errno.ENOENT


async def test_forced_detach_without_drivers(
    xs: ServerPath, client: XenStoreClient, nursery: trio.Nursery, image: Path
) -> None:
    """The drivers went away: after the timeout the frontend is removed, then all."""
    before = await axs_ls(xs)
    host, scope = await start_host(nursery, xs)
    ts = Toolstack(client, detach_timeout=0.2)
    paths = await ts.attach(GUEST, f"{image},,xvdb")
    await wait_states(client, paths, b"4", b"4")
    scope.cancel()
    await trio.sleep(0.05)
    assert host.backend is not None and host.backend.open_targets == 0
    with trio.fail_after(5):
        assert await ts.detach(GUEST, paths.devid) is True
    assert await axs_ls(xs) == before


async def test_concurrent_attaches(
    xs: ServerPath, client: XenStoreClient, host: SimulatedXen, images: Callable[..., Path]
) -> None:
    ts = Toolstack(client)
    a, b, c = (images(n) for n in ("a.img", "b.img", "c.img"))
    results: dict[str, object] = {}

    async def attempt(tag: str, spec: str) -> None:
        try:
            results[tag] = await ts.attach(GUEST, spec)
        except VbdError as exc:
            results[tag] = exc.errno

    async with trio.open_nursery() as n:
        n.start_soon(attempt, "b1", f"{a},,xvdb")
        n.start_soon(attempt, "b2", f"{b},,xvdb")
        n.start_soon(attempt, "c", f"{c},,xvdc")
    assert sorted(str(results[k]) for k in ("b1", "b2")).count(str(errno.EEXIST)) == 1
    assert isinstance(results["c"], DevicePaths)
    for devid in (51728, 51744):
        await ts.detach(GUEST, devid)


# --------------------------------------------------------------------------- hotplug

STAND_IN = """#!/bin/sh
# A stand-in for /etc/xen/scripts/block: records how it was called and reports
# through XenStore as the real one does.
{{
  echo "args=$*"
  echo "XENBUS_PATH=$XENBUS_PATH"
  echo "XENBUS_TYPE=$XENBUS_TYPE"
  echo "XENBUS_BASE_PATH=$XENBUS_BASE_PATH"
  echo "script=$script"
}} >> {log}
case "$1" in
add)
  params=$(xenstore-read "$XENBUS_PATH/params") || exit 1
  if [ ! -e "$params" ]; then
    xenstore-write "$XENBUS_PATH/hotplug-error" "$params does not exist" "$XENBUS_PATH/hotplug-status" error
    exit 1
  fi
  xenstore-write "$XENBUS_PATH/physical-device" "7:0"
  xenstore-write "$XENBUS_PATH/physical-device-path" "$params"
  xenstore-write "$XENBUS_PATH/hotplug-status" connected
  ;;
remove) ;;
esac
"""


async def test_hotplug_script(
    xs: ServerPath, client: XenStoreClient, nursery: trio.Nursery, image: Path, tmp_path: Path
) -> None:
    """A real dom0 runs /etc/xen/scripts/block; a stand-in in another directory
    shows the arguments and environment, and the backend waits for its nodes."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    log = tmp_path / "hotplug.log"
    block = scripts / "block"
    block.write_text(STAND_IN.format(log=log))
    block.chmod(block.stat().st_mode | stat.S_IXUSR)
    await start_host(nursery, xs, play_hotplug=False)
    runner = HotplugRunner(xenstored_path=xs)
    ts = Toolstack(client, hotplug=runner, script_dir=str(scripts))
    before = await axs_ls(xs)

    paths = await ts.attach(GUEST, f"{image},,xvdb")
    assert await client.read(f"{paths.backend}/script") == str(block).encode()
    assert await client.read(f"{paths.backend}/physical-device") == b"7:0"
    await wait_states(client, paths, b"4", b"4")
    await ts.detach(GUEST, paths.devid)
    assert await axs_ls(xs) == before
    lines = log.read_text().splitlines()
    assert lines == [
        "args=add",
        "XENBUS_PATH=backend/vbd/1/51728",
        "XENBUS_TYPE=vbd",
        "XENBUS_BASE_PATH=backend",
        f"script={block}",
        "args=remove",
        "XENBUS_PATH=backend/vbd/1/51728",
        "XENBUS_TYPE=vbd",
        "XENBUS_BASE_PATH=backend",
        f"script={block}",
    ]

    exc = await attach_error(ts, GUEST, f"{tmp_path}/missing.img,,xvdb")
    assert exc.errno == errno.EIO and "missing.img does not exist" in exc.reason
    assert await axs_ls(xs) == before


# --------------------------------------------------------------------------- drivers


async def test_drivers_log_xbdback_diagnostics(
    xs: ServerPath, client: XenStoreClient, host: SimulatedXen, image: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ts = Toolstack(client)
    with caplog.at_level(logging.INFO, logger="kvpfs"):
        paths = await ts.attach(GUEST, f"{image},,hda1")
        await wait_states(client, paths, b"4", b"4")
        await ts.detach(GUEST, paths.devid)
    assert paths.devid == 769
    text = caplog.text
    assert f"xbd backend: attach device vnd0d (size {4 << 20}) for domain 1" in text
    assert "xbd backend 0x301 for domain 1 using event channel " in text
    assert ", protocol x86_64-abi" in text


async def test_frontend_as_the_guest(xs_embedded: ServerPath, nursery: trio.Nursery, image: Path) -> None:
    """The blkfront speaking as domain 1 (its own domain socket) can do its part:
    the frontend nodes are the guest's, the backend's are readable to it."""
    await start_host(
        nursery, xs_embedded, frontend_path=xs_embedded.domain_sockets[GUEST], frontend_domids=[GUEST]
    )
    async with XenStoreClient(xs_embedded) as client:
        ts = Toolstack(client)
        paths = await ts.attach(GUEST, f"{image},,xvdb")
        await wait_states(client, paths, b"4", b"4")
        assert await client.get_perms(f"{paths.frontend}/ring-ref") == await client.get_perms(
            f"{paths.frontend}/state"
        )
        await ts.detach(GUEST, paths.devid)


async def test_cancelling_the_drivers_releases_everything(
    xs: ServerPath, client: XenStoreClient, image: Path
) -> None:
    ts = Toolstack(client)
    async with trio.open_nursery() as nursery:
        host, scope = await start_host(nursery, xs)
        paths = await ts.attach(GUEST, f"{image},,xvdb")
        await wait_states(client, paths, b"4", b"4")
        assert host.backend is not None and host.frontend is not None
        assert host.backend.open_targets == 1
        assert host.backend.device_count == host.frontend.device_count == 1
        scope.cancel()
    # The nursery returned: every driver task ended, and the image is closed.
    assert host.backend.open_targets == 0
    assert host.backend.device_count == host.frontend.device_count == 0
    fd_dir = os.listdir("/proc/self/fd")
    assert not any(os.path.realpath(f"/proc/self/fd/{fd}") == str(image) for fd in fd_dir)
    ts.detach_timeout = 0.1
    await ts.detach(GUEST, paths.devid)


async def test_drivers_pick_up_existing_devices(
    xs: ServerPath, client: XenStoreClient, nursery: trio.Nursery, image: Path
) -> None:
    """Drivers started after the toolstack wrote the nodes still serve the device."""
    ts = Toolstack(client, attach_timeout=10)
    async with trio.open_nursery() as n:
        n.start_soon(ts.attach, GUEST, f"{image},,xvdb")
        await trio.sleep(0.2)
        await start_host(nursery, xs)
    paths = device_paths(GUEST, 0, 51728)
    await wait_states(client, paths, b"4", b"4")
    await ts.detach(GUEST, 51728)


async def test_simulated_host_creates_the_guest(
    request: pytest.FixtureRequest, xs_embedded: ServerPath, nursery: trio.Nursery, image: Path
) -> None:
    """On an embedded xenstored that started empty (as cxenstored starts), the
    simulated host lays out dom0 and guest 1 as domain creation does."""
    factory = request.getfixturevalue("embedded_factory")
    empty: ServerPath = factory(guests=(), initial="xenstored")
    await start_host(nursery, empty, create_domains=[(GUEST, "guest1")])
    assert await axs_ls(empty) == await axs_ls(xs_embedded)
    async with XenStoreClient(empty) as client:
        ts = Toolstack(client)
        paths = await ts.attach(GUEST, f"{image},,xvdb")
        await wait_states(client, paths, b"4", b"4")
        await ts.detach(GUEST, paths.devid)


async def test_cancelled_attach_leaves_nothing(
    xs: ServerPath, client: XenStoreClient, image: Path
) -> None:
    """The caller gives up (a FUSE timeout, an unmount) while the toolstack waits
    for the backend: the nodes it wrote are removed all the same."""
    before = await axs_ls(xs)
    ts = Toolstack(client, attach_timeout=30)
    with trio.move_on_after(0.3) as scope:
        await ts.attach(GUEST, f"{image},,xvdb")
    assert scope.cancelled_caught
    assert await axs_ls(xs) == before
