"""What a mount is asked to be: :class:`MountConfig` and the ``-o`` option parser.

Pure (no trio, no FUSE): the command line and ``mount.fuse3`` fill it, the
composition root (:mod:`kvpfs.compose`) reads it.  Every value is checked here,
when it is parsed, so that a bad one is a one-line usage error before anything
starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from kvpfs.errors import UsageError

#: What ``kvpfs SOURCE MOUNTPOINT`` (and an fstab line's first field) may say.
#: ``auto`` (also ``kvpfs``, or no source): the host's pools and xenstored where it
#: has them, else embedded ones; ``embedded``: never the host's, whatever it has
#: (a CI job on a real guest); ``host`` (also ``real``): only the host's, an error
#: where it has none.
SOURCES = {"auto": "auto", "kvpfs": "auto", "embedded": "embedded", "host": "host", "real": "host"}

#: Generic options that mount(8), mount.fuse3 and fstab lines carry; they go to
#: libfuse and the kernel as they are (as sshfs passes them on).
FUSE_PASSTHROUGH = frozenset(
    {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
     "sync", "async", "dirsync", "allow_root", "auto_unmount"}
)
#: Options that only mean something to mount(8), systemd or fstab; ignored here.
MOUNT_ONLY = frozenset(
    {"_netdev", "nofail", "noauto", "auto", "user", "nouser", "users", "owner", "group",
     "defaults", "default_permissions"}
)


@dataclass
class MountConfig:
    mountpoint: str
    #: ``auto``, ``embedded`` or ``host`` (see :data:`SOURCES`).
    source: str = "auto"
    foreground: bool = False
    debug: bool = False
    verbose: bool = False
    kvp_dir: str | None = None
    log_file: str | None = None
    read_only: bool = False
    raw: bool = False
    allow_other: bool = False
    kvp_all_writable: bool = False
    kvp_limits: str = "host"
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    attr_timeout: float = 1.0
    timeout: float = 30.0
    #: "auto" (the host's xenstored if it has one, else an embedded one), "off", or a path.
    xenstore: str = "auto"
    vbd_timeout: float = 10.0
    #: Generic FUSE/kernel mount options passed on as they are (``nosuid``, ...).
    fuse_extra: set[str] = field(default_factory=set)
    #: ``fsname=`` given by the user (default: what the mount serves).
    fsname: str | None = None


def parse_source(text: str) -> str:
    try:
        return SOURCES[text]
    except KeyError:
        choices = ", ".join(sorted(SOURCES))
        raise UsageError(f"unknown source '{text}' (one of: {choices})", 2) from None


def _seconds(item: str, value: str, *, zero: bool) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        limit = "0 or more" if zero else "more than 0"
        raise UsageError(f"mount option '{item}' needs a number of seconds {limit}", 2)
    return seconds


def _id(item: str, value: str) -> int:
    number = int(value)
    if not 0 <= number < 2**32 - 1:
        raise UsageError(f"mount option '{item}' needs an id from 0 to 4294967294", 2)
    return number


def parse_mount_options(config: MountConfig, text: str) -> None:
    """Apply one ``-o`` argument (comma-separated options) to ``config``."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, has_value, value = item.partition("=")
        try:
            if not has_value and name in ("ro", "rw"):
                config.read_only = name == "ro"
            elif not has_value and name == "raw":
                config.raw = True
            elif not has_value and name == "allow_other":
                config.allow_other = True
            elif not has_value and name in FUSE_PASSTHROUGH:
                config.fuse_extra.add(name)
            elif (not has_value and name in MOUNT_ONLY) or name.startswith(("x-", "comment=")):
                continue
            elif name == "kvp_writable" and value in ("all", "default"):
                config.kvp_all_writable = value == "all"
            elif name == "kvp_limits" and value in ("host", "format"):
                config.kvp_limits = value
            elif name == "kvp_dir" and value:
                config.kvp_dir = value
            elif name == "xenstore" and value:
                config.xenstore = value
            elif name == "log" and value:
                config.log_file = value
            elif name == "fsname" and value:
                config.fsname = value
            elif name == "subtype" and value == "kvpfs":
                continue
            elif name in ("uid", "gid") and value:
                setattr(config, name, _id(item, value))
            elif name == "attr_timeout" and value:
                config.attr_timeout = _seconds(item, value, zero=True)
            elif name == "timeout" and value:
                config.timeout = _seconds(item, value, zero=False)
            elif name == "vbd_timeout" and value:
                config.vbd_timeout = _seconds(item, value, zero=False)
            else:
                raise UsageError(f"unknown or malformed mount option '{item}'", 2)
        except ValueError:
            raise UsageError(f"malformed value in mount option '{item}'", 2) from None
