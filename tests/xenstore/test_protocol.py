"""kvpfs.xenstore.protocol: framing, payloads, and cxenstored 4.17's input rules."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import struct

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from kvpfs.xenstore import protocol as p
from kvpfs.xenstore.protocol import Access, Message, Op, Perm, ProtocolError

# --------------------------------------------------------------------------- strategies

VALID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_@"
segments = st.text(alphabet=VALID_CHARS, min_size=1, max_size=12)
abs_paths = st.lists(segments, min_size=0, max_size=6).map(lambda s: "/" + "/".join(s))
rel_paths = (
    st.lists(segments, min_size=1, max_size=6).map("/".join).filter(lambda s: not s.startswith("@"))
)
no_nul = st.binary(max_size=60).filter(lambda b: b"\0" not in b)
u32 = st.integers(0, 0xFFFFFFFF)
messages = st.builds(Message, u32, u32, u32, st.binary(max_size=p.XENSTORE_PAYLOAD_MAX))
perms = st.builds(
    Perm,
    st.sampled_from([Access.NONE, Access.READ, Access.WRITE, Access.BOTH]),
    st.integers(0, 65535),
)


# --------------------------------------------------------------------------- constants


def test_message_type_numbers() -> None:
    expected = [
        "CONTROL", "DIRECTORY", "READ", "GET_PERMS", "WATCH", "UNWATCH",
        "TRANSACTION_START", "TRANSACTION_END", "INTRODUCE", "RELEASE", "GET_DOMAIN_PATH",
        "WRITE", "MKDIR", "RM", "SET_PERMS", "WATCH_EVENT", "ERROR", "IS_DOMAIN_INTRODUCED",
        "RESUME", "SET_TARGET", "RESTRICT", "RESET_WATCHES", "DIRECTORY_PART", "TYPE_COUNT",
    ]  # fmt: skip
    assert [Op(i).name for i in range(24)] == expected
    assert Op["DEBUG"] is Op.CONTROL
    assert int(Op.INVALID) == 0xFFFF


def test_error_table_order_and_errnos() -> None:
    names = [n for n, _ in p.XSD_ERRORS]
    assert names == [
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    ]  # fmt: skip
    for name, num in p.XSD_ERRORS:
        assert getattr(errno, name) == num
        assert p.errno_for_name(name) == num
        assert p.errno_for_name(name.encode()) == num
        assert p.name_for_errno(num) == name
        assert p.build_error(num) == name.encode() + b"\0"
        exc = p.parse_error(name.encode() + b"\0")
        assert isinstance(exc, OSError) and exc.errno == num and exc.name == name
    # Both directions fall back to EINVAL, as libxenstore and cxenstored do.
    assert p.errno_for_name("EWHATEVER") == errno.EINVAL
    assert p.name_for_errno(errno.ETIMEDOUT) == "EINVAL"
    assert p.XenStoreError(errno.ETIMEDOUT).name == "ETIMEDOUT"


# --------------------------------------------------------------------------- framing


def test_header_layout_is_native_uint32() -> None:
    raw = p.encode_message(Message(Op.READ, 7, 3, b"/a\0"))
    assert raw == struct.pack("=IIII", 2, 7, 3, 3) + b"/a\0"
    assert p.HEADER_SIZE == 16


@given(messages)
def test_message_round_trip(msg: Message) -> None:
    dec = p.Decoder()
    dec.feed(p.encode_message(msg))
    assert dec.next_message() == msg
    assert dec.next_message() is None
    assert dec.buffered == 0
    dec.check_eof()


@given(st.lists(messages, max_size=8), st.data())
def test_decoder_any_chunking(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(p.encode_message(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = p.Decoder()
    out: list[Message] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[prev:cut])
        prev = cut
        out.extend(dec)
    assert out == msgs
    dec.check_eof()


def test_encode_refuses_oversized_payload() -> None:
    p.encode_message(Message(Op.WRITE, 0, 0, b"x" * 4096))
    with pytest.raises(ProtocolError) as info:
        p.encode_message(Message(Op.WRITE, 0, 0, b"x" * 4097))
    assert info.value.errno == errno.E2BIG


@pytest.mark.parametrize("field", ["type", "req_id", "tx_id"])
@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_encode_refuses_fields_beyond_32_bits(field: str, value: int) -> None:
    fields = {"type": 2, "req_id": 0, "tx_id": 0, "payload": b""}
    fields[field] = value
    with pytest.raises(ProtocolError):
        p.encode_message(Message(**fields))  # type: ignore[arg-type]


@given(st.integers(4097, 0xFFFFFFFF), st.integers(0, 15))
def test_decoder_rejects_oversized_length(length: int, split: int) -> None:
    header = struct.pack("=IIII", 2, 0, 0, length)
    dec = p.Decoder()
    dec.feed(header[:split])
    if split < 16:
        assert dec.next_message() is None
    dec.feed(header[split:])
    with pytest.raises(p.FramingError):
        dec.next_message()
    dec.feed(b"more")
    with pytest.raises(p.FramingError):  # the stream stays broken
        dec.next_message()


@given(st.binary(min_size=1, max_size=15))
def test_decoder_partial_header_at_eof(head: bytes) -> None:
    dec = p.Decoder()
    dec.feed(head)
    assert dec.next_message() is None
    with pytest.raises(p.FramingError):
        dec.check_eof()


def test_decoder_partial_payload_at_eof() -> None:
    dec = p.Decoder()
    dec.feed(p.encode_message(Message(Op.READ, 1, 0, b"/abc\0"))[:-1])
    assert dec.next_message() is None
    with pytest.raises(p.FramingError):
        dec.check_eof()


def test_decoder_many_small_frames_compacts() -> None:
    frame = p.encode_message(Message(Op.READ, 1, 0, b"/a\0"))
    dec = p.Decoder()
    dec.feed(frame * 10000 + frame[:5])
    assert sum(1 for _ in dec) == 10000
    assert dec.buffered == 5


def test_reply_helpers_echo_ids() -> None:
    req = Message(Op.READ, 9, 4, b"/x\0")
    assert req.reply(b"v") == Message(Op.READ, 9, 4, b"v")
    assert req.error_reply(errno.ENOENT) == Message(Op.ERROR, 9, 4, b"ENOENT\0")
    assert req.error_reply("EBUSY").payload == b"EBUSY\0"


# --------------------------------------------------------------------------- arguments


@given(no_nul)
def test_onearg_accepts_exactly_one_trailing_nul(arg: bytes) -> None:
    assert p.onearg(arg + b"\0") == arg


@pytest.mark.parametrize("payload", [b"", b"/a", b"/a\0/b\0", b"/a\0junk", b"\0\0", b"/a\0\0"])
def test_onearg_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        p.onearg(payload)
    assert info.value.errno == errno.EINVAL


@given(st.lists(no_nul, max_size=5), no_nul)
def test_get_strings_ignores_unterminated_tail(args: list[bytes], tail: bytes) -> None:
    payload = p.encode_args(*args) + tail
    assert p.get_strings(payload) == args
    assert p.count_strings(payload) == len(args)


def test_encode_args_refuses_embedded_nul() -> None:
    for args in ((b"a\0b",), ("a", b"\0"), (b"x", "\0y")):
        with pytest.raises(ProtocolError):
            p.encode_args(*args)
    with pytest.raises(ProtocolError):
        p.build_watch_event(b"/a", b"t\0")
    assert p.encode_args("a", 5, b"c") == b"a\x005\x00c\x00"
    assert p.encode_args() == b""


@given(no_nul, st.binary(max_size=200))
def test_write_round_trip_binary_value(path: bytes, value: bytes) -> None:
    payload = p.build_write(path, value)
    assert payload == path + b"\0" + value  # the value is not NUL-terminated
    assert p.parse_write(payload) == (path, value)


def test_write_needs_a_nul() -> None:
    with pytest.raises(ProtocolError):
        p.parse_write(b"/no/nul")


@given(no_nul, no_nul)
def test_watch_round_trip(path: bytes, token: bytes) -> None:
    payload = p.build_watch(path, token)
    assert payload == path + b"\0" + token + b"\0"
    assert p.parse_watch(payload) == (path, token)
    assert p.parse_watch(payload + b"junk") == (path, token)  # cxenstored ignores it too
    assert p.parse_watch_event(p.build_watch_event(path, token)) == (path, token)
    assert p.build_watch_event(path, token) == payload


@pytest.mark.parametrize("payload", [b"/a\0", b"/a\0tok", b"/a\0tok\x001\0", b""])
def test_watch_rejects_wrong_argument_count(payload: bytes) -> None:
    # 4.17 rejects the later "depth" third argument as well.
    with pytest.raises(ProtocolError):
        p.parse_watch(payload)


def test_transaction_payloads() -> None:
    assert p.build_transaction_start() == b"\0"
    assert p.build_transaction_end(True) == b"T\0"
    assert p.build_transaction_end(False) == b"F\0"
    assert p.parse_transaction_end(b"T\0") is True
    assert p.parse_transaction_end(b"F\0") is False
    for bad in (b"X\0", b"T", b"TT\0", b"T\0F\0", b""):
        with pytest.raises(ProtocolError):
            p.parse_transaction_end(bad)
    assert p.parse_transaction_id(p.build_transaction_id(17)) == 17
    assert p.build_transaction_id(17) == p.encode_args(17)
    for bad in (b"0\0", b"x\0", b"1", b"-1\0"):
        with pytest.raises(ProtocolError):
            p.parse_transaction_id(bad)


@given(st.integers(0, 0x7FF0), u32, st.integers(1, 0xFFFF))
def test_introduce_round_trip(domid: int, gfn: int, port: int) -> None:
    payload = p.build_introduce(domid, gfn, port)
    assert payload == f"{domid}\0{gfn}\0{port}\0".encode()
    assert p.parse_introduce(payload) == tuple(str(v).encode() for v in (domid, gfn, port))
    assert p.parse_introduce(payload + b"extra\0")[0] == str(domid).encode()
    with pytest.raises(ProtocolError):
        p.parse_introduce(payload[: payload.rindex(b"\0", 0, -1) + 1])


def test_set_target_and_control() -> None:
    assert p.parse_set_target(p.build_set_target(3, 1)) == (b"3", b"1")
    with pytest.raises(ProtocolError):
        p.parse_set_target(b"3\0")
    assert p.parse_control(p.build_control("log", "on")) == (b"log", [b"on"])
    with pytest.raises(ProtocolError):
        p.parse_control(b"")


@given(no_nul, st.integers(0, 100000))
def test_directory_part_request_round_trip(path: bytes, offset: int) -> None:
    payload = p.build_directory_part(path, offset)
    assert p.parse_directory_part(payload) == (path, offset)


def test_directory_part_request_rules() -> None:
    # Exactly two NULs; the offset is read with atoi (verified against cxenstored 4.17).
    assert p.parse_directory_part(b"/p\0abc\0") == (b"/p", 0)
    assert p.parse_directory_part(b"/p\x000\0zz") == (b"/p", 0)
    for bad in (b"/p\0", b"/p\x000\x00x\0", b""):
        with pytest.raises(ProtocolError):
            p.parse_directory_part(bad)


@given(st.lists(no_nul.filter(bool), max_size=10))
def test_string_list_round_trip(items: list[bytes]) -> None:
    payload = p.build_strings(items)
    assert p.parse_strings(payload) == items
    assert (payload == b"") == (not items)


def test_string_list_must_be_terminated() -> None:
    with pytest.raises(ProtocolError):
        p.parse_strings(b"a\0b")


@given(st.integers(-(2**31), 2**31 - 1))
def test_domid_round_trip(domid: int) -> None:
    assert p.parse_domid(p.build_domid(domid)) == domid


def test_domid_rules() -> None:
    assert p.parse_domid(b"abc\0") == 0  # atoi, as cxenstored
    assert p.parse_domid(b"7x\0") == 7
    for bad in (b"7", b"7\x008\0", b""):
        with pytest.raises(ProtocolError):
            p.parse_domid(bad)


def test_simple_replies() -> None:
    assert p.OK == b"OK\0"
    assert p.parse_bool(p.build_bool(True)) is True
    assert p.parse_bool(p.build_bool(False)) is False
    with pytest.raises(ProtocolError):
        p.parse_bool(b"Y\0")
    assert p.parse_domain_path(b"/local/domain/7\0") == b"/local/domain/7"
    assert p.domain_path(7) == b"/local/domain/7"
    assert p.domain_path(p.c_atoi(b"-3")) == b"/local/domain/4294967293"


def test_directory_part_reply_recorded_example() -> None:
    children = p.build_strings(["x", "bin", "m"])
    assert p.build_directory_part_reply(37, children, 0) == b"37\0x\0bin\0m\0\0"
    assert p.build_directory_part_reply(37, children, 2) == b"37\0bin\0m\0\0"
    assert p.build_directory_part_reply(37, children, 99) == b"37\0\0"
    part = p.parse_directory_part_reply(b"37\0x\0bin\0m\0\0")
    assert (part.generation, part.children, part.size, part.final) == (
        37,
        [b"x", b"bin", b"m"],
        8,
        True,
    )
    assert p.parse_directory_part_reply(b"37\0\0") == p.DirectoryPart(37, [], 0, True)


@given(
    st.lists(st.text(VALID_CHARS, min_size=1, max_size=300), max_size=60, unique=True),
    st.integers(0, 2**40),
)
def test_directory_part_chunks_reassemble(names: list[str], generation: int) -> None:
    """The libxenstore loop over the server's chunks yields the whole list."""
    child_list = p.build_strings(names)
    offset = 0
    got: list[bytes] = []
    for _ in range(1000):
        payload = p.build_directory_part_reply(generation, child_list, offset)
        assert len(payload) <= p.XENSTORE_PAYLOAD_MAX
        part = p.parse_directory_part_reply(payload)
        assert part.generation == generation
        got += part.children
        offset += part.size
        if part.final:
            break
        assert not payload.endswith(b"\0\0")
    assert got == [n.encode() for n in names]


