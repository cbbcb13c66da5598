"""``struct hv_kvp_msg`` and the kernel's conversions around it, as pure functions.

Three parties take part in a KVP exchange on a Hyper-V guest:

* the **host** speaks UTF-16 (strings up to its 512- and 2048-byte fields);
* the **kernel** (``hv_kvp.c`` with its character device ``/dev/vmbus/hv_kvp``)
  converts every host request to UTF-8, hands it to the daemon as one 7432-byte
  ``struct hv_kvp_msg``, and converts the daemon's reply back to UTF-16;
* **hv_kvp_daemon** reads requests and writes replies of exactly that size.

This module is the byte layout of the daemon-side message (:func:`encode`,
:func:`decode_request`, :func:`decode_reply`), the host's side of an IP request
(``struct hv_kvp_ip_msg``: :func:`encode_host_ip`, :func:`decode_host_ip`) and the
kernel's two conversions (:func:`kernel_request`, :func:`kernel_reply`), with their
exact truncation and error rules.  No I/O: :mod:`kvpfs.peers.hyperv.device` runs it.

Layout (integers little-endian ``u32`` unless noted; the header is overlaid by the
reply's ``int error``)::

    0   u8 operation, u8 pool, u16 pad      |  u32 error (in a reply)
    SET, GET       value_type@4 key_size@8 value_size@12 key[512]@16 value[2048]@528
    DELETE         key_size@4 key[512]@8
    ENUMERATE      index@4 value_type@8 key_size@12 value_size@16 key[512]@20 value[2048]@532
    REGISTER       version[512]@4
    GET/SET_IP_INFO adapter_id[256]@4 addr_family(u8)@260 dhcp_enabled(u8)@261
                   ip_addr[2048]@262 sub_net[2048]@2310 gate_way[1024]@4358 dns_addr[2048]@5382

Sizes count the terminating NUL.  Field contents are C strings: everything up to
the first NUL counts, the bytes after it do not.

The conversion rules, both ways:

* host → daemon (:func:`utf16_to_utf8`): at most 511 UTF-8 bytes of key and 2047
  of value.  A character that does not fit in what is left is *skipped*, not cut,
  so a later, shorter character may still make it; unpaired surrogates vanish.
* daemon → host (:func:`utf8_to_utf16`): at most 254 UTF-16 units of key and
  1022 of value, a clean prefix.  Invalid UTF-8 met before the limit fails the
  whole reply with ``HV_E_FAIL``, which ends the host's enumeration of the pool.

IP requests (``process_ib_ipinfo`` / ``process_ob_ipinfo`` in ``hv_kvp.c``) carry
``struct hv_kvp_ipaddr_value``.  On the host's side (:class:`IpValue`) its strings
are UTF-16 arrays of 128 (adapter id), 1024 (addresses, subnets, DNS) and 512
(gateways) units; the kernel converts them for the daemon into UTF-8 in the same
arrays, at most 128, 1024 and 512 bytes.  A GET_IP_INFO passes only the adapter
id and ``addr_family``; a SET_IP_INFO passes everything.  The daemon's answer to
a GET goes back the same way (at most 1024/1024/512/1024 units, the adapter id
too), written over the host's own request, together with ``dhcp_enabled`` and
``addr_family``; invalid UTF-8 makes it ``HV_E_FAIL``.  A SET's answer is the
status alone.  Lists inside the strings are separated by ``;``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

#: ``sizeof(struct hv_kvp_msg)``: every read and write of the device is this long.
MSG_SIZE = 7432
KEY_FIELD_SIZE = 512
VALUE_FIELD_SIZE = 2048
VERSION_FIELD_SIZE = 512

#: The kernel's caps when it converts host strings for the daemon (a NUL follows).
DAEMON_MAX_KEY_BYTES = KEY_FIELD_SIZE - 1
DAEMON_MAX_VALUE_BYTES = VALUE_FIELD_SIZE - 1
#: The kernel's caps when it converts the daemon's strings for the host.
HOST_MAX_KEY_UNITS = KEY_FIELD_SIZE // 2 - 2
HOST_MAX_VALUE_UNITS = VALUE_FIELD_SIZE // 2 - 2
#: What the host's own UTF-16 fields can carry, NUL included.
HOST_FIELD_KEY_UNITS = KEY_FIELD_SIZE // 2 - 1
HOST_FIELD_VALUE_UNITS = VALUE_FIELD_SIZE // 2 - 1

#: The version string the kernel sends in its registration answer.
KERNEL_VERSION = b"3.1"

# IP-info field sizes in UTF-16 units (the daemon-side strings are UTF-8 in the
# same arrays, at most this many bytes).
MAX_ADAPTER_ID_SIZE = 128
MAX_IP_ADDR_SIZE = 1024
MAX_GATEWAY_SIZE = 512


class Op(enum.IntEnum):
    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5
    COUNT = 6
    REGISTER1 = 100


#: The legacy registration shares its number with GET_IP_INFO.
OP_REGISTER = 4
REGISTRATION_OPS = frozenset({OP_REGISTER, Op.REGISTER1})


class Pool(enum.IntEnum):
    EXTERNAL = 0
    GUEST = 1
    AUTO = 2
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4


class Status(enum.IntEnum):
    OK = 0x00000000
    E_FAIL = 0x80004005
    S_CONT = 0x80070103
    NOT_SUPPORTED = 0x80070032
    MACHINE_LOCKED = 0x800704F7
    DEVICE_NOT_CONNECTED = 0x8007048F
    INVALIDARG = 0x80070057
    GUID_NOTFOUND = 0x80041002
    ALREADY_EXISTS = 0x80070050
    DISK_FULL = 0x80070070


REG_SZ = 1
REG_U32 = 4
REG_U64 = 8

ADDR_FAMILY_NONE = 0
ADDR_FAMILY_IPV4 = 1
ADDR_FAMILY_IPV6 = 2

_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<BBH")
_KV = struct.Struct("<III")  # value_type, key_size, value_size

_KV_AT = 4
_KV_KEY_AT = 16
_KV_VALUE_AT = 528
_DEL_SIZE_AT = 4
_DEL_KEY_AT = 8
_ENUM_INDEX_AT = 4
_ENUM_KV_AT = 8
ENUM_KEY_AT = 20
ENUM_VALUE_AT = 532
_VERSION_AT = 4
_IP_ADAPTER_AT = 4
_IP_FAMILY_AT = 260
_IP_DHCP_AT = 261
_IP_ADDR_AT = 262
_IP_SUBNET_AT = 2310
_IP_GATEWAY_AT = 4358
_IP_DNS_AT = 5382


class MessageError(ValueError):
    """Bytes that are not a message, or a field that does not fit its slot."""


# -- daemon-side messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValueMessage:
    """SET or GET (``op``): the fields of ``struct hv_kvp_exchg_msg_value``.

    ``key`` and ``value`` are field contents (without NUL); the sizes are stored as
    given, so a message can claim sizes its fields do not have (the daemon checks
    them, not the strings).
    """

    op: int
    pool: int
    key: bytes = b""
    value: bytes = b""
    key_size: int = 0
    value_size: int = 0
    value_type: int = 0


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    pool: int
    key: bytes = b""
    key_size: int = 0
    op: int = Op.DELETE


@dataclass(frozen=True, slots=True)
class EnumerateMessage:
    pool: int
    index: int = 0
    key: bytes = b""
    value: bytes = b""
    key_size: int = 0
    value_size: int = 0
    value_type: int = 0
    op: int = Op.ENUMERATE


@dataclass(frozen=True, slots=True)
class RegisterMessage:
    """A registration (op 100, or the legacy 4) and the kernel's answer to it."""

    op: int = Op.REGISTER1
    version: bytes = b""
    pool: int = 0


