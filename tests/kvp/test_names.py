"""Key ↔ filename escaping: a bijection onto canonical names, never a scratch name."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kvpfs.kvp import names
from kvpfs.kvp.names import EMPTY_KEY_NAME, MAX_NAME_BYTES, InvalidName, key_to_name, name_to_key
from kvpfs.scratch import is_scratch_name

from .strategies import keys

# Keys that look like scratch files or need escaping; hypothesis rarely finds them alone.
_tricky = st.sampled_from(
    [
        b"4913", b"5036", b"49130", b"04913", b"sedAbC123", b"sed12345", b"x~", b"~", b"#a#",
        b"##", b"#", b"a.tmp", b".tmp", b".", b"..", b".x", b"%", b"%25", b"/", b"a/b", b"\t",
        b"\x7f", b"\xc2\x85", b"\xed\xa0\x80", b"\xff", b"caf\xc3\xa9", b"\xf0\x9f\x98\x80",
        b"#x.tmp#", b"#a~", b"a #", b" ", b"-", b"%00", b"CLOUD_INIT|1|start|init-local/search|u",
    ]
)
_any_key = keys | _tricky | st.lists(_tricky, max_size=4).map(b"".join)


@given(_any_key)
@example(b"")
def test_bijection(key: bytes) -> None:
    name = key_to_name(key)
    assert name_to_key(name) == key
    assert names.is_valid_name(name)


@given(_any_key)
@example(b"")
def test_names_are_safe(key: bytes) -> None:
    name = key_to_name(key)
    raw = os.fsencode(name)
    assert name and name not in (".", "..")
    assert b"/" not in raw and b"\0" not in raw
    assert not is_scratch_name(name)
    raw.decode("utf-8")  # always valid UTF-8, whatever the key
    assert len(raw) <= max(3 * len(key), 3)
    assert len(raw) <= names.NAME_LIMIT  # FUSE_NAME_MAX: every key stays reachable
    assert all(0x20 <= b != 0x7F for b in raw if b < 0x80)  # no control characters


@given(st.text(max_size=12) | st.binary(max_size=12).map(os.fsdecode))
def test_decode_accepts_only_canonical_names(name: str) -> None:
    try:
        key = name_to_key(name)
    except InvalidName:
        return
    assert key_to_name(key) == name


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (b"", EMPTY_KEY_NAME),
        (b"HostName", "HostName"),
        (b"a b|c", "a b|c"),
        (b"caf\xc3\xa9", "café"),
        (b"a/b", "a%2fb"),
        (b"100%", "100%25"),
        (b".", "%2e"),
        (b"..", "%2e."),
        (b".hidden", "%2ehidden"),
        (b"a.b", "a.b"),
        (b"tab\there", "tab%09here"),
        (b"\x7f", "%7f"),
        (b"\xc2\x85", "%c2%85"),  # U+0085, a C1 control
        (b"\xff", "%ff"),
        (b"ok\xe2\x82", "ok%e2%82"),  # truncated UTF-8 sequence
        (b"\xed\xa0\x80", "%ed%a0%80"),  # an encoded surrogate is not valid UTF-8
        (b"backup~", "backup%7e"),
        (b"~", "%7e"),
        (b"x.tmp", "x%2etmp"),
        (b".tmp", "%2etmp"),
        (b"#auto#", "%23auto#"),
        (b"##", "%23#"),
        (b"#", "#"),
        (b"sedAbC123", "%73edAbC123"),
        (b"sedAbC12", "sedAbC12"),
        (b"4913", "%34913"),
        (b"5036", "%35036"),
        (b"4914", "4914"),
        (b"%00", "%2500"),
        (b"CLOUD_INIT|1|start|init-local/search|u", "CLOUD_INIT|1|start|init-local%2fsearch|u"),
    ],
)
def test_examples(key: bytes, name: str) -> None:
    assert key_to_name(key) == name
    assert name_to_key(name) == key


@pytest.mark.parametrize(
    "name",
    [
        "",
        "%",
        "%2",
        "%zz",
        "a%2Fb",  # uppercase hex is not canonical
        "%61",  # "a" needs no escape
        "%2e%2e",  # only a leading "." is escaped
        "a%00b",  # NUL cannot be in a key
        "%00%00",
        ".hidden",
        "backup~",
        "x.tmp",
        "#auto#",
        "sedAbC123",
        "4913",
        "tab\there",
        "\x85",
        os.fsdecode(b"\xff"),  # raw invalid UTF-8 from the kernel
        "\ud800",  # not even a filename
        "%2",
        "a%",
    ],
)
def test_non_canonical_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        name_to_key(name)
    assert not names.is_valid_name(name)


def test_longest_name() -> None:
    assert MAX_NAME_BYTES == 684
    assert len(key_to_name(b"\xff" * 511)) == MAX_NAME_BYTES
    assert len(key_to_name(b"a" * 511)) == 511


@pytest.mark.parametrize(
    "key",
    [b"/" * 511, b"\xff" * 342, b"%" * 400 + b"x" * 111, bytes(range(1, 256)) * 2 + b"z"],
)
def test_keys_whose_escaped_name_is_too_long_get_the_compact_name(key: bytes) -> None:
    name = key_to_name(key)
    assert name.startswith(names.COMPACT_PREFIX)
    assert len(os.fsencode(name)) <= names.NAME_LIMIT
    assert name_to_key(name) == key


def test_compact_form_is_only_canonical_when_needed() -> None:
    import base64

    short = names.COMPACT_PREFIX + base64.urlsafe_b64encode(b"abc").decode().rstrip("=")
    with pytest.raises(InvalidName):
        name_to_key(short)
    long_key = b"/" * 400
    name = key_to_name(long_key)
    with pytest.raises(InvalidName):
        name_to_key(name + "=")
    assert key_to_name(b"/" * 341) == "%2f" * 341  # 1023 bytes: still escaped
