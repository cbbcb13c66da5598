"""Mount lifecycle: views up, kernel mount, serve, commit, unmount.

Two-stage shutdown: the first SIGINT/SIGTERM (or ``fusermount3 -u``) ends the
request loop gracefully, commits what open files still hold and unmounts; a
second signal cancels everything, abandoning a handler stuck on a hung store.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyfuse3
import trio

from kvpfs.fs.operations import Operations

log = logging.getLogger(__name__)


def fuse_options(
    *,
    fsname: str = "kvpfs",
    allow_other: bool = False,
    read_only: bool = False,
    debug: bool = False,
) -> set[str]:
    # default_permissions makes the kernel enforce the mode bits; without it a
    # root-owned 0600 key would be readable by anyone under allow_other.
    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", "subtype=kvpfs"}
    if allow_other:
        options.add("allow_other")
    if read_only:
        options.add("ro")
    if debug:
        options.add("debug")
    return options


@dataclass(eq=False)
class Session:
    """Handle on a running mount, returned by ``nursery.start(serve, ...)``."""

    mountpoint: str
    ops: Operations
    cancel_scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)
    _loop_finished: bool = False

    def terminate(self) -> None:
        """Ask the request loop to end (graceful: pending data is committed)."""
        # pyfuse3.terminate() on a finished session dereferences a NULL session.
        if not self._loop_finished:
            for view in self.ops.views.values():
                try:
                    view.terminating()
                except Exception:
                    log.exception("view %s failed to prepare for unmount", view.name)
            pyfuse3.terminate()

    def cancel(self) -> None:
        """End now, abandoning handlers that are stuck."""
        self.cancel_scope.cancel()

    async def stop(self, grace: float = 5.0) -> None:
        self.terminate()
        with trio.move_on_after(grace):
            await self.done.wait()
        if not self.done.is_set():
            self.cancel()
            await self.done.wait()


async def serve(
    ops: Operations,
    mountpoint: str,
    options: Iterable[str],
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``ops`` on ``mountpoint`` and serve until unmounted or terminated."""
    scope = trio.CancelScope()
    session = Session(mountpoint, ops, scope)
    try:
        with scope:
            async with trio.open_nursery() as nursery:
                # Views first, so that the mount answers from the moment it exists.
                for view in ops.views.values():
                    await nursery.start(view.run, ops.invalidator)
                await nursery.start(ops.invalidator.run)
                pyfuse3.init(ops, mountpoint, set(options))
                try:
                    if handle_signals:
                        nursery.start_soon(_handle_signals, session)
                    task_status.started(session)
                    await pyfuse3.main()
                    session._loop_finished = True
                    await ops.commit_all()
                finally:
                    session._loop_finished = True
                    pyfuse3.close(unmount=True)
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for view in ops.views.values():
                try:
                    await view.aclose()
                except Exception:
                    log.exception("closing view %s failed", view.name)
        session.done.set()


async def _handle_signals(session: Session) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("%s: unmounting", signal.Signals(signum).name)
                session.terminate()
            else:
                log.warning("second %s: forcing exit", signal.Signals(signum).name)
                session.cancel()


def mounted_at(mountpoint: str) -> bool:
    """Whether the kernel lists a mount at ``mountpoint``.

    Reads /proc/self/mountinfo: os.path.ismount() lies about a dead FUSE mount.
    """
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    return True
    except OSError:
        return False
    return False


def _unescape_mountinfo(path: str) -> str:
    # The kernel writes space, tab, newline and backslash in octal.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        path = path.replace(code, chr(int(code[1:], 8)))
    return path


def force_unmount(mountpoint: str) -> bool:
    """Lazy unmount of a (possibly dead) FUSE mount; True if nothing is mounted after."""
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if not mounted_at(mountpoint):
            return True
        try:
            subprocess.run(argv, check=False, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return not mounted_at(mountpoint)
