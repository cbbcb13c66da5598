"""The vdev codec against the reference table (both directions) and its rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpfs.vbd.vdev import (
    EXTENDED,
    VdevError,
    decode,
    disk_letters,
    encode,
    is_canonical,
    parse,
)

#: The worked examples of the reference (§14), all verified there.
TABLE = [
    ("xvda", 51712, 0xCA00),
    ("xvdb", 51728, 0xCA10),
    ("xvda1", 51713, 0xCA01),
    ("xvdp15", 51967, 0xCAFF),
    ("xvdq", 268439552, 0x10001000),
    ("xvdz", 268441856, 0x10001900),
    ("xvdaa", 268442112, 0x10001A00),
    ("xvdtq37", 268572709, 0x10021825),
    ("d536p37", 268572709, 0x10021825),
    ("d0", 51712, 0xCA00),
    ("d1p2", 51730, 0xCA12),
    ("hda", 768, 0x300),
    ("hda1", 769, 0x301),
    ("hdb", 832, 0x340),
    ("hdc", 5632, 0x1600),
    ("hdc2", 5634, 0x1602),
    ("hdd", 5696, 0x1640),
    ("sda", 2048, 0x800),
    ("sdb3", 2067, 0x813),
    ("sdp15", 2303, 0x8FF),
]


@pytest.mark.parametrize(("name", "decimal", "hexa"), TABLE)
def test_table_encode(name: str, decimal: int, hexa: int) -> None:
    assert decimal == hexa
    assert encode(name) == decimal


@pytest.mark.parametrize(("name", "decimal", "hexa"), [t for t in TABLE if not t[0].startswith("d")])
def test_table_decode(name: str, decimal: int, hexa: int) -> None:
    assert decode(decimal) == name


def test_generic_names_decode_to_xvd() -> None:
    assert decode(encode("d536p37")) == "xvdtq37"
    assert decode(encode("d1p2")) == "xvdb2"


def test_man_page_example() -> None:
    # xbdback(4): identifier 769 (0x301) is hda1.
    assert decode(0x301) == "hda1"


@pytest.mark.parametrize(
    ("text", "value"),
    [("51712", 51712), ("0xca00", 51712), ("0XCA00", 51712), ("0145000", 51712), ("+769", 769), ("0", 0)],
)
def test_plain_numbers_pass_through(text: str, value: int) -> None:
    assert encode(text) == value


@pytest.mark.parametrize(
    "bad",
    [
        "", "xvd", "xvda01", "xvda0", "xvdA", "xvda256", "sdq", "sda16", "hde", "hda64",
        "d1p", "dp1", "d01", "d1p01", "d1048576", "d0p256", "-1", "0x", "2147483648",
        " xvda", "xvda ", "vda", "xvda-1", "0x1g", "08",
    ],
)
def test_refused(bad: str) -> None:
    with pytest.raises(VdevError):
        encode(bad)


def test_disk_letters() -> None:
    assert [disk_letters(i) for i in (0, 25, 26, 27, 51, 52, 536, 701, 702)] == [
        "a", "z", "aa", "ab", "az", "ba", "tq", "zz", "aaa",
    ]


def test_limits() -> None:
    assert encode("xvd" + disk_letters((1 << 20) - 1) + "255") == EXTENDED | ((1 << 20) - 1) << 8 | 255
    with pytest.raises(VdevError):
        encode("xvd" + disk_letters(1 << 20))


def test_undecodable() -> None:
    assert decode(3 << 8 | 2 << 6) is None  # hd major 3 has disks 0-1 only
    assert decode(4 << 8) is None  # a deprecated major
    assert decode(2 << 28) is None  # reserved
    assert decode(-1) is None
    assert decode(1 << 16 | 202 << 8) is None


xvd = st.tuples(st.just("xvd"), st.integers(0, (1 << 20) - 1), st.integers(0, 255))
sd = st.tuples(st.just("sd"), st.integers(0, 15), st.integers(0, 15))
hd = st.tuples(st.just("hd"), st.integers(0, 3), st.integers(0, 63))


def _name(family: str, disk: int, part: int) -> str:
    return f"{family}{disk_letters(disk)}{part or ''}"


@given(st.one_of(xvd, sd, hd))
def test_name_round_trip(item: tuple[str, int, int]) -> None:
    name = _name(*item)
    devid = encode(name)
    assert decode(devid) == name
    assert is_canonical(devid)
    v = parse(name)
    assert (v.family, v.disk, v.partition) == item


@given(st.integers(0, (2 << 28) - 1))
def test_number_round_trip(devid: int) -> None:
    name = decode(devid)
    if name is None:
        return
    if is_canonical(devid):
        assert encode(name) == devid
    else:
        # Only extended numbers of small disks are not canonical: they name a
        # device whose canonical number is the 202 one.
        assert devid & EXTENDED
        assert encode(name) == 202 << 8 | (devid >> 8 & 0xFFFFF) << 4 | (devid & 0xFF)


@given(st.integers(0, (1 << 20) - 1), st.integers(0, 255))
def test_generic_syntax_matches_xvd(disk: int, part: int) -> None:
    generic = f"d{disk}p{part}"
    assert encode(generic) == encode(_name("xvd", disk, part))
    if part == 0:
        assert encode(f"d{disk}") == encode(generic)


@given(st.integers(0, (1 << 31) - 1))
def test_any_int_passes_through(value: int) -> None:
    assert encode(str(value)) == value
    assert encode(hex(value)) == value
