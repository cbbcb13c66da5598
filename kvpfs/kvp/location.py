"""Where the pool files are.

In this order:

1. an explicit directory (``--kvp-dir``), used as it is;
2. Linux's ``/var/lib/hyperv``, if it is a directory holding at least one
   ``.kvp_pool_N`` file (systemd may create the directory before
   ``hv_kvp_daemon`` ever ran, and an empty one is no sign of Hyper-V);
3. FreeBSD's ``/var/db/hyperv/pool``, by the same rule;
4. an embedded directory for machines without Hyper-V:
   ``$XDG_STATE_HOME/kvpfs/kvp`` (``~/.local/state/kvpfs/kvp`` by default),
   created with mode 0700 (as is ``kvpfs/`` above it) and the five empty pool
   files (0644, never truncated) that the daemon would create.

A missing pool file in a chosen directory is an empty pool; it is created,
as the daemon does, by the first write to it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

LINUX_DIR = "/var/lib/hyperv"
FREEBSD_DIR = "/var/db/hyperv/pool"
POOL_COUNT = 5


class PoolDirKind(enum.Enum):
    EXPLICIT = "explicit"
    LINUX = "linux"
    FREEBSD = "freebsd"
    EMBEDDED = "embedded"


@dataclass(frozen=True, slots=True)
class PoolDir:
    path: str
    kind: PoolDirKind


class PoolDirError(Exception):
    """The pool directory cannot be used; the message is one line for the user."""


def pool_file_name(number: int) -> str:
    """The file name of pool ``number`` (0..4), as the daemon names it."""
    return f".kvp_pool_{number}"


def pool_path(directory: str, number: int) -> str:
    return os.path.join(directory, pool_file_name(number))


def _has_pools(directory: str) -> bool:
    if not os.path.isdir(directory):
        return False
    # A system pool directory this user cannot read must not silently fall back
    # to the embedded pools: the user would see data that the host never sees.
    _check_usable(directory)
    return any(os.path.isfile(pool_path(directory, number)) for number in range(POOL_COUNT))


def embedded_dir(env: Mapping[str, str] | None = None) -> str:
    """The per-user pool directory (XDG state directory; relative values are ignored)."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        home = env.get("HOME") or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "kvpfs", "kvp")


def _check_usable(directory: str) -> None:
    if not os.path.exists(directory):
        raise PoolDirError(f"kvp pool directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise PoolDirError(f"kvp pool directory {directory} is not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise PoolDirError(f"kvp pool directory {directory} is not readable")


def create_pools(directory: str, *, private: bool = False) -> None:
    """Make ``directory`` (0755, as the daemon does; with ``private`` it and its
    parent are 0700, kvpfs's own state) and the five pool files (0644) where missing."""
    try:
        if private:
            for path in (os.path.dirname(directory), directory):
                os.makedirs(path, mode=0o700, exist_ok=True)
                os.chmod(path, 0o700)
        else:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        for number in range(POOL_COUNT):
            # O_CREAT without O_TRUNC, like the daemon: existing pools keep their records.
            fd = os.open(
                pool_path(directory, number), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            os.close(fd)
    except OSError as exc:
        raise PoolDirError(
            f"cannot create kvp pool directory {directory}: {exc.strerror or exc}"
        ) from exc


def find_pool_dir(
    explicit: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    linux_dir: str = LINUX_DIR,
    freebsd_dir: str = FREEBSD_DIR,
) -> PoolDir:
    """The pool directory to serve, and how it was chosen (for the log)."""
    if explicit is not None:
        path = os.path.abspath(explicit)
        _check_usable(path)
        return PoolDir(path, PoolDirKind.EXPLICIT)
    for directory, kind in ((linux_dir, PoolDirKind.LINUX), (freebsd_dir, PoolDirKind.FREEBSD)):
        if _has_pools(directory):
            return PoolDir(directory, kind)
    path = embedded_dir(env)
    create_pools(path, private=True)
    _check_usable(path)
    return PoolDir(path, PoolDirKind.EMBEDDED)
