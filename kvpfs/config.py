"""What a mount is asked to be: :class:`MountConfig` and the ``-o`` option parser.

Pure (no trio, no FUSE): the command line fills it, the composition root
(:mod:`kvpfs.compose`) reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvpfs.errors import UsageError


@dataclass
class MountConfig:
    mountpoint: str
    foreground: bool = False
    debug: bool = False
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


def parse_mount_options(config: MountConfig, text: str) -> None:
    """Apply one ``-o`` argument (comma-separated options) to ``config``."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            if name == "ro" and not value:
                config.read_only = True
            elif name == "rw" and not value:
                config.read_only = False
            elif name == "raw" and not value:
                config.raw = True
            elif name == "allow_other" and not value:
                config.allow_other = True
            elif name == "kvp_writable" and value in ("all", "default"):
                config.kvp_all_writable = value == "all"
            elif name == "kvp_limits" and value in ("host", "format"):
                config.kvp_limits = value
            elif name == "uid" and value:
                config.uid = int(value)
            elif name == "gid" and value:
                config.gid = int(value)
            elif name == "attr_timeout" and value:
                config.attr_timeout = float(value)
            elif name == "timeout" and value:
                config.timeout = float(value)
            elif name == "vbd_timeout" and value:
                config.vbd_timeout = float(value)
            else:
                raise UsageError(f"unknown or malformed mount option '{item}'", 2)
        except ValueError:
            raise UsageError(f"malformed value in mount option '{item}'", 2) from None
