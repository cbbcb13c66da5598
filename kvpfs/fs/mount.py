"""Mount lifecycle: views up, kernel mount, serve, commit, unmount.

Two-stage shutdown: the first SIGINT/SIGTERM (or ``fusermount3 -u``) ends the
request loop gracefully, commits what open files still hold and unmounts; a
second signal cancels everything, abandoning a handler stuck on a hung store.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyfuse3
import trio

from kvpfs.errors import UsageError, one_line
from kvpfs.fs.operations import Operations
from kvpfs.supervise import supervise

log = logging.getLogger(__name__)

#: How long each step of a shutdown (committing open files, closing a view) may
#: take before it is abandoned, so that a hung store cannot keep the process alive.
SHUTDOWN_DEADLINE = 5.0


def fuse_options(
    *,
    fsname: str = "kvpfs",
    allow_other: bool = False,
    read_only: bool = False,
    debug: bool = False,
    extra: Iterable[str] = (),
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
    # Generic options (nosuid, noexec, ...) as mount(8) gives them; "rw" is the default.
    options |= set(extra) - {"rw"}
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

    def cancel_after(self, seconds: float) -> None:
        """End at the latest ``seconds`` from now."""
        self.cancel_scope.deadline = min(
            self.cancel_scope.deadline, trio.current_time() + seconds
        )

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
                    try:
                        await nursery.start(
                            functools.partial(
                                supervise,
                                f"the {view.name}/ view",
                                functools.partial(view.run, ops.invalidator),
                            )
                        )
                    except Exception as exc:
                        # One line for the user: which view, and why (see one_line).
                        message = one_line(exc)
                        if message is None:
                            raise
                        raise UsageError(f"{view.name}/ cannot start: {message}") from exc
                await nursery.start(ops.invalidator.run)
                try:
                    pyfuse3.init(ops, mountpoint, set(options))
                except RuntimeError as exc:
                    # libfuse has said why on stderr ("fuse: ..."); pyfuse3 says
                    # only that it failed.
                    raise UsageError(f"mounting on {mountpoint} failed: {exc}") from None
                try:
                    if handle_signals:
                        nursery.start_soon(_handle_signals, session)
                    task_status.started(session)
                    await pyfuse3.main()
                    session._loop_finished = True
                    with trio.move_on_after(SHUTDOWN_DEADLINE) as committing:
                        await ops.commit_all()
                    if committing.cancelled_caught:
                        log.warning("open files not committed within %.0f s", SHUTDOWN_DEADLINE)
                finally:
                    session._loop_finished = True
                    pyfuse3.close(unmount=True)
                    nursery.cancel_scope.cancel()
    finally:
        for view in ops.views.values():
            with trio.move_on_after(SHUTDOWN_DEADLINE, shield=True) as closing:
                try:
                    await view.aclose()
                except Exception:
                    log.exception("closing view %s failed", view.name)
            if closing.cancelled_caught:
                log.warning("view %s did not close within %.0f s", view.name, SHUTDOWN_DEADLINE)
        session.done.set()


async def _handle_signals(session: Session) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("%s: unmounting", signal.Signals(signum).name)
                session.terminate()
                # A handler stuck on a hung store would hold the request loop.
                session.cancel_after(2 * SHUTDOWN_DEADLINE)
            else:
                log.warning("second %s: forcing exit", signal.Signals(signum).name)
                session.cancel()


#: The filesystem type the kernel shows for a kvpfs mount (``subtype=kvpfs``).
FSTYPE = "fuse.kvpfs"


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type of the topmost mount at ``mountpoint``, None if none.

    Reads /proc/self/mountinfo: os.path.ismount() lies about a dead FUSE mount.
    """
    target = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    # "... - fstype source options": the later line is the top mount.
                    rest = fields[fields.index("-") + 1 :] if "-" in fields else []
                    found = rest[0] if rest else "unknown"
    except OSError:
        return None
    return found


def mounted_at(mountpoint: str) -> bool:
    """Whether the kernel lists a mount at ``mountpoint``."""
    return mount_type(mountpoint) is not None


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