def _directory_part_reply_by_steps(generation: int, child_list: bytes, offset: int) -> bytes:
    """``send_directory_part`` of cxenstored 4.17 transcribed line by line."""
    gen = b"%d\0" % generation
    off = offset & 0xFFFFFFFF  # unsigned int off = atoi(...)
    if off >= len(child_list):
        return gen + b"\0"
    length = 0
    maxlen = p.XENSTORE_PAYLOAD_MAX - len(gen) - 1
    child = off
    while length + child_list.index(b"\0", child) - child < maxlen:
        step = child_list.index(b"\0", child) - child + 1
        length += step
        child += step
        if off + length == len(child_list):
            break
    data = gen + child_list[off : off + length]
    if off + length == len(child_list):
        data += b"\0"
    return data


#: Child names of any length a payload can carry, long ones included.
long_names = st.builds(
    lambda n, c, tail: c * n + tail, st.integers(0, 4093), st.sampled_from("abc"), segments
)


@given(
    st.lists(long_names, max_size=8, unique=True),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**31), 2**31 - 1),
)
@example([], 1, 0)
@example(["a" * 4093], 5, 0)  # a name the payload cannot hold: an empty chunk
@example(["a" * 4092], 5, 0)  # one that fills it
@example(["a" * 4092, "b"], 5, 0)
def test_directory_part_reply_is_cxenstoreds(
    names: list[str], generation: int, offset: int
) -> None:
    child_list = p.build_strings(names)
    offset = offset if offset < 0 else offset % (len(child_list) + 2)
    assert p.build_directory_part_reply(generation, child_list, offset) == (
        _directory_part_reply_by_steps(generation, child_list, offset)
    )


