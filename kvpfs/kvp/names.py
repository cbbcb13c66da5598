"""KVP key ↔ filename: a reversible escaping with exactly one filename per key.

A key is 0 to 511 bytes without NUL, in practice UTF-8, but nothing enforces
that; it may contain ``/``, start with ``.``, be empty, or look like an editor's
scratch file.  The filename of a key is the key itself, except that some bytes
are written as ``%`` followed by two **lowercase** hex digits:

1. ``%`` (``%25``) and ``/`` (``%2f``), always;
2. every byte that is not part of valid UTF-8 (one ``%xx`` per byte);
3. control characters, C0, DEL and C1 (U+0000–U+001F, U+007F–U+009F): each byte
   of their UTF-8 encoding, e.g. a tab is ``%09`` and U+0085 is ``%c2%85``;
4. a leading ``.`` (``%2e``), so no key is hidden, and ``.`` and ``..`` are
   ordinary keys (``%2e`` and ``%2e.``);
5. one character of a name that would otherwise look like an editor or tool
   scratch file (:func:`kvpfs.scratch.is_scratch_name`), which the mount keeps
   in memory and never stores: a trailing ``~`` (``%7e``), the dot of a ``.tmp``
   suffix (``x%2etmp``), the leading ``#`` of ``#x#`` (``%23x#``), and the first
   character of ``sedXXXXXX`` and of vim's probe numbers (``%73ed1a2b3c``,
   ``%34913``).

The empty key is the name ``%00`` (NUL cannot occur in a key, so ``%00`` is
free; an empty key field starts with NUL on disk).

Decoding accepts only the canonical form, the one :func:`key_to_name` produces:
``%61`` for ``a``, ``%2F``, a raw control character or a stray ``%`` are not
names of any key (:class:`InvalidName`).  So every key has one name and every
valid name one key; a name that is not canonical can neither be found nor
created.

Names are ``str`` as the FUSE layer handles them (``os.fsdecode`` of the kernel's
bytes); a key's name contains only valid UTF-8 and never ``/`` or NUL.

The kernel refuses filenames over 1024 bytes on a FUSE mount (FUSE_NAME_MAX),
and an escape is three bytes, so a long key full of escaped bytes could have no
usable name.  A key whose escaped name would exceed :data:`NAME_LIMIT` is named
``%=`` followed by the unpadded URL-safe base64 of the key instead (at most 684
bytes for a 511-byte key).  That form is canonical only for such keys, so the
one-name-per-key rule still holds.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from kvpfs.kvp.records import MAX_KEY_BYTES
from kvpfs.scratch import is_scratch_name

#: The filename of the empty key.
EMPTY_KEY_NAME = "%00"
#: Longest filename the kernel passes to a FUSE filesystem (FUSE_NAME_MAX).
NAME_LIMIT = 1024
#: Prefix of the compact name of a key whose escaped name would exceed NAME_LIMIT.
COMPACT_PREFIX = "%="
#: Longest filename (in bytes) of any key the format can hold: its compact form.
MAX_NAME_BYTES = len(COMPACT_PREFIX) + (4 * MAX_KEY_BYTES + 2) // 3

# Keys made only of printable ASCII other than % and / are their own names
# (apart from the leading-dot and scratch rules); most real keys are like this.
_PLAIN_ASCII = re.compile(rb"[\x20-\x24\x26-\x2e\x30-\x7e]*")
# In a key decoded with surrogateescape, U+DC80..U+DCFF stand for the bytes that
# are not valid UTF-8 (the strict decoder also rejects encoded surrogates).
_NEEDS_ESCAPE = re.compile("[\x00-\x1f\x7f-\x9f%/\udc80-\udcff]")
_ESCAPE = re.compile(rb"%([0-9a-f]{2})")
_SCRATCH_TMP = ".tmp"
_COMPACT = re.compile(r"[A-Za-z0-9_-]+")


class InvalidName(ValueError):
    """The filename is not the canonical escape of any key."""


def _escape_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"%{code - 0xDC00:02x}"
    return "".join(f"%{byte:02x}" for byte in char.encode("utf-8"))


def _escape_match(match: re.Match[str]) -> str:
    return _escape_char(match.group())


def _escape_first(name: str) -> str:
    return name if name.startswith("%") else _escape_char(name[0]) + name[1:]


def _unscratch(name: str) -> str:
    # One escaped character breaks each pattern.  The suffixes first, since
    # escaping a first character cannot change how a name ends.
    if name.endswith("~"):
        name = name[:-1] + "%7e"
    elif name.endswith(_SCRATCH_TMP):
        name = name[: -len(_SCRATCH_TMP)] + "%2etmp"
    if is_scratch_name(name):
        # "#x#", "sedXXXXXX", vim's "4913": all are broken by their first character.
        name = _escape_first(name)
    if is_scratch_name(name):
        # Only reachable if the scratch rule grows a pattern this module does not
        # know: escaping every character still yields a valid, reversible name.
        name = "".join(_escape_char(char) for char in os.fsdecode(_decode_escapes(name)))
    if is_scratch_name(name):  # pragma: no cover - guarded by the property tests
        raise AssertionError(f"no non-scratch name for {name!r}")
    return name


def key_to_name(key: bytes) -> str:
    """The one filename of ``key``."""
    if not key:
        return EMPTY_KEY_NAME
    if _PLAIN_ASCII.fullmatch(key):
        name = key.decode("ascii")
    else:
        name = _NEEDS_ESCAPE.sub(_escape_match, key.decode("utf-8", "surrogateescape"))
    if name.startswith("."):
        name = "%2e" + name[1:]
    if is_scratch_name(name):
        name = _unscratch(name)
    if len(name) > NAME_LIMIT // 4 and len(os.fsencode(name)) > NAME_LIMIT:
        return COMPACT_PREFIX + base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")
    return name


def _decode_compact(name: str) -> bytes:
    text = name[len(COMPACT_PREFIX) :]
    if not _COMPACT.fullmatch(text):
        raise InvalidName(f"bad compact name {name!r}")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error) as exc:
        raise InvalidName(f"bad compact name {name!r}") from exc


def _decode_escapes(name: str) -> bytes:
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError as exc:  # a surrogate that no filename decodes to
        raise InvalidName(f"not a filename: {name!r}") from exc
    if b"%" not in raw:
        return raw
    parts = raw.split(b"%")
    out = bytearray(parts[0])
    for part in parts[1:]:
        if not _ESCAPE.fullmatch(b"%" + part[:2]):
            raise InvalidName(f"bad escape in {name!r}")
        out.append(int(part[:2], 16))
        out += part[2:]
    return bytes(out)


def name_to_key(name: str) -> bytes:
    """The key whose filename is ``name``; :class:`InvalidName` if there is none.

    ``name`` is a filename as ``os.fsdecode`` gives it.  The key may be longer than
    the format allows (:data:`~kvpfs.kvp.records.MAX_KEY_BYTES`); callers check that.
    """
    if name == EMPTY_KEY_NAME:
        return b""
    decode = _decode_compact if name.startswith(COMPACT_PREFIX) else _decode_escapes
    key = decode(name)
    if not key or b"\0" in key or key_to_name(key) != name:
        raise InvalidName(f"not the canonical name of a key: {name!r}")
    return key


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is the filename of some key."""
    try:
        name_to_key(name)
    except InvalidName:
        return False
    return True