@dataclass(frozen=True, slots=True)
class IpInfoMessage:
    """GET_IP_INFO / SET_IP_INFO (``struct hv_kvp_ipaddr_value``), daemon side (UTF-8)."""

    op: int
    pool: int = 0
    adapter_id: bytes = b""
    addr_family: int = ADDR_FAMILY_NONE
    dhcp_enabled: int = 0
    ip_addr: bytes = b""
    sub_net: bytes = b""
    gate_way: bytes = b""
    dns_addr: bytes = b""


@dataclass(frozen=True, slots=True)
class OtherMessage:
    """An operation the daemon does not know: header only."""

    op: int
    pool: int = 0


Message = (
    KeyValueMessage
    | DeleteMessage
    | EnumerateMessage
    | RegisterMessage
    | IpInfoMessage
    | OtherMessage
)


def cstring(data: bytes | bytearray | memoryview, start: int, end: int | None = None) -> bytes:
    """The C string at ``start``: bytes up to the first NUL before ``end``.

    Without ``end`` the string may run to the end of the buffer, as ``strlen`` on a
    field that lacks its NUL runs into the next field.
    """
    raw = bytes(data[start:end])
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _put(buf: bytearray, at: int, size: int, content: bytes, what: str) -> None:
    if len(content) > size:
        raise MessageError(f"{what} is {len(content)} bytes, its field holds {size}")
    buf[at : at + len(content)] = content


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise MessageError(f"{what} {value} does not fit a u32")
    return value


