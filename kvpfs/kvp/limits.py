"""What a key or value may be before it is stored, and the errno when it may not.

Every pool holds what the format can: a key of at most 511 bytes
(ENAMETOOLONG) and a value of at most 2047 bytes (EFBIG).

The guest pool (pool 1) is read by the host, through the kernel's conversion to
UTF-16, and that path is narrower: a record that is not valid UTF-8 stops the
host's enumeration of the pool at that record, hiding every later record (EILSEQ
here), and only 254 UTF-16 code units of a key (ENAMETOOLONG) and 1022 of a
value (EFBIG) reach the host.  Those rules apply unless the limits mode is
``"format"``, for setups where the host is not the reader.
"""

from __future__ import annotations

import errno
from typing import Literal

from kvpfs.errors import FsError
from kvpfs.kvp.records import MAX_KEY_BYTES, MAX_VALUE_BYTES

LimitsMode = Literal["host", "format"]

#: UTF-16 code units of a guest-pool key and value that reach the host.
HOST_MAX_KEY_UNITS = 512 // 2 - 2
HOST_MAX_VALUE_UNITS = 2048 // 2 - 2


def utf16_units(text: str) -> int:
    """UTF-16 code units of ``text`` (characters above U+FFFF take two)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _host_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FsError(
            errno.EILSEQ, f"{what} is not valid UTF-8 (the host would stop reading the pool)"
        ) from exc


def check_key(key: bytes, *, host_rules: bool) -> None:
    """Raise the FsError that storing ``key`` gets, if any."""
    if len(key) > MAX_KEY_BYTES:
        raise FsError(errno.ENAMETOOLONG, f"key is {len(key)} bytes, at most {MAX_KEY_BYTES}")
    if b"\0" in key:
        raise FsError(errno.EINVAL, "key contains NUL")
    if host_rules:
        units = utf16_units(_host_text(key, "key"))
        if units > HOST_MAX_KEY_UNITS:
            raise FsError(
                errno.ENAMETOOLONG,
                f"key is {units} UTF-16 units, the host reads at most {HOST_MAX_KEY_UNITS}",
            )


def check_value(value: bytes, *, host_rules: bool) -> None:
    """Raise the FsError that storing ``value`` gets, if any."""
    if len(value) > MAX_VALUE_BYTES:
        raise FsError(errno.EFBIG, f"value is {len(value)} bytes, at most {MAX_VALUE_BYTES}")
    if b"\0" in value:
        raise FsError(errno.EINVAL, "value contains NUL")
    if host_rules:
        units = utf16_units(_host_text(value, "value"))
        if units > HOST_MAX_VALUE_UNITS:
            raise FsError(
                errno.EFBIG,
                f"value is {units} UTF-16 units, the host reads at most {HOST_MAX_VALUE_UNITS}",
            )
