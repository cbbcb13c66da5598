"""The XenStore wire protocol as spoken by Xen 4.17's cxenstored: pure, no I/O.

Like h11, this module only turns bytes into values and back; the client and the
embedded server own the sockets.  It is the one statement of each rule for both: the
server (:mod:`kvpfs.peers.xenstored.store`) parses requests and builds replies with
these functions, so they are written for its hot paths (tables, caches, C-level byte
operations).  Everything on the wire is ``bytes``; functions that
take a path, token or argument also accept ``str`` (encoded as UTF-8, although only
ASCII is ever a valid node name).

Layout:

* framing: :class:`Op`, :class:`Message`, :func:`encode_message`, :class:`Decoder`;
* errors: :data:`XSD_ERRORS`, :func:`errno_for_name`, :func:`name_for_errno`,
  :class:`XenStoreError` (what a failed request is), :class:`ProtocolError` (what
  malformed input is) and :class:`FramingError` (input after which the stream is lost);
* request arguments exactly as cxenstored splits them (:func:`get_strings`,
  :func:`onearg`, ...), and builders/parsers of every request and reply payload;
* node names (:func:`is_valid_nodename`, :func:`canonicalize`, ...);
* permissions (:class:`Perm`, :func:`parse_perm`, :func:`perm_for`, ...);
* C number parsing (:func:`c_strtol`, :func:`c_atoi`) because cxenstored parses
  domain ids and offsets with ``strtol``/``atoi`` and a compatible server must accept
  the same strings.
"""

from __future__ import annotations

import enum
import errno as _errno
import functools
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------- limits

#: Largest payload in either direction (``xs_wire.h``).  A header announcing more makes
#: cxenstored drop the connection.
XENSTORE_PAYLOAD_MAX = 4096
#: Absolute path limit from ``xs_wire.h``.  cxenstored 4.17 never reaches it with its
#: default path quota, but a client may use it as an upper bound.
XENSTORE_ABS_PATH_MAX = 3072
#: Relative path limit; also the default and the cap of cxenstored's ``quota_max_path_len``.
XENSTORE_REL_PATH_MAX = 2048
#: cxenstored's default ``quota_max_path_len`` (``-M`` can only lower it).
DEFAULT_MAX_PATH_LEN = XENSTORE_REL_PATH_MAX

HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size  # 16

_U32_MAX = 0xFFFFFFFF

#: Reply payload of every successful request that returns no data.
OK = b"OK\0"