def encode(message: Message, *, error: int | None = None) -> bytes:
    """The 7432 bytes of ``message``; with ``error`` the header is that status (a reply)."""
    buf = bytearray(MSG_SIZE)
    if not (0 <= message.op <= 0xFF and 0 <= message.pool <= 0xFF):
        raise MessageError(f"operation {message.op} or pool {message.pool} is not a u8")
    _HEADER.pack_into(buf, 0, message.op, message.pool, 0)
    if isinstance(message, KeyValueMessage):
        _KV.pack_into(
            buf,
            _KV_AT,
            _u32(message.value_type, "value_type"),
            _u32(message.key_size, "key_size"),
            _u32(message.value_size, "value_size"),
        )
        _put(buf, _KV_KEY_AT, KEY_FIELD_SIZE, message.key, "key")
        _put(buf, _KV_VALUE_AT, VALUE_FIELD_SIZE, message.value, "value")
    elif isinstance(message, DeleteMessage):
        _U32.pack_into(buf, _DEL_SIZE_AT, _u32(message.key_size, "key_size"))
        _put(buf, _DEL_KEY_AT, KEY_FIELD_SIZE, message.key, "key")
    elif isinstance(message, EnumerateMessage):
        _U32.pack_into(buf, _ENUM_INDEX_AT, _u32(message.index, "index"))
        _KV.pack_into(
            buf,
            _ENUM_KV_AT,
            _u32(message.value_type, "value_type"),
            _u32(message.key_size, "key_size"),
            _u32(message.value_size, "value_size"),
        )
        _put(buf, ENUM_KEY_AT, KEY_FIELD_SIZE, message.key, "key")
        _put(buf, ENUM_VALUE_AT, VALUE_FIELD_SIZE, message.value, "value")
    elif isinstance(message, RegisterMessage):
        _put(buf, _VERSION_AT, VERSION_FIELD_SIZE, message.version, "version")
    elif isinstance(message, IpInfoMessage):
        if not (0 <= message.addr_family <= 0xFF and 0 <= message.dhcp_enabled <= 0xFF):
            raise MessageError("addr_family and dhcp_enabled are u8")
        _put(buf, _IP_ADAPTER_AT, 2 * MAX_ADAPTER_ID_SIZE, message.adapter_id, "adapter_id")
        buf[_IP_FAMILY_AT] = message.addr_family
        buf[_IP_DHCP_AT] = message.dhcp_enabled
        _put(buf, _IP_ADDR_AT, 2 * MAX_IP_ADDR_SIZE, message.ip_addr, "ip_addr")
        _put(buf, _IP_SUBNET_AT, 2 * MAX_IP_ADDR_SIZE, message.sub_net, "sub_net")
        _put(buf, _IP_GATEWAY_AT, 2 * MAX_GATEWAY_SIZE, message.gate_way, "gate_way")
        _put(buf, _IP_DNS_AT, 2 * MAX_IP_ADDR_SIZE, message.dns_addr, "dns_addr")
    if error is not None:
        _U32.pack_into(buf, 0, _u32(error, "error"))
    return bytes(buf)


def _check_size(data: bytes | bytearray | memoryview) -> None:
    if len(data) != MSG_SIZE:
        raise MessageError(f"a message is {MSG_SIZE} bytes, not {len(data)}")


