"""Helpers for tests that mount kvpfs in-process and drive it with real programs.

The filesystem runs on the test's trio thread, so the test must never make a
syscall on the mount from that thread (it would deadlock): every access goes
through a worker thread or a subprocess, bounded by a timeout.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

if TYPE_CHECKING:
    from kvpfs.fs.mount import Session

T = TypeVar("T")

DEFAULT_TIMEOUT = 20.0


async def in_thread(fn: Callable[..., T], *args: Any, timeout: float = DEFAULT_TIMEOUT) -> T:
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 2.0, interval: float = 0.01
) -> None:
    """Wait until ``check()`` is true, failing the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(interval)


async def sh(
    cmd: str | Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: bytes = b"",
) -> subprocess.CompletedProcess[bytes]:
    """Run a real program (a shell line if ``cmd`` is a string) against the mount."""
    argv: Sequence[str] = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    full_env = {**os.environ, **(env or {})}
    with trio.fail_after(timeout):
        result = await trio.run_process(
            list(argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=full_env,
            cwd=cwd,
            stdin=stdin,
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv!r} exited {result.returncode}\nstdout: {result.stdout!r}\n"
            f"stderr: {result.stderr!r}"
        )
    return result


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def _screen(session: str) -> bytes:
    return (await sh(f"tmux capture-pane -p -t {session}", check=False)).stdout


async def _wait_screen(session: str, text: bytes, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while text not in await _screen(session):
            await trio.sleep(0.05)


async def nano_append(path: str, text: str) -> None:
    """Open ``path`` in nano under tmux, append ``text`` to the first line, save, quit.

    Waits on what nano shows rather than on fixed delays, so a loaded machine
    slows the test down instead of breaking it.
    """
    session = f"kvpfs-nano-{os.getpid()}-{id(path)}"
    await sh(f"tmux new-session -d -s {session} -x 100 -y 24 'nano {path}'")
    try:
        await _wait_screen(session, b"GNU nano")
        await sh(["tmux", "send-keys", "-t", session, "End", text, "C-o", "Enter"])
        await _wait_screen(session, b"Wrote")
        await sh(["tmux", "send-keys", "-t", session, "C-x"])
        with trio.fail_after(15):
            while (await sh(f"tmux has-session -t {session}", check=False)).returncode == 0:
                await trio.sleep(0.05)
    finally:
        await sh(f"tmux kill-session -t {session}", check=False)


def renameat2_noreplace(old: str, new: str) -> None:
    """rename(2) with RENAME_NOREPLACE, as coreutils' mv tries first."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, old.encode(), -100, new.encode(), 1) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


async def stop_sessions(sessions: Iterable[Session]) -> None:
    """Stop in-process mounts; whatever happened, the kernel lists none of them after."""
    from kvpfs.fs.mount import force_unmount, mounted_at

    for session in sessions:
        try:
            with trio.fail_after(15):
                await session.stop()
        finally:
            if mounted_at(session.mountpoint):
                await trio.to_thread.run_sync(force_unmount, session.mountpoint)
        assert not mounted_at(session.mountpoint)