#: Special watch names (§8.4 of the reference): not nodes, never canonicalised.
INTRODUCE_DOMAIN = b"@introduceDomain"
RELEASE_DOMAIN = b"@releaseDomain"


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type`` of Xen 4.17."""

    CONTROL = 0
    DEBUG = 0  # old name of CONTROL, an alias
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20  # removed; cxenstored answers ENOSYS
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    TYPE_COUNT = 23  # XS_TYPE_COUNT in 4.17: the first number without a handler
    INVALID = 0xFFFF


# --------------------------------------------------------------------------- errors

#: ``xsd_errors[]`` of ``xs_wire.h`` in its order: (wire name, local errno).
XSD_ERRORS: tuple[tuple[str, int], ...] = (
    ("EINVAL", _errno.EINVAL),
    ("EACCES", _errno.EACCES),
    ("EEXIST", _errno.EEXIST),
    ("EISDIR", _errno.EISDIR),
    ("ENOENT", _errno.ENOENT),
    ("ENOMEM", _errno.ENOMEM),
    ("ENOSPC", _errno.ENOSPC),
    ("EIO", _errno.EIO),
    ("ENOTEMPTY", _errno.ENOTEMPTY),
    ("ENOSYS", _errno.ENOSYS),
    ("EROFS", _errno.EROFS),
    ("EBUSY", _errno.EBUSY),
    ("EAGAIN", _errno.EAGAIN),
    ("EISCONN", _errno.EISCONN),
    ("E2BIG", _errno.E2BIG),
    ("EPERM", _errno.EPERM),
)
_ERRNO_BY_NAME = dict(XSD_ERRORS)
_NAME_BY_ERRNO = {num: name for name, num in XSD_ERRORS}


def errno_for_name(name: str | bytes) -> int:
    """The local errno for a wire error name.

    Unknown names give EINVAL, as libxenstore's ``get_error`` does.
    """
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return _ERRNO_BY_NAME.get(name, _errno.EINVAL)


def name_for_errno(err: int) -> str:
    """The wire name for an errno.

    An errno outside the table becomes ``EINVAL``, as cxenstored's ``send_error`` does.
    """
    return _NAME_BY_ERRNO.get(err, "EINVAL")


class XenStoreError(OSError):
    """A XenStore request failed (or could not be made).

    ``errno`` is the local errno; ``name`` is the wire name for errors from the table,
    else the symbolic errno name (``ETIMEDOUT``, ``ECONNRESET`` for client-side
    failures).
    """

    def __init__(self, err: int, message: str | None = None, *, name: str | None = None) -> None:
        super().__init__(err, message or os.strerror(err))
        self.name = name or _NAME_BY_ERRNO.get(err) or _errno.errorcode.get(err, str(err))

    def __str__(self) -> str:
        return f"[{self.name}] {self.strerror}"


class ProtocolError(ValueError):
    """Malformed input.  ``errno`` is the error a server answers with (EINVAL)."""

    def __init__(self, message: str, err: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class FramingError(ProtocolError):
    """The byte stream itself is broken (oversized length); drop the connection."""


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Message:
    """One frame: ``struct xsd_sockmsg`` plus its payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def reply(self, payload: bytes = OK) -> Message:
        """The success reply: same type, same req_id and tx_id."""
        return Message(self.type, self.req_id, self.tx_id, payload)

    def error_reply(self, err: int | str) -> Message:
        """The ``XS_ERROR`` reply (echoing req_id and tx_id) for an errno or wire name."""
        return Message(Op.ERROR, self.req_id, self.tx_id, build_error(err))


#: ``CONTROL kvpfs-embedded``: how kvpfs tells its own embedded xenstored from a real
#: one (cxenstored answers EINVAL, as for any unknown command; ``help`` does not list
#: it, so no other client sees a difference).  A mount must never take another
#: kvpfs's simulation for a real host and run the host's hotplug scripts against it.
EMBEDDED_PROBE = b"kvpfs-embedded"
EMBEDDED_PROBE_REPLY = b"kvpfs\0"


def encode_message(msg: Message) -> bytes:
    """Header (native byte order, as the shared ring does) and payload."""
    if len(msg.payload) > XENSTORE_PAYLOAD_MAX:
        raise ProtocolError(
            f"payload of {len(msg.payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}", _errno.E2BIG
        )
    for field, value in (("type", msg.type), ("req_id", msg.req_id), ("tx_id", msg.tx_id)):
        if not 0 <= value <= _U32_MAX:
            raise ProtocolError(f"{field} {value} does not fit in 32 bits")
    return HEADER.pack(msg.type, msg.req_id, msg.tx_id, len(msg.payload)) + msg.payload


class Decoder:
    """Incremental frame decoder: feed arbitrary chunks, take whole messages.

    After a :class:`FramingError` the stream has no recoverable boundary; the decoder
    keeps raising it, and the owner must close the connection.
    """

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max = max_payload
        self._error: FramingError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message (0 at a frame boundary)."""
        return len(self._buf) - self._pos

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return None
        type_, req_id, tx_id, length = HEADER.unpack_from(self._buf, self._pos)
        if length > self._max:
            self._error = FramingError(
                f"header announces {length} payload bytes, more than {self._max}"
            )
            raise self._error
        if avail < HEADER_SIZE + length:
            return None
        start = self._pos + HEADER_SIZE
        payload = bytes(self._buf[start : start + length])
        self._pos = start + length
        # Compact lazily so that a burst of small frames costs no quadratic copying.
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._buf[: self._pos]
            self._pos = 0
        return Message(type_, req_id, tx_id, payload)

    def __iter__(self) -> Iterator[Message]:
        """Every whole message available now."""
        while (msg := self.next_message()) is not None:
            yield msg

    def check_eof(self) -> None:
        """Call at end of stream: a partial frame left over is a FramingError."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            raise FramingError(f"stream ended inside a frame ({self.buffered} bytes pending)")


