"""mount(2), umount2(2) and unshare(2) for hostsim's private namespaces, through libc.

Also :func:`shadow` and :func:`bind_entries`: a directory replaced by a tmpfs in
which every entry of the old one is bound back, so that hostsim can add or
replace single entries (``/dev/vmbus``, a script, ``/sys/class/net/<if>/device``)
without touching anything outside its mount namespace.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
from collections.abc import Sequence

log = logging.getLogger("kvpfs.hostsim")

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    if (
        _libc.mount(
            os.fsencode(source) if source else None,
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
        != 0
    ):
        raise os_error(f"mount {target}")


def umount(target: str) -> None:
    """Detach ``target`` and every mount below it."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        raise os_error(f"umount {target}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise os_error("unshare")


def bind_entries(source: str, target: str, names: Sequence[str]) -> None:
    """Bind the entries ``names`` of directory ``source`` into directory ``target``.

    Symlinks are copied, directories bound recursively (the mounts below them come
    along), anything else bound onto an empty file.  An entry that vanished or
    cannot be bound is left out.
    """
    for name in names:
        entry = f"{source}/{name}"
        place = os.path.join(target, name)
        try:
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(entry), place)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(place, stat.S_IMODE(st.st_mode))
                mount(entry, place, None, MS_BIND | MS_REC)
            else:
                os.close(os.open(place, os.O_CREAT | os.O_WRONLY, 0o600))
                mount(entry, place, None, MS_BIND)
        except OSError as exc:
            log.debug("hostsim: %s left out of %s: %s", name, target, exc)


def shadow(directory: str, *, skip: Sequence[str] = (), mode: int = 0o755) -> None:
    """Put a tmpfs over ``directory`` and bind every entry of the old one back.

    Entries are reached through a descriptor of the old directory, so no staging
    directory is needed anywhere.
    """
    old = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = sorted(name for name in os.listdir(old) if name not in skip)
        mount("tmpfs", directory, "tmpfs", MS_NOSUID, f"mode={mode:o}")
        bind_entries(f"/proc/self/fd/{old}", directory, names)
    finally:
        os.close(old)


_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise os_error("setns")
