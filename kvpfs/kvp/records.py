"""The KVP pool file format as pure functions: parse bytes, plan edits.  No I/O.

A pool file is a flat array of 2560-byte records, each a 512-byte key field
followed by a 2048-byte value field.  Every field ends at its first NUL; the
bytes after it are leftovers of earlier contents (the daemon never clears them)
and carry no meaning.  Keys and values are kept as raw bytes: the format does
not guarantee UTF-8.

The semantics are those of ``hv_kvp_daemon``, the program the host talks to:

* a trailing partial record is ignored by readers, and the daemon's next
  rewrite drops it, so a new record goes to the record boundary
  ``complete_records * RECORD_SIZE`` (overwriting such a tail);
* when several records share a key, the **first** one is that key's value:
  the daemon reads, modifies and deletes the first match;
* deleting a record shifts every later record up by one, keeping the order.

Edits are planned here as :class:`Edit` values (one ``pwrite`` plus an optional
``ftruncate``) so that the I/O layer stays a thin executor and the planning is
testable against :func:`apply_edit` without files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

KEY_FIELD_SIZE = 512
VALUE_FIELD_SIZE = 2048
RECORD_SIZE = KEY_FIELD_SIZE + VALUE_FIELD_SIZE
#: Longest key and value the format can hold: the field minus its NUL.
MAX_KEY_BYTES = KEY_FIELD_SIZE - 1
MAX_VALUE_BYTES = VALUE_FIELD_SIZE - 1

_NUL = b"\0"


class Record(NamedTuple):
    """One record's key and value, each cut at its first NUL."""

    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Edit:
    """Write ``data`` at ``offset``, then truncate the file to ``truncate_to`` if set."""

    offset: int
    data: bytes
    truncate_to: int | None = None


def cut(field: bytes) -> bytes:
    """A field's content: everything before its first NUL (the whole field if none)."""
    end = field.find(_NUL)
    return field if end < 0 else field[:end]


def complete_records(size: int) -> int:
    """How many whole records a file of ``size`` bytes holds."""
    return size // RECORD_SIZE


def record_offset(index: int) -> int:
    """Byte offset of record ``index``."""
    return index * RECORD_SIZE


def value_offset(index: int) -> int:
    """Byte offset of record ``index``'s value field."""
    return index * RECORD_SIZE + KEY_FIELD_SIZE


def append_offset(size: int) -> int:
    """Where a new record goes: the record boundary after the last whole record."""
    return complete_records(size) * RECORD_SIZE


def parse(data: bytes) -> list[Record]:
    """All whole records of a pool file's contents, in file order, duplicates included."""
    records: list[Record] = []
    append = records.append
    find = data.find
    for start in range(0, complete_records(len(data)) * RECORD_SIZE, RECORD_SIZE):
        # Searching in place avoids copying whole fields just to cut them.
        value_start = start + KEY_FIELD_SIZE
        end = start + RECORD_SIZE
        key_end = find(_NUL, start, value_start)
        value_end = find(_NUL, value_start, end)
        append(
            Record(
                data[start : value_start if key_end < 0 else key_end],
                data[value_start : end if value_end < 0 else value_end],
            )
        )
    return records


def first_indexes(keys: Iterable[bytes]) -> dict[bytes, int]:
    """Key → index of the first record holding it; iteration order is file order."""
    first: dict[bytes, int] = {}
    for index, key in enumerate(keys):
        if key not in first:
            first[key] = index
    return first


def visible(records: Iterable[Record]) -> dict[bytes, bytes]:
    """Key → value as the daemon sees it (first record wins), in file order."""
    result: dict[bytes, bytes] = {}
    for key, value in records:
        if key not in result:
            result[key] = value
    return result


def _check(key: bytes, value: bytes) -> None:
    if len(key) > MAX_KEY_BYTES or _NUL in key:
        raise ValueError(f"key does not fit a key field: {key!r}")
    if len(value) > MAX_VALUE_BYTES or _NUL in value:
        raise ValueError(f"value does not fit a value field ({len(value)} bytes)")


def encode_key_field(key: bytes) -> bytes:
    """A key field: the key, NUL-padded to 512 bytes."""
    _check(key, b"")
    return key.ljust(KEY_FIELD_SIZE, _NUL)


def encode_value_field(value: bytes) -> bytes:
    """A value field: the value, NUL-padded to 2048 bytes."""
    _check(b"", value)
    return value.ljust(VALUE_FIELD_SIZE, _NUL)


def encode_record(key: bytes, value: bytes) -> bytes:
    """A whole record with both fields NUL-padded (no leftovers after the NULs)."""
    _check(key, value)
    return key.ljust(KEY_FIELD_SIZE, _NUL) + value.ljust(VALUE_FIELD_SIZE, _NUL)


def plan_set(first: Mapping[bytes, int], size: int, key: bytes, value: bytes) -> Edit:
    """Set ``key`` in a file of ``size`` bytes whose first-match map is ``first``.

    An existing key gets its first record's value field rewritten (NUL-padded, so
    no stale bytes of the old value survive) and its key field left alone; a new key
    gets a whole record at the record boundary, overwriting any partial tail.  Nothing
    outside those bytes changes.
    """
    index = first.get(key)
    if index is not None:
        return Edit(value_offset(index), encode_value_field(value))
    # A partial tail is shorter than a record, so the new record covers all of it.
    return Edit(append_offset(size), encode_record(key, value))


def plan_rename_key(index: int, new_key: bytes) -> Edit:
    """Give record ``index`` a new key in place (its value field stays as it is)."""
    return Edit(record_offset(index), encode_key_field(new_key))


def plan_delete(index: int, size: int, following: bytes) -> Edit:
    """Remove record ``index`` from a file of ``size`` bytes.

    ``following`` must be the file's bytes from the end of record ``index`` to the
    end of the file: they move up by one record verbatim (leftovers after NULs and a
    partial tail included), and the file shrinks by one record.
    """
    start = record_offset(index)
    if start + RECORD_SIZE + len(following) != size:
        raise ValueError("following bytes do not reach the end of the file")
    return Edit(start, following, size - RECORD_SIZE)


def apply_edit_in_place(buf: bytearray, edit: Edit) -> None:
    """Change ``buf`` as ``pwrite`` + ``ftruncate`` of ``edit`` change a file."""
    if len(buf) < edit.offset:
        buf.extend(bytes(edit.offset - len(buf)))
    buf[edit.offset : edit.offset + len(edit.data)] = edit.data
    if edit.truncate_to is not None:
        del buf[edit.truncate_to :]
        if len(buf) < edit.truncate_to:
            buf.extend(bytes(edit.truncate_to - len(buf)))


def apply_edit(data: bytes, edit: Edit) -> bytes:
    """The file contents after ``edit``, as ``pwrite`` + ``ftruncate`` would leave them."""
    buf = bytearray(data)
    apply_edit_in_place(buf, edit)
    return bytes(buf)