# --------------------------------------------------------------------------- C numbers

_C_SPACE = b" \t\n\v\f\r"
_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1


def _digit(c: int) -> int:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 122:
        return c - 87
    if 65 <= c <= 90:
        return c - 55
    return 99


def c_strtol(s: bytes, base: int = 0) -> tuple[int, int]:
    """glibc ``strtol`` on an LP64 host: (value, index of the first unparsed byte).

    Leading whitespace and a sign are accepted; base 0 picks 16 for ``0x``, 8 for a
    leading ``0``, else 10.  Without digits the index is 0 (``endptr == nptr``).
    Overflow clamps to LONG_MIN/LONG_MAX, as strtol does (with ERANGE, which cxenstored
    never checks).
    """
    n = len(s)
    i = 0
    while i < n and s[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and s[i] in b"+-":
        neg = s[i] == 0x2D
        i += 1
    has_hex_prefix = i + 2 < n and s[i] == 0x30 and s[i + 1] in b"xX" and _digit(s[i + 2]) < 16
    if base == 0:
        if has_hex_prefix:
            base = 16
            i += 2
        elif i < n and s[i] == 0x30:
            base = 8
        else:
            base = 10
    elif base == 16 and has_hex_prefix:
        i += 2
    start = i
    value = 0
    while i < n and _digit(s[i]) < base:
        value = value * base + _digit(s[i])
        i += 1
    if i == start:
        return 0, 0
    if neg:
        value = -value
    return max(_LONG_MIN, min(_LONG_MAX, value)), i


def _int32(value: int) -> int:
    value &= _U32_MAX
    return value - (1 << 32) if value >= 1 << 31 else value


def c_atoi(s: bytes) -> int:
    """glibc ``atoi``: ``(int) strtol(s, NULL, 10)``, garbage after the digits ignored.

    cxenstored reads domain ids (GET_DOMAIN_PATH, IS_DOMAIN_INTRODUCED, RELEASE, ...)
    and the DIRECTORY_PART offset this way: ``abc`` is 0, ``0x10`` is 0, and
    ``GET_DOMAIN_PATH "-3"`` answers ``/local/domain/4294967293`` (printed with %u).
    """
    value, _ = c_strtol(s, 10)
    return _int32(value)


# --------------------------------------------------------------------------- arguments


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _arg(value: str | bytes | int) -> bytes:
    data = str(value).encode() if isinstance(value, int) else _b(value)
    if b"\0" in data:
        raise ProtocolError(f"argument {data!r} contains a NUL byte")
    return data


def encode_args(*args: str | bytes | int) -> bytes:
    """``arg\\0arg\\0...``: every argument NUL-terminated (ints in decimal)."""
    parts = [a if type(a) is bytes else _arg(a) for a in args]
    parts.append(b"")  # the last argument's NUL
    data = b"\0".join(parts)
    if data.count(b"\0") != len(args):
        raise ProtocolError(f"an argument of {args!r} contains a NUL byte")
    return data


def count_strings(payload: bytes) -> int:
    """cxenstored's ``xs_count_strings``: the number of NUL bytes."""
    return payload.count(b"\0")


def get_strings(payload: bytes) -> list[bytes]:
    """cxenstored's ``get_strings``: the NUL-terminated strings, in order.

    Bytes after the last NUL are not a string and are ignored, as in cxenstored;
    callers compare ``len()`` with the count the request needs.
    """
    parts = payload.split(b"\0")
    parts.pop()  # after the last NUL: empty or unterminated, never an argument
    return parts


def onearg(payload: bytes) -> bytes:
    """cxenstored's ``onearg``: the payload must be one string, NUL-terminated once.

    Anything else (empty, no NUL, a NUL before the end) raises EINVAL.
    """
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise ProtocolError("request needs exactly one NUL-terminated argument")
    return payload[:-1]


def min_args(payload: bytes, count: int) -> list[bytes]:
    """``get_strings(...) < count`` → EINVAL (INTRODUCE, SET_TARGET, CONTROL)."""
    args = get_strings(payload)
    if len(args) < count:
        raise ProtocolError(f"request needs at least {count} arguments, got {len(args)}")
    return args


# --------------------------------------------------------------------------- requests
# Builders produce exactly what libxenstore sends; parsers reject what cxenstored rejects.


def build_path(path: str | bytes) -> bytes:
    """``path\\0``: READ, DIRECTORY, GET_PERMS, MKDIR, RM."""
    return encode_args(path)


def build_domid(domid: int | str | bytes) -> bytes:
    """``domid\\0``: GET_DOMAIN_PATH, RELEASE, RESUME, IS_DOMAIN_INTRODUCED."""
    return encode_args(domid)


def parse_domid(payload: bytes) -> int:
    """The domain id of a :func:`build_domid` request, read with ``atoi`` as cxenstored
    does (``abc`` is 0); the payload must be one NUL-terminated string."""
    return c_atoi(onearg(payload))


def build_write(path: str | bytes, value: bytes) -> bytes:
    """``path\\0value``: the value is binary and **not** NUL-terminated."""
    return _arg(path) + b"\0" + bytes(value)


def parse_write(payload: bytes) -> tuple[bytes, bytes]:
    """(path, value); everything after the first NUL is the value."""
    nul = payload.find(b"\0")
    if nul < 0:
        raise ProtocolError("WRITE needs a NUL-terminated path")
    return payload[:nul], payload[nul + 1 :]


def build_watch(path: str | bytes, token: str | bytes) -> bytes:
    """``wpath\\0token\\0``: WATCH and UNWATCH."""
    return encode_args(path, token)


def parse_watch(payload: bytes) -> tuple[bytes, bytes]:
    """(path, token).  4.17 rejects a third (depth) argument with EINVAL."""
    # get_strings(payload) must give two strings: two NULs make three parts.
    parts = payload.split(b"\0")
    if len(parts) != 3:
        raise ProtocolError(f"WATCH needs exactly 2 arguments, got {len(parts) - 1}")
    return parts[0], parts[1]


def build_transaction_start() -> bytes:
    """``\0`` as libxenstore sends it; cxenstored 4.17 ignores this payload entirely."""
    return b"\0"


def build_transaction_end(commit: bool) -> bytes:
    return b"T\0" if commit else b"F\0"


def parse_transaction_end(payload: bytes) -> bool:
    """True to commit; anything but ``T\\0``/``F\\0`` is EINVAL."""
    # The same as comparing onearg(payload) with b"T" and b"F", without the call.
    if payload == b"T\0":
        return True
    if payload == b"F\0":
        return False
    raise ProtocolError(f"TRANSACTION_END payload {payload!r} is neither T nor F")


def build_introduce(domid: int, gfn: int, evtchn: int) -> bytes:
    return encode_args(domid, gfn, evtchn)


def parse_introduce(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """The raw (domid, gfn, evtchn) strings; extra arguments are ignored as in 4.17."""
    domid, gfn, evtchn = min_args(payload, 3)[:3]
    return domid, gfn, evtchn


def build_set_target(domid: int, target: int) -> bytes:
    return encode_args(domid, target)


def parse_set_target(payload: bytes) -> tuple[bytes, bytes]:
    domid, target = min_args(payload, 2)[:2]
    return domid, target


def build_directory_part(path: str | bytes, offset: int) -> bytes:
    return encode_args(path, offset)


def parse_directory_part(payload: bytes) -> tuple[bytes, int]:
    """(path, byte offset).  Exactly two NULs; the offset is read with ``atoi``."""
    if count_strings(payload) != 2:
        raise ProtocolError("DIRECTORY_PART needs exactly two arguments")
    path, offset = get_strings(payload)
    return path, c_atoi(offset)


def build_set_perms(path: str | bytes, perms: Iterable[Perm | str | bytes]) -> bytes:
    """``path\\0perm\\0perm\\0...``; at least one permission."""
    items = [p if isinstance(p, Perm) else parse_perm(p) for p in perms]
    if not items:
        raise ProtocolError("SET_PERMS needs at least one permission")
    return encode_args(path, *(p.encode() for p in items))


def parse_set_perms(payload: bytes, max_perms: int | None = None) -> tuple[bytes, tuple[Perm, ...]]:
    """(path, permissions) as ``do_set_perms`` reads them.

    The count is the number of NULs minus one (bytes after the last NUL are ignored);
    fewer than one permission, or any malformed one, is EINVAL.  More than
    ``max_perms`` (the quota of an unprivileged caller) is ENOSPC, checked before the
    permissions are parsed, as cxenstored does.
    """
    num = count_strings(payload) - 1
    if num < 1:
        raise ProtocolError("SET_PERMS needs a path and at least one permission")
    if max_perms is not None and num > max_perms:
        raise ProtocolError(f"{num} permissions, more than {max_perms}", _errno.ENOSPC)
    path, *perms = get_strings(payload)
    return path, tuple([parse_perm(s) for s in perms])


def build_control(command: str | bytes, *args: str | bytes | int) -> bytes:
    return encode_args(command, *args)


def parse_control(payload: bytes) -> tuple[bytes, list[bytes]]:
    args = min_args(payload, 1)
    return args[0], args[1:]


# --------------------------------------------------------------------------- replies


def build_strings(items: Iterable[str | bytes]) -> bytes:
    """``s\\0s\\0...`` (empty for no items): a node's child list as cxenstored
    stores it, which is also the DIRECTORY reply."""
    return encode_args(*items)


def parse_strings(payload: bytes) -> list[bytes]:
    """Inverse of :func:`build_strings`; a non-empty payload must end in NUL."""
    if not payload:
        return []
    if not payload.endswith(b"\0"):
        raise ProtocolError("string list is not NUL-terminated")
    return payload[:-1].split(b"\0")


_ERROR_PAYLOADS = {num: name.encode("ascii") + b"\0" for name, num in XSD_ERRORS}
_EINVAL_PAYLOAD = _ERROR_PAYLOADS[_errno.EINVAL]


def build_error(err: int | str | bytes) -> bytes:
    """``ENAME\\0`` for an errno (unknown ones become EINVAL) or a wire name."""
    if isinstance(err, int):
        return _ERROR_PAYLOADS.get(err, _EINVAL_PAYLOAD)
    return _b(err).decode("ascii").encode("ascii") + b"\0"


def parse_error(payload: bytes) -> XenStoreError:
    """The exception an ``XS_ERROR`` payload stands for."""
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace")
    err = errno_for_name(name)
    return XenStoreError(err, name=name if name in _ERRNO_BY_NAME else None)


def build_watch_event(path: str | bytes, token: str | bytes) -> bytes:
    """``path\\0token\\0``: the path as the watch was set (relative stays relative)."""
    data = _b(path) + b"\0" + _b(token) + b"\0"
    if data.count(b"\0") != 2:
        raise ProtocolError(f"watch path {path!r} or token {token!r} contains a NUL byte")
    return data


def parse_watch_event(payload: bytes) -> tuple[bytes, bytes]:
    """(path, token) of a ``WATCH_EVENT``."""
    strings = get_strings(payload)
    if len(strings) < 2:
        raise ProtocolError("WATCH_EVENT needs a path and a token")
    return strings[0], strings[1]


def build_transaction_id(tx_id: int) -> bytes:
    """``id\\0``: the TRANSACTION_START reply."""
    return b"%d\0" % tx_id


def parse_transaction_id(payload: bytes) -> int:
    text = onearg(payload)
    if not text.isdigit() or not 0 < int(text) <= _U32_MAX:
        raise ProtocolError(f"bad transaction id {text!r}")
    return int(text)


def parse_domain_path(payload: bytes) -> bytes:
    return onearg(payload)


def build_bool(value: bool) -> bytes:
    """``T\\0``/``F\\0``: the IS_DOMAIN_INTRODUCED reply."""
    return b"T\0" if value else b"F\0"


def parse_bool(payload: bytes) -> bool:
    arg = onearg(payload)
    if arg not in (b"T", b"F"):
        raise ProtocolError(f"expected T or F, got {arg!r}")
    return arg == b"T"


def build_directory_part_reply(generation: int, child_list: bytes, offset: int) -> bytes:
    """``send_directory_part`` of 4.17: ``gencnt\\0`` then the chunk from ``offset``.

    ``child_list`` is :func:`build_strings` of the children.  The chunk holds the whole
    strings that fit the payload limit (none, if the first does not); the last chunk
    (also any offset at or past the end) gets one extra NUL, so it ends in a double NUL.
    """
    gen = b"%d\0" % generation
    size = len(child_list)
    # A negative offset (from atoi) is past the end: cxenstored compares it unsigned.
    if offset < 0 or offset >= size:
        return gen + b"\0"
    end = offset + XENSTORE_PAYLOAD_MAX - len(gen) - 1
    if end >= size:
        return gen + child_list[offset:] + b"\0"
    # Up to the last NUL before the limit (with none, rfind's -1 gives an empty chunk).
    return gen + child_list[offset : child_list.rfind(b"\0", offset, end) + 1]


@dataclass(frozen=True, slots=True)
class DirectoryPart:
    """One DIRECTORY_PART reply."""

    generation: int
    children: list[bytes]
    #: Bytes of child list in this chunk: what to add to the offset for the next request.
    size: int
    final: bool


def parse_directory_part_reply(payload: bytes) -> DirectoryPart:
    nul = payload.find(b"\0")
    if nul <= 0 or not payload[:nul].isdigit():
        raise ProtocolError("DIRECTORY_PART reply lacks a generation count")
    generation = int(payload[:nul])
    chunk = payload[nul + 1 :]
    if not chunk.endswith(b"\0"):
        raise ProtocolError("DIRECTORY_PART chunk is not NUL-terminated")
    final = chunk == b"\0" or chunk.endswith(b"\0\0")
    body = chunk[:-1] if final else chunk
    children = body[:-1].split(b"\0") if body else []
    return DirectoryPart(generation, children, len(body), final)


# --------------------------------------------------------------------------- paths

_VALID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@"
#: The bytes a node name may not hold: ``name.translate(None, _INVALID_CHARS)`` drops
#: them, so a name is made of valid characters when that leaves it as long as it was.
_INVALID_CHARS = bytes(c for c in range(256) if c not in _VALID_CHARS)
_LOCAL_DOMAIN = b"/local/domain/"


def domain_path(domid: int) -> bytes:
    """``/local/domain/<domid>``: a domain's home, GET_DOMAIN_PATH's answer.

    cxenstored prints the id unsigned, so -3 (``atoi("-3")``) gives ``.../4294967293``.
    """
    return b"/local/domain/%d" % (domid & _U32_MAX)


def _local_off(path: bytes) -> int:
    """Length of a leading ``/local/domain/<domid>/``, else 0.

    This is ``sscanf(path, "/local/domain/%5u/%n", ...)``: at most five characters for
    the number, an optional sign counting towards them.
    """
    if not path.startswith(_LOCAL_DOMAIN):
        return 0
    i = len(_LOCAL_DOMAIN)
    end = min(len(path), i + 5)
    j = i
    if j < end and path[j] in b"+-":
        j += 1
    digits = j
    while j < end and 48 <= path[j] <= 57:
        j += 1
    if j == digits or j >= len(path) or path[j] != 0x2F:
        return 0
    return j + 1


def is_valid_nodename(path: str | bytes, max_path_len: int = DEFAULT_MAX_PATH_LEN) -> bool:
    """cxenstored 4.17's ``is_valid_nodename`` for an absolute (canonical) path."""
    p = path if type(path) is bytes else _b(path)
    if p[:1] != b"/" or (p[-1:] == b"/" and p != b"/") or b"//" in p:
        return False
    # _local_off only matters for a name longer than the limit.
    if len(p) > max_path_len and len(p) > _local_off(p) + max_path_len:
        return False
    return len(p.translate(None, _INVALID_CHARS)) == len(p)


def is_relative(path: str | bytes) -> bool:
    p = path if type(path) is bytes else _b(path)
    return p[:1] != b"/" and p[:1] != b"@"


def canonicalize(path: str | bytes, home: str | bytes = b"/local/domain/0") -> bytes:
    """``canonicalize``: a relative path is prefixed with ``home/``; others are kept.

    A socket connection's home in cxenstored 4.17 is ``/local/domain/0``.
    """
    p = path if type(path) is bytes else _b(path)
    return _b(home) + b"/" + p if is_relative(p) else p


def relativize(path: str | bytes, home: str | bytes = b"/local/domain/0") -> bytes:
    """Inverse of :func:`canonicalize`: the path a relative watch's events report."""
    p, prefix = _b(path), _b(home) + b"/"
    return p[len(prefix) :] if p.startswith(prefix) else p


@functools.lru_cache(maxsize=4096)
def check_path(
    path: str | bytes,
    home: str | bytes = b"/local/domain/0",
    max_path_len: int = DEFAULT_MAX_PATH_LEN,
) -> bytes:
    """The canonical node name for a node request, or ProtocolError (EINVAL).

    ``@`` names are not nodes: READ/WRITE/... on them is EINVAL.  Cached (the answer
    depends on the arguments alone), since a server validates the same few names
    over and over.
    """
    canonical = canonicalize(path, home)
    if not is_valid_nodename(canonical, max_path_len):
        raise ProtocolError(f"invalid node name {_b(path)!r}")
    return canonical


def check_watch_path(
    path: str | bytes,
    home: str | bytes = b"/local/domain/0",
    max_path_len: int = DEFAULT_MAX_PATH_LEN,
) -> bytes:
    """``check_watch_path``: ``@`` names need only be at most 2048 bytes long (any
    characters); other paths are canonicalised and checked as node names."""
    p = _b(path)
    if p.startswith(b"@"):
        if len(p) > XENSTORE_REL_PATH_MAX:
            raise ProtocolError("special watch name too long")
        return p
    return check_path(p, home, max_path_len)


def is_child(child: str | bytes, parent: str | bytes) -> bool:
    """cxenstored's ``is_child``: equal, or below at a path boundary; all is below ``/``."""
    c, p = _b(child), _b(parent)
    if p == b"/":
        return True
    return c.startswith(p) and (len(c) == len(p) or c[len(p)] == 0x2F)


# --------------------------------------------------------------------------- permissions


class Access(enum.Flag):
    """XS_PERM_* bits (``xs_lib.h``) that a connection may hold on a node."""

    NONE = 0
    READ = 1
    WRITE = 2
    OWNER = 8
    BOTH = READ | WRITE


_LETTER_ACCESS = {
    ord("n"): Access.NONE,
    ord("r"): Access.READ,
    ord("w"): Access.WRITE,
    ord("b"): Access.BOTH,
}
_ACCESS_LETTER = {v: chr(k) for k, v in _LETTER_ACCESS.items()}
_FULL = Access.BOTH | Access.OWNER


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: access letter and domain id, e.g. ``r5``.

    The id is kept as cxenstored shows it: a signed 32-bit number (any 32-bit value
    is accepted and folded into that range).
    """

    access: Access
    domid: int

    def __post_init__(self) -> None:
        if self.access not in _ACCESS_LETTER:
            raise ProtocolError(f"{self.access!r} has no permission letter")
        if not -(1 << 31) <= self.domid <= _U32_MAX:
            raise ProtocolError(f"domain id {self.domid} does not fit in 32 bits")
        # cxenstored keeps the id in 32 bits and prints it with %i: 4294967295 is -1.
        object.__setattr__(self, "domid", _int32(self.domid))

    @property
    def letter(self) -> str:
        return _ACCESS_LETTER[self.access]

    def __str__(self) -> str:
        return f"{self.letter}{self.domid}"

    def encode(self) -> bytes:
        return str(self).encode("ascii")


@functools.lru_cache(maxsize=1024)
def parse_perm(text: str | bytes) -> Perm:
    """One permission as ``xs_strings_to_perms`` reads it.

    A letter of ``rwbn`` then an id parsed with ``strtol(..., 0)`` that must consume the
    rest: ``n0x10`` is ``n16``, ``r010`` is ``r8``, ``r 5`` and ``r+5`` are ``r5``;
    ``n``, ``n5x``, ``n08``, ``r5 `` and ``q5`` are EINVAL.  cxenstored keeps the low 32
    bits and prints them signed, so ``r-1`` stays ``r-1`` and ``n99999999999`` becomes
    ``n1215752191`` (checked against cxenstored 4.17).  Cached: a :class:`Perm` is
    immutable, and a few texts make up nearly every permission list.
    """
    s = _b(text)
    if not s or s[0] not in _LETTER_ACCESS or b"\0" in s:
        raise ProtocolError(f"invalid permission {s!r}")
    rest = s[1:]
    value, end = c_strtol(rest, 0)
    if not rest or end != len(rest):
        raise ProtocolError(f"invalid permission {s!r}")
    return Perm(_LETTER_ACCESS[s[0]], _int32(value))


def parse_perms(items: Iterable[str | bytes]) -> list[Perm]:
    perms = [parse_perm(i) for i in items]
    if not perms:
        raise ProtocolError("a permission list needs at least one entry")
    return perms


def format_perms(perms: Iterable[Perm]) -> bytes:
    """GET_PERMS reply payload: ``n0\\0r1\\0``."""
    return b"".join([p.encode() + b"\0" for p in perms])


def perm_for(
    domid: int,
    perms: Sequence[Perm],
    *,
    privileged: bool | None = None,
    target: int | None = None,
) -> Access:
    """``perm_for_conn``: the access ``domid`` has on a node with ``perms``.

    The first entry is the owner.  Privileged connections (by default dom0, which
    includes local socket connections), the owner, and a domain whose target is the
    owner get READ|WRITE|OWNER.  Otherwise the first later entry naming ``domid`` (or
    its target) applies, else the owner's letter.
    """
    if privileged is None:
        privileged = domid == 0
    if privileged:
        return _FULL
    if not perms:
        return Access.NONE
    owner = perms[0].domid
    if owner == domid or (target is not None and owner == target):
        return _FULL
    for p in perms[1:]:
        if p.domid == domid or (target is not None and p.domid == target):
            return p.access
    return perms[0].access


def parse_perms_text(text: str) -> list[Perm]:
    """Parse ``(n0,r1)``, ``n0,r1`` or ``n0 r1`` (xenstore-ls -p / xenstore-chmod)."""
    body = text.strip()
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1]
    items = [i for i in body.replace(",", " ").split() if i]
    return parse_perms(items)