def _body(op: int, pool: int, data: bytes | bytearray | memoryview) -> Message:
    if op in (Op.SET, Op.GET):
        value_type, key_size, value_size = _KV.unpack_from(data, _KV_AT)
        return KeyValueMessage(
            op,
            pool,
            cstring(data, _KV_KEY_AT, _KV_KEY_AT + KEY_FIELD_SIZE),
            cstring(data, _KV_VALUE_AT, _KV_VALUE_AT + VALUE_FIELD_SIZE),
            key_size,
            value_size,
            value_type,
        )
    if op == Op.DELETE:
        (key_size,) = _U32.unpack_from(data, _DEL_SIZE_AT)
        key = cstring(data, _DEL_KEY_AT, _DEL_KEY_AT + KEY_FIELD_SIZE)
        return DeleteMessage(pool, key, key_size)
    if op == Op.ENUMERATE:
        (index,) = _U32.unpack_from(data, _ENUM_INDEX_AT)
        value_type, key_size, value_size = _KV.unpack_from(data, _ENUM_KV_AT)
        return EnumerateMessage(
            pool,
            index,
            cstring(data, ENUM_KEY_AT, ENUM_KEY_AT + KEY_FIELD_SIZE),
            cstring(data, ENUM_VALUE_AT, ENUM_VALUE_AT + VALUE_FIELD_SIZE),
            key_size,
            value_size,
            value_type,
        )
    if op in (Op.GET_IP_INFO, Op.SET_IP_INFO):
        return IpInfoMessage(
            op,
            pool,
            cstring(data, _IP_ADAPTER_AT, _IP_FAMILY_AT),
            data[_IP_FAMILY_AT],
            data[_IP_DHCP_AT],
            cstring(data, _IP_ADDR_AT, _IP_SUBNET_AT),
            cstring(data, _IP_SUBNET_AT, _IP_GATEWAY_AT),
            cstring(data, _IP_GATEWAY_AT, _IP_DNS_AT),
            cstring(data, _IP_DNS_AT, _IP_DNS_AT + 2 * MAX_IP_ADDR_SIZE),
        )
    if op == Op.REGISTER1:
        return _registration(op, pool, data)
    return OtherMessage(op, pool)


def _registration(op: int, pool: int, data: bytes | bytearray | memoryview) -> RegisterMessage:
    return RegisterMessage(op, cstring(data, _VERSION_AT, _VERSION_AT + VERSION_FIELD_SIZE), pool)


def decode_request(data: bytes | bytearray | memoryview, *, registration: bool = False) -> Message:
    """A message whose header holds operation and pool (a request, or a registration).

    Operation 4 is GET_IP_INFO, except in the handshake (``registration``), where it
    is the legacy registration.
    """
    _check_size(data)
    op, pool, _ = _HEADER.unpack_from(data, 0)
    if registration and op in REGISTRATION_OPS:
        return _registration(op, pool, data)
    return _body(op, pool, data)


@dataclass(frozen=True, slots=True)
class Reply:
    """A daemon's reply: the status in the header, the body laid out as for ``op``."""

    status: int
    body: Message


def decode_reply(data: bytes | bytearray | memoryview, op: int, pool: int = 0) -> Reply:
    """The daemon's reply to a request of operation ``op`` (the header is the status)."""
    _check_size(data)
    (status,) = _U32.unpack_from(data, 0)
    return Reply(status, _body(op, pool, data))


# -- the kernel's string conversions ---------------------------------------------------


class ConversionError(ValueError):
    """The kernel's utf8s_to_utf16s failed (invalid UTF-8 before the limit)."""


_SURROGATE_LOW = 0xDC00


def _is_surrogate(unit: int) -> bool:
    return 0xD800 <= unit <= 0xDFFF


def utf16_units(text: str) -> list[int]:
    """The UTF-16 code units of ``text`` (lone surrogates kept as they are)."""
    raw = text.encode("utf-16-le", "surrogatepass")
    return list(struct.unpack(f"<{len(raw) // 2}H", raw))


def units_to_str(units: Sequence[int]) -> str:
    return struct.pack(f"<{len(units)}H", *units).decode("utf-16-le", "surrogatepass")