@pytest.mark.parametrize("payload", [b"", b"\0x\0\0", b"x1\0\0", b"5\0a\0b"])
def test_directory_part_reply_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_directory_part_reply(payload)


def test_watch_event_needs_two_strings() -> None:
    with pytest.raises(ProtocolError):
        p.parse_watch_event(b"/only\0")


# --------------------------------------------------------------------------- paths


@given(abs_paths)
def test_valid_absolute_paths(path: str) -> None:
    assert p.is_valid_nodename(path)
    assert p.check_path(path) == path.encode()


@given(abs_paths.filter(lambda s: s != "/"), st.sampled_from(" .!\t\xff\n:+*%#~"), st.data())
def test_bad_character_is_invalid(path: str, bad: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(1, len(path)))
    assert not p.is_valid_nodename(path[:pos] + bad + path[pos:])


@given(abs_paths.filter(lambda s: s != "/"))
def test_trailing_and_double_slash_invalid(path: str) -> None:
    assert not p.is_valid_nodename(path + "/")
    assert not p.is_valid_nodename(path.replace("/", "//", 1))
    assert not p.is_valid_nodename(path.lstrip("/"))  # not absolute
    assert p.is_valid_nodename("/")


def test_path_length_limit_and_local_domain_prefix() -> None:
    # Verified against cxenstored 4.17: 2048 characters beyond the prefix are fine.
    assert p.is_valid_nodename("/t/" + "a" * 2045)
    assert not p.is_valid_nodename("/t/" + "a" * 2046)
    assert not p.is_valid_nodename("/t/" + "a" * 2050)
    assert p.is_valid_nodename("/local/domain/5/" + "a" * 2048)
    assert not p.is_valid_nodename("/local/domain/5/" + "a" * 2049)
    assert p.is_valid_nodename("/local/domain/12345/" + "a" * 2048)
    # %5u reads at most five characters, a sign included
    assert not p.is_valid_nodename("/local/domain/123456/" + "a" * 2040)
    assert p.is_valid_nodename("/local/domain/-5/" + "a" * 2048)
    assert not p.is_valid_nodename("/local/domain/5" + "a" * 2048)
    assert not p.is_valid_nodename("/local/domain//" + "a" * 2030)
    assert p.is_valid_nodename("/t/" + "a" * 100, max_path_len=103)
    assert not p.is_valid_nodename("/t/" + "a" * 101, max_path_len=103)


