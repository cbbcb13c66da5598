"""struct hv_kvp_msg and the kernel's conversions: layout, round trips, truncation rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpfs.peers.hyperv import message as m

u32 = st.integers(0, 0xFFFFFFFF)
u8 = st.integers(0, 0xFF)


def field(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=size).map(lambda b: b.replace(b"\0", b"\x01"))


key_values = st.builds(
    m.KeyValueMessage,
    op=st.sampled_from([m.Op.SET, m.Op.GET]),
    pool=u8,
    key=field(512),
    value=field(2048),
    key_size=u32,
    value_size=u32,
    value_type=u32,
)
messages = st.one_of(
    key_values,
    st.builds(m.DeleteMessage, pool=u8, key=field(512), key_size=u32),
    st.builds(
        m.EnumerateMessage,
        pool=u8,
        index=u32,
        key=field(512),
        value=field(2048),
        key_size=u32,
        value_size=u32,
        value_type=u32,
    ),
    st.builds(m.RegisterMessage, op=st.just(m.Op.REGISTER1), version=field(512), pool=u8),
    st.builds(
        m.IpInfoMessage,
        op=st.sampled_from([m.Op.GET_IP_INFO, m.Op.SET_IP_INFO]),
        pool=u8,
        adapter_id=field(256),
        addr_family=u8,
        dhcp_enabled=u8,
        ip_addr=field(2048),
        sub_net=field(2048),
        gate_way=field(1024),
        dns_addr=field(2048),
    ),
    st.builds(m.OtherMessage, op=st.integers(6, 99), pool=u8),
)


# -- layout ----------------------------------------------------------------------------


def test_layout_offsets() -> None:
    data = m.encode(m.KeyValueMessage(m.Op.SET, 3, b"K", b"V", 2, 2, m.REG_SZ))
    assert len(data) == m.MSG_SIZE == 7432
    assert data[0:4] == bytes([1, 3, 0, 0])
    assert struct.unpack_from("<III", data, 4) == (1, 2, 2)
    assert (data[16:18], data[528:530]) == (b"K\0", b"V\0")
    data = m.encode(m.DeleteMessage(0, b"K", 2))
    assert struct.unpack_from("<I", data, 4) == (2,) and data[8:10] == b"K\0"
    data = m.encode(m.EnumerateMessage(1, 7, b"K", b"V", 4, 4, 1))
    assert struct.unpack_from("<IIII", data, 4) == (7, 1, 4, 4)
    assert (data[20:21], data[532:533]) == (b"K", b"V")
    data = m.encode(m.RegisterMessage(m.Op.REGISTER1, b"3.1"))
    assert data[0] == 100 and data[4:8] == b"3.1\0"
    data = m.encode(m.IpInfoMessage(m.Op.SET_IP_INFO, 0, b"A", 2, 1, b"I", b"S", b"G", b"D"))
    assert (data[4], data[260], data[261], data[262], data[2310], data[4358], data[5382]) == (
        ord("A"),
        2,
        1,
        ord("I"),
        ord("S"),
        ord("G"),
        ord("D"),
    )
    # A reply's header is the status, overlaying operation and pool.
    reply = m.encode(m.EnumerateMessage(1, 0), error=m.Status.S_CONT)
    assert struct.unpack_from("<I", reply, 0) == (0x80070103,)


@given(messages)
def test_round_trip(message: m.Message) -> None:
    data = m.encode(message)
    assert len(data) == m.MSG_SIZE
    assert m.decode_request(data) == message


@given(messages, u32)
def test_reply_round_trip(message: m.Message, status: int) -> None:
    reply = m.decode_reply(m.encode(message, error=status), message.op, message.pool)
    assert reply == m.Reply(status, message)


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """7432 bytes: an operation, then random bytes at random places, zeros elsewhere."""
    data = bytearray(m.MSG_SIZE)
    data[0] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 100, 255]))
    for at, chunk in draw(
        st.lists(st.tuples(st.integers(1, m.MSG_SIZE - 1), st.binary(min_size=1, max_size=80)))
    ):
        data[at : at + len(chunk)] = chunk[: m.MSG_SIZE - at]
    return bytes(data)


@given(raw_messages(), st.booleans())
def test_any_bytes_decode(data: bytes, registration: bool) -> None:
    message = m.decode_request(data, registration=registration)
    assert message.op == data[0]
    assert m.decode_reply(data, data[0]).status == struct.unpack_from("<I", data)[0]


@pytest.mark.parametrize("size", [0, 7431, 7433])
def test_wrong_sizes(size: int) -> None:
    with pytest.raises(m.MessageError):
        m.decode_request(bytes(size))
    with pytest.raises(m.MessageError):
        m.kernel_reply(m.Op.SET, bytes(size))


def test_fields_that_do_not_fit() -> None:
    with pytest.raises(m.MessageError):
        m.encode(m.KeyValueMessage(m.Op.SET, 0, key=b"k" * 513))
    with pytest.raises(m.MessageError):
        m.encode(m.EnumerateMessage(0, value=b"v" * 2049))
    with pytest.raises(m.MessageError):
        m.encode(m.DeleteMessage(0, key_size=1 << 32))
    with pytest.raises(m.MessageError):
        m.encode(m.OtherMessage(256))


def test_legacy_registration_shares_op_4() -> None:
    data = m.encode(m.RegisterMessage(m.OP_REGISTER, b"x"))
    assert m.decode_request(data, registration=True) == m.RegisterMessage(4, b"x")
    assert isinstance(m.decode_request(data), m.IpInfoMessage)


def test_cstring_runs_on_without_a_nul() -> None:
    data = bytes(10) + b"abc" + b"def\0tail"
    assert m.cstring(data, 10, 13) == b"abc"
    assert m.cstring(data, 10) == b"abcdef"


# -- the kernel's conversions ------------------------------------------------------------

# Host strings, including unpaired surrogates (the host's UTF-16 need not be valid).
host_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=["Cc"])
    | st.sampled_from(["\ud800", "\udc00", "\udbff", "a", "é", "€", "😀", "\0"]),
    max_size=300,
)


def model_utf16_to_utf8(units: list[int], room: int) -> bytes:
    """Characters in order (pairs joined), each kept if it still fits, lone surrogates
    dropped, up to the first NUL."""
    out = b""
    for char in m.units_to_str(units).split("\0", 1)[0]:
        if 0xD800 <= ord(char) <= 0xDFFF:
            continue
        encoded = char.encode("utf-8")
        if len(encoded) <= room - len(out):
            out += encoded
    return out


@given(host_text, st.integers(0, 600))
def test_utf16_to_utf8(text: str, room: int) -> None:
    units = m.utf16_units(text)
    got = m.utf16_to_utf8(units, room)
    assert got == model_utf16_to_utf8(units, room)
    assert len(got) <= room
    got.decode("utf-8")  # always valid UTF-8


def test_utf16_to_utf8_examples() -> None:
    units = m.utf16_units
    # A character that does not fit is skipped; a later one that fits is kept.
    assert m.utf16_to_utf8(units("€€€a"), 7) == "€€a".encode()
    assert m.utf16_to_utf8(units("😀a"), 3) == b"a"
    # Unpaired surrogates vanish; a final high surrogate ends the conversion.
    assert m.utf16_to_utf8(units("a\udc00b\ud800c"), 10) == b"abc"
    assert m.utf16_to_utf8(units("ab\ud800"), 10) == b"ab"
    assert m.utf16_to_utf8(units("ab\0cd"), 10) == b"ab"


def model_utf8_to_utf16(chars: str, room: int) -> tuple[list[int], bool]:
    """(units, stopped early): whole characters while they fit, a clean prefix."""
    units: list[int] = []
    for char in chars:
        char_units = m.utf16_units(char)
        if len(units) + len(char_units) > room:
            return units, True
        units += char_units
    return units, False


@given(st.text(max_size=700), st.integers(0, 1100))
def test_utf8_to_utf16_is_a_clean_prefix(text: str, room: int) -> None:
    text = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)
    expected, _ = model_utf8_to_utf16(text.split("\0", 1)[0], room)
    assert m.utf8_to_utf16(text.encode("utf-8"), room) == expected


@given(st.binary(max_size=60), st.integers(0, 80))
def test_utf8_to_utf16_fails_only_on_invalid_utf8_before_the_limit(data: bytes, room: int) -> None:
    data = data.split(b"\0", 1)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8")
        units, stopped = model_utf8_to_utf16(prefix, room)
        if stopped or len(units) >= room:
            assert m.utf8_to_utf16(data, room) == units
        else:
            with pytest.raises(m.ConversionError):
                m.utf8_to_utf16(data, room)
    else:
        assert m.utf8_to_utf16(data, room) == model_utf8_to_utf16(text, room)[0]


@pytest.mark.parametrize(
    "data",
    [
        b"\x80",
        b"\xc0\x80",
        b"\xe0\x80\x80",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xc3",
        b"\xe2\x82",
    ],
)
def test_utf8_to_utf16_rejects_what_the_kernel_rejects(data: bytes) -> None:
    with pytest.raises(m.ConversionError):
        m.utf8_to_utf16(b"ok" + data, 100)
    assert m.utf8_to_utf16(b"ok" + data, 2) == [ord("o"), ord("k")]


# -- the kernel between host and daemon ---------------------------------------------------


def test_kernel_request_set() -> None:
    data = m.kernel_request(m.HostRequest(m.Op.SET, 0, "HostKey1", "HostValue1"))
    assert m.decode_request(data) == m.KeyValueMessage(
        m.Op.SET, 0, b"HostKey1", b"HostValue1", 9, 11, 0
    )
    data = m.kernel_request(m.HostRequest(m.Op.SET, 3, "n", 7, m.REG_U32))
    assert m.decode_request(data) == m.KeyValueMessage(m.Op.SET, 3, b"n", b"7", 2, 2, 0)
    data = m.kernel_request(m.HostRequest(m.Op.SET, 0, "n", (1 << 64) - 1, m.REG_U64))
    assert m.decode_request(data) == m.KeyValueMessage(
        m.Op.SET, 0, b"n", b"18446744073709551615", 2, 21, 0
    )
    # A value type the kernel does not know: no value at all.
    data = m.kernel_request(m.HostRequest(m.Op.SET, 0, "n", "v", 99))
    assert m.decode_request(data) == m.KeyValueMessage(m.Op.SET, 0, b"n", b"", 2, 0, 0)


@given(host_text, host_text)
def test_kernel_request_caps(key: str, value: str) -> None:
    data = m.kernel_request(m.HostRequest(m.Op.SET, 0, key, value))
    message = m.decode_request(data)
    assert isinstance(message, m.KeyValueMessage)
    assert len(message.key) <= 511 and len(message.value) <= 2047
    assert message.key_size == len(message.key) + 1
    assert message.value_size == len(message.value) + 1
    assert m.delivered(m.HostRequest(m.Op.SET, 0, key, value)) == (message.key, message.value)


def test_kernel_request_other_ops() -> None:
    get = m.decode_request(m.kernel_request(m.HostRequest(m.Op.GET, 1, "k")))
    assert get == m.KeyValueMessage(m.Op.GET, 1, b"k", b"", 2, 0, 0)
    delete = m.decode_request(m.kernel_request(m.HostRequest(m.Op.DELETE, 0, "k")))
    assert delete == m.DeleteMessage(0, b"k", 2)
    enum = m.decode_request(m.kernel_request(m.HostRequest(m.Op.ENUMERATE, 2, index=9)))
    assert enum == m.EnumerateMessage(2, 9)
    other = m.decode_request(m.kernel_request(m.HostRequest(9, 4)))
    assert other == m.OtherMessage(9, 4)


def test_kernel_reply() -> None:
    enum = m.encode(m.EnumerateMessage(1, 0, b"k" * 300, "é".encode() * 1023), error=0)
    assert m.kernel_reply(m.Op.ENUMERATE, enum) == m.HostReply(0, "k" * 254, "é" * 1022)
    # Any failure status carries nothing else.
    fail = m.encode(m.EnumerateMessage(1, 0, b"k", b"v"), error=m.Status.S_CONT)
    assert m.kernel_reply(m.Op.ENUMERATE, fail) == m.HostReply(m.Status.S_CONT)
    # Invalid UTF-8 in key or value: HV_E_FAIL, even with status 0.
    bad = m.encode(m.EnumerateMessage(1, 0, b"k\xff", b"v"), error=0)
    assert m.kernel_reply(m.Op.ENUMERATE, bad) == m.HostReply(m.Status.E_FAIL)
    bad = m.encode(m.EnumerateMessage(1, 0, b"k", b"\xc3"), error=0)
    assert m.kernel_reply(m.Op.ENUMERATE, bad) == m.HostReply(m.Status.E_FAIL)
    # ... unless it lies beyond what is converted.
    late = m.encode(m.EnumerateMessage(1, 0, b"k" * 254 + b"\xff", b"v"), error=0)
    assert m.kernel_reply(m.Op.ENUMERATE, late) == m.HostReply(0, "k" * 254, "v")
    # SET and DELETE carry only the status.
    ok = m.encode(m.KeyValueMessage(m.Op.SET, 0, b"k", b"v"), error=0)
    assert m.kernel_reply(m.Op.SET, ok) == m.HostReply(0)
    # GET: the value is read at the ENUMERATE offset, 4 bytes into the GET value.
    get = m.encode(m.KeyValueMessage(m.Op.GET, 0, b"k", b"abcdefg"), error=0)
    assert m.kernel_reply(m.Op.GET, get) == m.HostReply(0, None, "efg")
    # A key field without NUL runs on into the value (strlen), then is cut at 254.
    full = bytearray(m.encode(m.EnumerateMessage(1, 0, b"", b"tail"), error=0))
    full[20:532] = "€".encode() * 170 + b"\xe2\x82"
    assert m.kernel_reply(m.Op.ENUMERATE, bytes(full)).status == m.Status.E_FAIL


def test_kernel_reply_legacy() -> None:
    empty = m.encode(m.EnumerateMessage(0, 0), error=0)
    assert m.kernel_reply(m.Op.ENUMERATE, empty, legacy=True) == m.HostReply(m.Status.S_CONT)
    item = m.encode(m.EnumerateMessage(0, 0, b"k", b"v"), error=0x1234)
    assert m.kernel_reply(m.Op.ENUMERATE, item, legacy=True) == m.HostReply(0, "k", "v")


def test_registration_reply() -> None:
    assert m.decode_request(m.registration_reply(100), registration=True) == m.RegisterMessage(
        100, b"3.1"
    )