def utf16_to_utf8(units: Sequence[int], maxout: int) -> bytes:
    """The kernel's ``utf16s_to_utf8s`` with ``maxout`` output bytes.

    Stops at a NUL unit.  A surrogate pair becomes one 4-byte character; an unpaired
    low surrogate is dropped, an unpaired high one is dropped unless it is the last
    unit (then conversion stops).  A character longer than the room left is dropped
    and conversion goes on, so a later shorter character can still be stored.
    """
    out = bytearray()
    room = maxout
    i = 0
    n = len(units)
    while i < n and room > 0:
        unit = units[i]
        if unit == 0:
            break
        i += 1
        if unit <= 0x7F:
            out.append(unit)
            room -= 1
            continue
        code = unit
        if _is_surrogate(unit):
            if unit >= _SURROGATE_LOW:
                continue
            if i >= n:
                break
            low = units[i]
            if not (_SURROGATE_LOW <= low <= 0xDFFF):
                continue
            code = 0x10000 + ((unit - 0xD800) << 10) + (low - _SURROGATE_LOW)
            i += 1
        encoded = chr(code).encode("utf-8")
        if len(encoded) <= room:
            out += encoded
            room -= len(encoded)
    return bytes(out)


def _utf8_sequence_length(lead: int) -> int:
    """Bytes of the sequence that ``lead`` starts in the kernel's table (0: none)."""
    for length, mask, prefix in (
        (2, 0xE0, 0xC0),
        (3, 0xF0, 0xE0),
        (4, 0xF8, 0xF0),
        (5, 0xFC, 0xF8),
        (6, 0xFE, 0xFC),
    ):
        if lead & mask == prefix:
            return length
    return 0


_MIN_CODE = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}


def _decode_one(data: bytes, at: int) -> tuple[int, int]:
    """(code point, length) of the multi-byte sequence at ``at``; ConversionError if bad."""
    length = _utf8_sequence_length(data[at])
    if length == 0 or at + length > len(data):
        raise ConversionError(f"invalid UTF-8 at byte {at}")
    code = data[at] & (0x7F >> length)
    for byte in data[at + 1 : at + length]:
        if byte & 0xC0 != 0x80:
            raise ConversionError(f"invalid UTF-8 at byte {at}")
        code = (code << 6) | (byte & 0x3F)
    if code < _MIN_CODE[length] or code > 0x10FFFF or _is_surrogate(code):
        raise ConversionError(f"invalid UTF-8 at byte {at}")
    return code, length


def utf8_to_utf16(data: bytes, maxout: int) -> list[int]:
    """The kernel's ``utf8s_to_utf16s`` on the C string ``data``, ``maxout`` units.

    A clean prefix: a character that does not fit ends the conversion.  Invalid
    UTF-8 met before the limit is a :class:`ConversionError`; after it, unseen.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    units: list[int] = []
    at = 0
    n = len(data)
    while at < n and len(units) < maxout:
        byte = data[at]
        if byte <= 0x7F:
            units.append(byte)
            at += 1
            continue
        code, length = _decode_one(data, at)
        at += length
        if code >= 0x10000:
            if maxout - len(units) < 2:
                break
            code -= 0x10000
            units += (0xD800 | (code >> 10), _SURROGATE_LOW | (code & 0x3FF))
        else:
            units.append(code)
    return units


# -- host requests and the kernel in between ---------------------------------------------


@dataclass(frozen=True, slots=True)
class HostRequest:
    """A request as the host sends it: strings are UTF-16 (Python ``str``, lone
    surrogates allowed), an integer value goes as REG_U32 or REG_U64."""

    op: int
    pool: int
    key: str = ""
    value: str | int = ""
    value_type: int = REG_SZ
    index: int = 0


@dataclass(frozen=True, slots=True)
class HostReply:
    """What the kernel sends back to the host."""

    status: int
    #: ENUMERATE: the key as the host receives it; None otherwise or on failure.
    key: str | None = None
    #: ENUMERATE and GET: the value as the host receives it.
    value: str | None = None
    #: GET_IP_INFO: the host's buffer after the kernel wrote the daemon's answer in.
    ip: IpValue | None = None


def _host_string(text: str) -> list[int]:
    # The host's field is NUL-terminated: the kernel's conversion stops there.
    return utf16_units(text)


def host_value_text(request: HostRequest) -> bytes:
    """The UTF-8 value bytes the daemon receives for a SET (kernel conversion)."""
    value = request.value
    if request.value_type == REG_SZ:
        if not isinstance(value, str):
            raise MessageError("a REG_SZ value is a string")
        return utf16_to_utf8(_host_string(value), DAEMON_MAX_VALUE_BYTES)
    if request.value_type in (REG_U32, REG_U64):
        if not isinstance(value, int):
            raise MessageError("a REG_U32/REG_U64 value is an integer")
        bits = 32 if request.value_type == REG_U32 else 64
        return str(value & ((1 << bits) - 1)).encode("ascii")
    # Any other type: the kernel fills in no value at all.
    return b""


def delivered(request: HostRequest) -> tuple[bytes, bytes]:
    """(key, value) as UTF-8 bytes after the kernel's conversion for the daemon."""
    key = utf16_to_utf8(_host_string(request.key), DAEMON_MAX_KEY_BYTES)
    value = host_value_text(request) if request.op == Op.SET else b""
    return key, value