@given(rel_paths)
def test_relative_paths_canonicalise_against_home(path: str) -> None:
    assert p.is_relative(path)
    canonical = p.check_path(path)
    assert canonical == b"/local/domain/0/" + path.encode()
    assert p.relativize(canonical) == path.encode()
    assert p.check_path(path, home="/local/domain/7") == b"/local/domain/7/" + path.encode()


def test_special_names() -> None:
    assert not p.is_relative("@releaseDomain")
    assert p.canonicalize("@introduceDomain") == b"@introduceDomain"
    with pytest.raises(ProtocolError):
        p.check_path("@introduceDomain")  # not a node: READ on it is EINVAL
    # watches accept any characters after '@', up to 2048 bytes
    assert p.check_watch_path("@a b!") == b"@a b!"
    assert p.check_watch_path("@" + "a" * 2047)
    with pytest.raises(ProtocolError):
        p.check_watch_path("@" + "a" * 2048)
    assert p.check_watch_path("rel/a") == b"/local/domain/0/rel/a"
    for bad in ("", "/a/", "a//b", "/a b"):
        with pytest.raises(ProtocolError):
            p.check_watch_path(bad)


def test_is_child() -> None:
    assert p.is_child("/t/x/y", "/t/x")
    assert p.is_child("/t/x", "/t/x")
    assert not p.is_child("/t/xother", "/t/x")
    assert p.is_child("/anything", "/")
    assert p.is_child("rel/a/b", "rel/a")
    assert p.is_child("@releaseDomain", "@releaseDomain")


