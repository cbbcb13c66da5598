"""One view's or peer's failure is logged and contained: the mount keeps serving.

The mount is assembled by the composition root in-process (so a fault can be
injected into one part) and driven from worker threads and subprocesses.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from kvpfs.compose import RunningMount, plan_mount, serve_mount
from kvpfs.config import MountConfig
from kvpfs.errors import leaves
from kvpfs.kvp.view import KvpView
from kvpfs.peers.xendrivers import SimulatedXen
from kvpfs.supervise import supervise
from tests.conftest import fuse_usable
from tests.mount.kvp_fixtures import Pools, rec
from tests.mounting import eventually, in_thread, read_bytes, sh, write_bytes

pytestmark = pytest.mark.mount


@asynccontextmanager
async def composed(tmp_path: Path, pools: Pools) -> AsyncIterator[RunningMount]:
    """A mount as ``kvpfs`` assembles it, with its own embedded xenstored."""
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "run").mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XENSTORED_RUNDIR": str(tmp_path / "none")}
    config = MountConfig(str(tmp_path / "mnt"), kvp_dir=str(pools.directory))
    plan = plan_mount(config, env)
    async with trio.open_nursery() as nursery:
        running: RunningMount = await nursery.start(serve_mount, config, plan)
        try:
            yield running
        finally:
            with trio.fail_after(20):
                await running.session.stop()


def crash_once(monkeypatch: pytest.MonkeyPatch, cls: Any) -> trio.Event:
    """Make ``cls.run`` fail once, after it started, when the returned event is set."""
    original = cls.run
    trigger = trio.Event()
    crashed = {"done": False}

    async def run(self: Any, *args: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(original, self, *args))
            task_status.started()
            if crashed["done"]:
                await trio.sleep_forever()
            await trigger.wait()
            crashed["done"] = True
            raise RuntimeError(f"{cls.__name__} fell over (injected)")

    monkeypatch.setattr(cls, "run", run)
    return trigger


async def attach_and_wait(mnt: str, image: Path, devid: str = "51728") -> None:
    await sh(f"echo '1 {image},raw,xvdb,rw' > {mnt}/vbd/attach")
    device = f"{mnt}/vbd/xbdback1i{devid}"

    async def connected() -> bool:
        return await in_thread(read_bytes, f"{device}/frontend-state") == b"4\n"

    await eventually(connected, timeout=10)
    assert await in_thread(read_bytes, f"{device}/backend-state-name") == b"Connected\n"
    await sh(["rmdir", f"{mnt}/vbd/xbdback1i{devid}"])


async def test_a_peer_that_fails_is_restarted_and_the_views_stay_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pools: Pools, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("kvpfs.supervise.RESTART_DELAY", 0.05)
    trigger = crash_once(monkeypatch, SimulatedXen)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    async with composed(tmp_path, pools) as running:
        mnt = running.session.mountpoint
        await attach_and_wait(mnt, image)
        with caplog.at_level(logging.ERROR, logger="kvpfs"):
            trigger.set()
            await eventually(lambda: _logged(caplog, "fell over"), timeout=5)
        # The mount did not end: kvp/ and xenstore/ answer, and the restarted
        # drivers answer an attach again.
        await in_thread(write_bytes, f"{mnt}/kvp/guest/k", b"still\n")
        assert pools.bytes("guest") == rec(b"k", b"still")
        assert await in_thread(read_bytes, f"{mnt}/xenstore/local/domain/1/name") == b"guest1\n"
        await attach_and_wait(mnt, image)
    assert "the simulated Xen drivers failed; starting it again" in caplog.text


async def test_a_view_that_fails_comes_back_and_the_others_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pools: Pools, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("kvpfs.supervise.RESTART_DELAY", 0.05)
    trigger = crash_once(monkeypatch, KvpView)
    async with composed(tmp_path, pools) as running:
        mnt = running.session.mountpoint
        with caplog.at_level(logging.ERROR, logger="kvpfs"):
            trigger.set()
            await eventually(lambda: _logged(caplog, "fell over"), timeout=5)
        assert await in_thread(read_bytes, f"{mnt}/xenstore/local/domain/1/name") == b"guest1\n"
        pools.set_bytes("external", rec(b"pushed", b"by the host"))
        # kvp/ reads the pools afresh meanwhile, and the view's watch comes back.
        assert await in_thread(read_bytes, f"{mnt}/kvp/external/pushed") == b"by the host\n"
    assert "the kvp/ view failed; starting it again" in caplog.text


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    await trio.sleep(0)
    return text in caplog.text


def test_supervise_raises_a_failure_before_start() -> None:
    async def broken(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError(2, "cannot start")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(supervise, "broken", broken))

    with pytest.raises(BaseException) as info:
        trio.run(main)
    assert [str(e) for e in leaves(info.value)] == ["[Errno 2] cannot start"]