def kernel_request(request: HostRequest | HostIpRequest) -> bytes:
    """The message the kernel queues for the daemon, built as ``kvp_send_key`` does.

    The buffer starts zeroed; only operation, pool and the fields of the operation
    are filled in (``value_type`` stays 0: the kernel does not pass it on).
    """
    op, pool = request.op, request.pool
    message: Message
    if isinstance(request, HostIpRequest):
        message = delivered_ip(request)
    elif op == Op.SET:
        key, value = delivered(request)
        known = request.value_type in (REG_SZ, REG_U32, REG_U64)
        message = KeyValueMessage(
            op, pool, key, value, len(key) + 1, len(value) + 1 if known else 0
        )
    elif op == Op.GET:
        key, _ = delivered(request)
        message = KeyValueMessage(op, pool, key, key_size=len(key) + 1)
    elif op == Op.DELETE:
        key, _ = delivered(request)
        message = DeleteMessage(pool, key, len(key) + 1)
    elif op == Op.ENUMERATE:
        message = EnumerateMessage(pool, request.index)
    else:
        message = OtherMessage(op, pool)
    return encode(message)


def kernel_reply(
    op: int,
    data: bytes | bytearray | memoryview,
    *,
    legacy: bool = False,
    request: HostRequest | HostIpRequest | None = None,
) -> HostReply:
    """What the host gets for the daemon's reply ``data`` to a request of ``op``.

    As ``kvp_on_msg`` + ``kvp_respond_to_host``: the status is the header (a legacy
    daemon, registered with op 4, signals failure by an empty key instead); a failed
    request carries nothing else; SET, DELETE and SET_IP_INFO carry only the status;
    ENUMERATE converts key and value to UTF-16 (254 and 1022 units), and GET the
    value, read at the ENUMERATE offset, which leaves a GET's answer empty in
    practice.  GET_IP_INFO converts the ``struct hv_kvp_ipaddr_value`` over the
    host's ``request`` (:func:`host_ip_reply`).
    """
    _check_size(data)
    if legacy:
        status = int(Status.S_CONT) if data[ENUM_KEY_AT] == 0 else int(Status.OK)
    else:
        (status,) = _U32.unpack_from(data, 0)
    if status == Status.OK and op == Op.GET_IP_INFO:
        host_request = request if isinstance(request, HostIpRequest) else HostIpRequest(op)
        try:
            return HostReply(status, ip=host_ip_reply(host_request, data))
        except ConversionError:
            return HostReply(int(Status.E_FAIL))
    if status != Status.OK or op in (Op.SET, Op.DELETE, Op.SET_IP_INFO, Op.GET_IP_INFO):
        return HostReply(status)
    try:
        key = None
        if op != Op.GET:
            key = units_to_str(utf8_to_utf16(cstring(data, ENUM_KEY_AT), HOST_MAX_KEY_UNITS))
        value = units_to_str(utf8_to_utf16(cstring(data, ENUM_VALUE_AT), HOST_MAX_VALUE_UNITS))
    except ConversionError:
        return HostReply(int(Status.E_FAIL))
    return HostReply(status, key, value)


# -- IP information: struct hv_kvp_ipaddr_value ---------------------------------------------

#: ``sizeof(struct hv_kvp_ip_msg)``: operation, pool and the value, on the host's side.
HOST_IP_MSG_SIZE = 2 + 2 * MAX_ADAPTER_ID_SIZE + 2 + 2 * (3 * MAX_IP_ADDR_SIZE + MAX_GATEWAY_SIZE)