# --------------------------------------------------------------------------- C numbers

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.strtol.restype = ctypes.c_long
_libc.strtol.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
_libc.atoi.restype = ctypes.c_int
_libc.atoi.argtypes = [ctypes.c_char_p]

c_numbers = st.one_of(
    st.binary(max_size=12).filter(lambda b: b"\0" not in b),
    st.text(" \t+-0123456789xXabcdefABCDEFg8", max_size=25).map(str.encode),
)


@given(c_numbers, st.sampled_from([0, 8, 10, 16]))
@example(b"0x", 0)
@example(b"0x1g", 0)
@example(b" -0x7fffffffffffffff9", 0)
@example(b"099", 0)
@example(b"-", 10)
def test_strtol_matches_libc(s: bytes, base: int) -> None:
    buf = ctypes.create_string_buffer(s)
    end = ctypes.c_char_p()
    expected = _libc.strtol(buf, ctypes.byref(end), base)
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buf)  # type: ignore[operator]
    assert p.c_strtol(s, base) == (expected, consumed)


@given(c_numbers)
@example(b"99999999999")
@example(b"-3")
def test_atoi_matches_libc(s: bytes) -> None:
    assert p.c_atoi(s) == _libc.atoi(s)


# --------------------------------------------------------------------------- permissions


@given(perms)
def test_perm_round_trip(perm: Perm) -> None:
    assert p.parse_perm(str(perm)) == perm
    assert p.parse_perm(perm.encode()) == perm


