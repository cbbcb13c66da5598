"""The text of ``xenstore-ls -f -p``: what an administrator can capture from a dom0.

Pure.  One line per node, parents before children, in the order ``xenstore-ls``
walks the tree::

    /local/domain/1/name = "guest1"   (n0,r1)

The value is quoted and escaped as xenstore-ls 4.17 escapes it (checked against
the real tool): ``\\\\`` for a backslash, ``\\t``, ``\\n``, ``\\r``, three octal
digits for bytes 0-7 (``\\000``), ``\\xHH`` for the other bytes below 0x20 and
for 0x7f-0xff; a double quote stays as it is.  Without ``-p`` the permissions are
absent.  xenstore-ls cuts values to the terminal's width when its output is a
terminal, so a dump must be taken with the output redirected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kvpfs.xenstore.protocol import Perm, ProtocolError, is_valid_nodename, parse_perms_text


class DumpError(ValueError):
    """A line that is not ``xenstore-ls -f [-p]`` output; the message names it."""


@dataclass(frozen=True, slots=True)
class DumpedNode:
    path: str
    value: bytes
    #: None when the dump was taken without ``-p``.
    perms: tuple[Perm, ...] | None


_SIMPLE = {ord("\\"): b"\\\\", ord("\t"): b"\\t", ord("\n"): b"\\n", ord("\r"): b"\\r"}
_ESCAPE = [
    _SIMPLE.get(c)
    or (b"\\%03o" % c if c < 8 else b"\\x%02x" % c if c < 0x20 or c > 0x7E else bytes([c]))
    for c in range(256)
]
_UNESCAPE = {"\\": 0x5C, "t": 0x09, "n": 0x0A, "r": 0x0D, "a": 0x07, "b": 0x08,
             "f": 0x0C, "v": 0x0B, '"': 0x22, "'": 0x27}
_ESCAPED = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", re.S)
_LINE = re.compile(r'(?P<path>/\S*) = "(?P<value>.*)"(?:   \((?P<perms>[^()]*)\))?')


def escape_value(value: bytes) -> str:
    """The value as xenstore-ls prints it between the quotes."""
    return b"".join(_ESCAPE[c] for c in value).decode("latin-1")


def unescape_value(text: str) -> bytes:
    """The bytes of a value printed by xenstore-ls (also other C escapes)."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code[0] in "01234567":
            return chr(int(code, 8) & 0xFF)
        if code in _UNESCAPE:
            return chr(_UNESCAPE[code])
        raise DumpError(f"unknown escape \\{code}")

    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        # A dump saved as UTF-8 text: non-ASCII characters are their UTF-8 bytes.
        raw = text.encode("utf-8")
    return _ESCAPED.sub(one, raw.decode("latin-1")).encode("latin-1")


def format_node(node: DumpedNode) -> str:
    line = f'{node.path} = "{escape_value(node.value)}"'
    if node.perms is not None:
        line += f"   ({','.join(str(p) for p in node.perms)})"
    return line


def format_dump(nodes: Iterable[DumpedNode]) -> str:
    return "".join(format_node(node) + "\n" for node in nodes)


def parse_dump(text: str) -> list[DumpedNode]:
    """The nodes of a dump, in order; :class:`DumpError` names the first bad line."""
    nodes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise DumpError(f"line {number}: not 'PATH = \"VALUE\"   (PERMS)' (xenstore-ls -f -p)")
        path = match.group("path")
        if path == "/" or not is_valid_nodename(path):
            raise DumpError(f"line {number}: {path!r} is not a XenStore path")
        try:
            value = unescape_value(match.group("value"))
            perms_text = match.group("perms")
            perms = None if perms_text is None else tuple(parse_perms_text(perms_text))
        except (DumpError, ProtocolError) as exc:
            raise DumpError(f"line {number}: {exc}") from None
        if perms == ():
            raise DumpError(f"line {number}: no permissions")
        nodes.append(DumpedNode(path, value, perms))
    return nodes
