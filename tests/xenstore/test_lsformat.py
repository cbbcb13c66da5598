"""The xenstore-ls -f -p text format, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvpfs.xenstore.lsformat import (
    DumpedNode,
    escape_value,
    format_dump,
    parse_dump,
    unescape_value,
)
from kvpfs.xenstore.protocol import parse_perms_text


@given(st.binary(max_size=300))
def test_every_value_survives_escaping(value: bytes) -> None:
    assert unescape_value(escape_value(value)) == value


def test_escapes_as_xenstore_ls_prints_them() -> None:
    # Checked against the real xenstore-ls 4.17.
    assert escape_value(bytes(range(0, 9))) == "\\000\\001\\002\\003\\004\\005\\006\\007\\x08"
    assert escape_value(b'\t\n\r\\"\x7f\x80\xff ~') == '\\t\\n\\r\\\\"\\x7f\\x80\\xff ~'


def test_a_dump_round_trips() -> None:
    nodes = [
        DumpedNode("/a", b"", tuple(parse_perms_text("n0"))),
        DumpedNode("/a/b", b'x "quoted"   (n0)', tuple(parse_perms_text("n1,r0,b2"))),
        DumpedNode("/c", b"no perms", None),
    ]
    text = format_dump(nodes)
    assert text == '/a = ""   (n0)\n/a/b = "x "quoted"   (n0)"   (n1,r0,b2)\n/c = "no perms"\n'
    assert parse_dump(text) == nodes