@given(st.lists(perms, min_size=1, max_size=6), no_nul)
def test_set_perms_round_trip(items: list[Perm], path: bytes) -> None:
    payload = p.build_set_perms(path, items)
    assert payload == p.encode_args(path, *(str(i) for i in items))
    assert p.parse_set_perms(payload) == (path, tuple(items))
    assert p.parse_set_perms(payload + b"junk") == (path, tuple(items))
    assert [p.parse_perm(s) for s in p.parse_strings(p.format_perms(items))] == items
    text = "(" + ",".join(map(str, items)) + ")"  # xenstore-ls -p
    assert p.parse_perms_text(text) == items
    assert p.parse_perms_text(" ".join(map(str, items))) == items


def test_set_perms_quota_comes_before_parsing() -> None:
    # do_set_perms checks the count against the caller's quota first.
    payload = p.encode_args("/p", "n1", "bogus", "r2")
    for limit in (0, 1, 2):
        with pytest.raises(ProtocolError) as info:
            p.parse_set_perms(payload, limit)
        assert info.value.errno == errno.ENOSPC
    with pytest.raises(ProtocolError) as info:
        p.parse_set_perms(payload, 3)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError) as info:
        p.parse_set_perms(b"/p\0", -1)  # no permission at all: EINVAL still
    assert info.value.errno == errno.EINVAL


# Each of these was sent to cxenstored 4.17 as SET_PERMS and read back with GET_PERMS.
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("n0x10", "n16"),
        ("r010", "r8"),
        ("r 5", "r5"),
        ("r+5", "r5"),
        ("r\t7", "r7"),
        ("r-1", "r-1"),
        ("n99999999999", "n1215752191"),
        ("n70000", "n70000"),
        ("b0", "b0"),
        ("w3", "w3"),
    ],
)
def test_perm_parsing_like_cxenstored(text: str, shown: str) -> None:
    assert str(p.parse_perm(text)) == shown


@pytest.mark.parametrize("text", ["n5x", "n", "q5", "n0x", "n08", "R5", "r5 ", "", "r 5\0"])
def test_perm_parsing_rejects_like_cxenstored(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_perm(text)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("payload", [b"/p/x\0", b"/p/x\0n3", b"/p/x", b"", b"/p\0n1\0zz\0"])
def test_set_perms_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_set_perms(payload)


def test_build_set_perms_needs_a_permission() -> None:
    with pytest.raises(ProtocolError):
        p.build_set_perms("/a", [])
    with pytest.raises(ProtocolError):
        p.parse_perms_text("()")


def test_perm_domid_is_32_bit() -> None:
    assert Perm(Access.READ, 0xFFFFFFFF).domid == -1
    with pytest.raises(ProtocolError):
        Perm(Access.READ, 1 << 32)
    with pytest.raises(ProtocolError):
        Perm(Access.OWNER, 1)


def test_perm_for_owner_first() -> None:
    node = [Perm(Access.NONE, 1), Perm(Access.READ, 0), Perm(Access.BOTH, 7)]
    full = Access.BOTH | Access.OWNER
    assert p.perm_for(1, node) == full  # the owner
    assert p.perm_for(0, node) == full  # dom0 is privileged
    assert p.perm_for(7, node) == Access.BOTH
    assert p.perm_for(5, node) == Access.NONE  # unlisted: the owner's letter
    assert p.perm_for(5, [Perm(Access.READ, 1)]) == Access.READ
    assert p.perm_for(5, node, target=1) == full  # stub domain of the owner
    assert p.perm_for(5, node, target=7) == Access.BOTH
    assert p.perm_for(0, node, privileged=False) == Access.READ
    assert p.perm_for(9, [Perm(Access.WRITE, 2), Perm(Access.READ, 9), Perm(Access.NONE, 9)]) == (
        Access.READ  # first matching entry wins
    )
    assert Access.READ in p.perm_for(7, node)


@given(st.lists(perms, min_size=1, max_size=6), st.integers(1, 65535))
def test_perm_for_properties(items: list[Perm], domid: int) -> None:
    assume(items[0].domid != domid)
    got = p.perm_for(domid, items)
    listed = [i.access for i in items[1:] if i.domid == domid]
    assert got == (listed[0] if listed else items[0].access)