@dataclass(frozen=True, slots=True)
class IpValue:
    """``struct hv_kvp_ipaddr_value`` as the host fills and reads it.

    Strings are the host's UTF-16 (Python ``str``, lone surrogates allowed), each
    cut at its first NUL; lists inside them are separated by ``;``.
    ``addr_family`` is a mask of ``ADDR_FAMILY_IPV4`` and ``ADDR_FAMILY_IPV6``.
    """

    adapter_id: str = ""
    addr_family: int = ADDR_FAMILY_NONE
    dhcp_enabled: int = 0
    ip_addr: str = ""
    sub_net: str = ""
    gate_way: str = ""
    dns_addr: str = ""


@dataclass(frozen=True, slots=True)
class HostIpRequest:
    """A GET_IP_INFO or SET_IP_INFO as the host sends it."""

    op: int
    value: IpValue = IpValue()
    pool: int = 0


# Host side, in bytes from the start of struct hv_kvp_ip_msg: (field, offset, units).
_HOST_IP_ADAPTER = ("adapter_id", 2, MAX_ADAPTER_ID_SIZE)
_HOST_IP_FAMILY_AT = 2 + 2 * MAX_ADAPTER_ID_SIZE
_HOST_IP_DHCP_AT = _HOST_IP_FAMILY_AT + 1
_HOST_IP_STRINGS = (
    _HOST_IP_ADAPTER,
    ("ip_addr", _HOST_IP_DHCP_AT + 1, MAX_IP_ADDR_SIZE),
    ("sub_net", _HOST_IP_DHCP_AT + 1 + 2 * MAX_IP_ADDR_SIZE, MAX_IP_ADDR_SIZE),
    ("gate_way", _HOST_IP_DHCP_AT + 1 + 4 * MAX_IP_ADDR_SIZE, MAX_GATEWAY_SIZE),
    (
        "dns_addr",
        _HOST_IP_DHCP_AT + 1 + 4 * MAX_IP_ADDR_SIZE + 2 * MAX_GATEWAY_SIZE,
        MAX_IP_ADDR_SIZE,
    ),
)
#: Daemon side: where the same strings sit in struct hv_kvp_msg (the kernel's inbound
#: conversion writes at most as many UTF-8 bytes as the host's field has units).
_DAEMON_IP_AT = {
    "adapter_id": _IP_ADAPTER_AT,
    "ip_addr": _IP_ADDR_AT,
    "sub_net": _IP_SUBNET_AT,
    "gate_way": _IP_GATEWAY_AT,
    "dns_addr": _IP_DNS_AT,
}
#: How many UTF-16 units the outbound conversion may write (process_ob_ipinfo): the
#: adapter id gets MAX_IP_ADDR_SIZE, more than its own field holds.
_OUTBOUND_UNITS = {
    "adapter_id": MAX_IP_ADDR_SIZE,
    "ip_addr": MAX_IP_ADDR_SIZE,
    "sub_net": MAX_IP_ADDR_SIZE,
    "gate_way": MAX_GATEWAY_SIZE,
    "dns_addr": MAX_IP_ADDR_SIZE,
}


def ip_field_units(name: str) -> int:
    """How many UTF-16 units the host's field ``name`` holds (NUL included)."""
    for field_name, _, units in _HOST_IP_STRINGS:
        if field_name == name:
            return units
    raise KeyError(name)


def encode_host_ip(request: HostIpRequest) -> bytes:
    """The host's ``struct hv_kvp_ip_msg``: 7428 bytes, strings in UTF-16LE.

    A string may fill its whole field (then it has no NUL); a longer one is a
    :class:`MessageError`.
    """
    value = request.value
    if not (0 <= request.op <= 0xFF and 0 <= request.pool <= 0xFF):
        raise MessageError(f"operation {request.op} or pool {request.pool} is not a u8")
    if not (0 <= value.addr_family <= 0xFF and 0 <= value.dhcp_enabled <= 0xFF):
        raise MessageError("addr_family and dhcp_enabled are u8")
    buf = bytearray(HOST_IP_MSG_SIZE)
    buf[0], buf[1] = request.op, request.pool
    buf[_HOST_IP_FAMILY_AT] = value.addr_family
    buf[_HOST_IP_DHCP_AT] = value.dhcp_enabled
    for name, at, units in _HOST_IP_STRINGS:
        raw = getattr(value, name).encode("utf-16-le", "surrogatepass")
        _put(buf, at, 2 * units, raw, name)
    return bytes(buf)


