"""Virtual-device (vdev) names and numbers, both directions (xen-vbd-interface(7)).

``encode("xvda") == 51712`` is what the toolstack writes as ``virtual-device`` and
uses as the device id in every path; ``decode(769) == "hda1"`` is what the vbd view
shows.  The encodings:

=============================================  =========================================
``1<<28 | disk<<8 | partition``                xvd with disk > 15 or partition > 15
                                               (disk < 2**20, partition <= 255)
``202<<8 | disk<<4 | partition``               xvd, disk 0-15, partition 0-15
``8<<8 | disk<<4 | partition``                 sd, disk 0-15, partition 0-15
``3<<8 | disk<<6 | partition``                 hd, disk 0-1, partition 0-63
``22<<8 | (disk-2)<<6 | partition``            hd, disk 2-3, partition 0-63
=============================================  =========================================

Disk letters are bijective base 26 (``a`` = 0, ``z`` = 25, ``aa`` = 26); partition 0
is the whole disk and is written without a number; a leading zero in a partition
number is refused.  ``d<N>p<M>`` is the generic xvd syntax and ``d<N>`` its whole
disk.  A plain number (decimal, ``0x`` hex or ``0`` octal, as ``strtoul`` base 0
reads it, up to INT_MAX) passes through unchanged.

Decoding knows all four families, not only xvd as libxl's reverse mapping does,
because the view must name ``xbdback3i769`` as ``hda1``.  Values that no family
covers (deprecated majors, the reserved range from ``2<<28``) decode to None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "EXTENDED",
    "INT_MAX",
    "Vdev",
    "VdevError",
    "decode",
    "disk_letters",
    "encode",
    "parse",
]

EXTENDED = 1 << 28
#: From here on the numbers are reserved.
RESERVED = 2 << 28
INT_MAX = (1 << 31) - 1

XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJORS = (3, 22)

#: (largest disk index, largest partition) per name family.
_LIMITS = {"xvd": ((1 << 20) - 1, 255), "sd": (15, 15), "hd": (3, 63)}

_NAME = re.compile(r"(xvd|sd|hd)([a-z]+)([1-9][0-9]*)?")
_GENERIC = re.compile(r"d(0|[1-9][0-9]*)(?:p(0|[1-9][0-9]*))?")
_NUMBER = re.compile(r"\+?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


class VdevError(ValueError):
    """Not a virtual-device name or number the toolstack accepts."""


@dataclass(frozen=True, slots=True)
class Vdev:
    """A named virtual device: family (``xvd``, ``sd``, ``hd``), disk, partition."""

    family: str
    disk: int
    partition: int = 0

    def __post_init__(self) -> None:
        limits = _LIMITS.get(self.family)
        if limits is None:
            raise VdevError(f"unknown device family {self.family!r}")
        max_disk, max_part = limits
        if not 0 <= self.disk <= max_disk:
            raise VdevError(f"{self.family} disk index {self.disk} out of range 0-{max_disk}")
        if not 0 <= self.partition <= max_part:
            raise VdevError(f"{self.family} partition {self.partition} out of range 0-{max_part}")

    @property
    def name(self) -> str:
        part = str(self.partition) if self.partition else ""
        return f"{self.family}{disk_letters(self.disk)}{part}"

    @property
    def devid(self) -> int:
        d, p = self.disk, self.partition
        if self.family == "xvd":
            if d <= 15 and p <= 15:
                return XVD_MAJOR << 8 | d << 4 | p
            return EXTENDED | d << 8 | p
        if self.family == "sd":
            return SD_MAJOR << 8 | d << 4 | p
        if d < 2:
            return HD_MAJORS[0] << 8 | d << 6 | p
        return HD_MAJORS[1] << 8 | (d - 2) << 6 | p


def disk_letters(index: int) -> str:
    """0 → ``a``, 25 → ``z``, 26 → ``aa``, 536 → ``tq`` (bijective base 26)."""
    if index < 0:
        raise VdevError(f"negative disk index {index}")
    out: list[str] = []
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        out.append(chr(ord("a") + rem))
    return "".join(reversed(out))


def _letters_index(letters: str, limit: int) -> int:
    index = -1
    for ch in letters:
        index = (index + 1) * 26 + (ord(ch) - ord("a"))
        if index > limit:
            raise VdevError(f"disk letters {letters!r} out of range")
    return index


def parse(name: str) -> Vdev:
    """A device name (``xvdb``, ``hdc2``, ``d1p2``) as family, disk and partition."""
    m = _GENERIC.fullmatch(name)
    if m:
        disk = int(m.group(1))
        if disk >= 1 << 20:
            raise VdevError(f"disk {disk} out of range in {name!r}")
        return Vdev("xvd", disk, int(m.group(2) or 0))
    m = _NAME.fullmatch(name)
    if not m:
        raise VdevError(f"{name!r} is not a virtual device name")
    family, letters, part = m.groups()
    disk = _letters_index(letters, _LIMITS[family][0])
    return Vdev(family, disk, int(part) if part else 0)


def encode(vdev: str) -> int:
    """The device id libxl derives from a vdev string (name or plain number)."""
    if _NUMBER.fullmatch(vdev):
        value = _strtoul(vdev.removeprefix("+"))
        if value > INT_MAX:
            raise VdevError(f"device number {vdev} is larger than INT_MAX")
        return value
    return parse(vdev).devid


def _strtoul(digits: str) -> int:
    # Python's int(x, 0) refuses C's leading-zero octal.
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xX":
        return int(digits, 8)
    return int(digits, 0)


def decode_vdev(devid: int) -> Vdev | None:
    """The named device a number stands for, or None (deprecated or reserved)."""
    if devid < 0 or devid >= RESERVED:
        return None
    if devid & EXTENDED:
        minor = devid & ~EXTENDED
        return Vdev("xvd", minor >> 8, minor & 0xFF)
    if devid > 0xFFFF:
        return None
    major, minor = devid >> 8, devid & 0xFF
    if major == XVD_MAJOR:
        return Vdev("xvd", minor >> 4, minor & 0xF)
    if major == SD_MAJOR:
        return Vdev("sd", minor >> 4, minor & 0xF)
    if major in HD_MAJORS:
        disk = (minor >> 6) + (0 if major == HD_MAJORS[0] else 2)
        if (major == HD_MAJORS[0] and disk > 1) or disk > 3:
            return None
        return Vdev("hd", disk, minor & 0x3F)
    return None


def decode(devid: int) -> str | None:
    """``769`` → ``hda1``, ``51712`` → ``xvda``, ``268439552`` → ``xvdq``."""
    v = decode_vdev(devid)
    return v.name if v is not None else None


def is_canonical(devid: int) -> bool:
    """Whether ``devid`` is the number its own name encodes to.

    Extended numbers for disks and partitions that fit the 202 encoding decode to a
    name, but that name encodes the short way; those are the only non-canonical
    values that decode.
    """
    v = decode_vdev(devid)
    return v is not None and v.devid == devid