def _units_at(data: bytes | bytearray, at: int, units: int) -> list[int]:
    found = struct.unpack_from(f"<{units}H", data, at)
    end = found.index(0) if 0 in found else units
    return list(found[:end])


def decode_host_ip(data: bytes | bytearray | memoryview) -> HostIpRequest:
    """The host's view of a ``struct hv_kvp_ip_msg``: each string up to its NUL."""
    if len(data) != HOST_IP_MSG_SIZE:
        raise MessageError(f"a host IP message is {HOST_IP_MSG_SIZE} bytes, not {len(data)}")
    raw = bytes(data)
    strings = {
        name: units_to_str(_units_at(raw, at, units)) for name, at, units in _HOST_IP_STRINGS
    }
    value = IpValue(
        addr_family=raw[_HOST_IP_FAMILY_AT], dhcp_enabled=raw[_HOST_IP_DHCP_AT], **strings
    )
    return HostIpRequest(raw[0], value, raw[1])


def _host_units(text: str, units: int, name: str) -> list[int]:
    found = utf16_units(text)
    if len(found) > units:
        raise MessageError(f"{name} is {len(found)} UTF-16 units, its field holds {units}")
    return found


def delivered_ip(request: HostIpRequest) -> IpInfoMessage:
    """What the daemon receives for a host IP request (``process_ib_ipinfo``).

    The kernel converts the host's fields with ``utf16s_to_utf8s(field, MAX units,
    ..., MAX bytes)`` into a zeroed message: a GET_IP_INFO carries the adapter id
    (at most 128 bytes) and ``addr_family``; a SET_IP_INFO also the addresses,
    subnets and DNS servers (1024 bytes each), the gateways (512) and
    ``dhcp_enabled``.  Any other operation gets the header alone.
    """
    value = request.value
    converted = {
        name: utf16_to_utf8(_host_units(getattr(value, name), units, name), units)
        for name, _, units in _HOST_IP_STRINGS
    }
    if request.op == Op.GET_IP_INFO:
        return IpInfoMessage(request.op, request.pool, converted["adapter_id"], value.addr_family)
    if request.op == Op.SET_IP_INFO:
        return IpInfoMessage(
            request.op,
            request.pool,
            converted["adapter_id"],
            value.addr_family,
            value.dhcp_enabled,
            converted["ip_addr"],
            converted["sub_net"],
            converted["gate_way"],
            converted["dns_addr"],
        )
    raise MessageError(f"operation {request.op} carries no IP information")


def host_ip_reply(request: HostIpRequest, data: bytes | bytearray | memoryview) -> IpValue:
    """The host's buffer after ``process_ob_ipinfo`` wrote the daemon's GET answer over
    the host's own ``request``.

    Each daemon string is read as C does (``strlen``: past its field if it has no
    NUL) and converted to UTF-16 into the host's field: addresses, subnets, gateways
    and DNS servers, then the adapter id, which may write up to 1024 units into its
    128-unit field and so over what follows.  No NUL is written: a shorter answer
    leaves the host's own bytes behind it.  ``dhcp_enabled`` and ``addr_family``
    are copied last.  Invalid UTF-8 is a :class:`ConversionError` (``HV_E_FAIL``).
    """
    _check_size(data)
    buf = bytearray(encode_host_ip(request))
    for name, at, _ in (*_HOST_IP_STRINGS[1:], _HOST_IP_ADAPTER):
        units = utf8_to_utf16(cstring(data, _DAEMON_IP_AT[name]), _OUTBOUND_UNITS[name])
        raw = struct.pack(f"<{len(units)}H", *units)[: len(buf) - at]
        buf[at : at + len(raw)] = raw
    buf[_HOST_IP_DHCP_AT] = data[_IP_DHCP_AT]
    buf[_HOST_IP_FAMILY_AT] = data[_IP_FAMILY_AT]
    return decode_host_ip(buf).value


def registration_reply(op: int) -> bytes:
    """The kernel's answer to a registration: the same operation and its version."""
    return encode(RegisterMessage(op, KERNEL_VERSION))


def message_op(data: bytes | bytearray | memoryview) -> int:
    return data[0]
