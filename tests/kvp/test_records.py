"""The pool file codec: parsing quirks and edit planning, against a byte-level model."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvpfs.kvp import records as rec
from kvpfs.kvp.records import RECORD_SIZE, Record

from .strategies import keys, pool_files, short_values, small_keys, values


def test_sizes() -> None:
    assert (rec.KEY_FIELD_SIZE, rec.VALUE_FIELD_SIZE, RECORD_SIZE) == (512, 2048, 2560)
    assert (rec.MAX_KEY_BYTES, rec.MAX_VALUE_BYTES) == (511, 2047)
    assert [rec.record_offset(i) for i in range(3)] == [0, 2560, 5120]
    assert rec.value_offset(2) == 5632
    assert [rec.append_offset(n) for n in (0, 1, 2559, 2560, 2561, 5120)] == [
        0, 0, 0, 2560, 2560, 5120,
    ]


@given(keys, values)
def test_record_round_trip(key: bytes, value: bytes) -> None:
    raw = rec.encode_record(key, value)
    assert len(raw) == RECORD_SIZE
    assert rec.parse(raw) == [Record(key, value)]
    # NUL padding: nothing after the content.
    assert raw[len(key) : 512] == bytes(512 - len(key))
    assert raw[512 + len(value) :] == bytes(2048 - len(value))


@given(pool_files())
def test_parse_cuts_at_nul_and_ignores_partial_tail(case: tuple[bytes, list[Record]]) -> None:
    data, expected = case
    assert rec.parse(data) == expected


def test_parse_examples() -> None:
    # The daemon's leftovers after modifying "a-longer-value2" to "v".
    field = b"v\0longer-value2".ljust(2048, b"\0")
    assert rec.parse(b"HostKey2".ljust(512, b"\0") + field) == [Record(b"HostKey2", b"v")]
    # A field with no NUL is all content; a 100-byte tail is nothing.
    full = b"k" * 512 + b"v" * 2048
    assert rec.parse(full + b"x" * 100) == [Record(b"k" * 512, b"v" * 2048)]
    assert rec.parse(b"") == []
    assert rec.parse(b"\0" * 2559) == []
    assert rec.parse(b"\0" * 2560) == [Record(b"", b"")]
    # Keys and values stay bytes, even when they are not UTF-8.
    assert rec.parse(rec.encode_record(b"\xff\xfe", b"\xc3")) == [Record(b"\xff\xfe", b"\xc3")]


@given(st.lists(st.tuples(small_keys, short_values), max_size=10))
def test_first_duplicate_wins(items: list[tuple[bytes, bytes]]) -> None:
    records = [Record(k, v) for k, v in items]
    expected: dict[bytes, bytes] = {}
    for key, value in items:
        expected.setdefault(key, value)
    assert rec.visible(records) == expected
    assert list(rec.visible(records)) == list(expected)  # file order of first occurrence
    first = rec.first_indexes(r.key for r in records)
    assert {k: records[i].value for k, i in first.items()} == expected
    assert all(records.index(next(r for r in records if r.key == k)) == i for k, i in first.items())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"k" * 512, b""),
        (b"", b"v" * 2048),
        (b"a\0b", b""),
        (b"", b"a\0b"),
    ],
)
def test_encode_refuses_what_a_field_cannot_hold(key: bytes, value: bytes) -> None:
    with pytest.raises(ValueError):
        rec.encode_record(key, value)


@given(pool_files(), small_keys | keys, short_values | values)
def test_plan_set(case: tuple[bytes, list[Record]], key: bytes, value: bytes) -> None:
    data, records = case
    first = rec.first_indexes(r.key for r in records)
    edit = rec.plan_set(first, len(data), key, value)
    after = rec.apply_edit(data, edit)
    parsed = rec.parse(after)
    expected = rec.visible(records)
    expected[key] = value
    assert rec.visible(parsed) == expected
    if key in first:
        # Only the value field of the first match changes, to the value NUL-padded.
        start = rec.value_offset(first[key])
        assert after[:start] == data[:start]
        assert after[start : start + 2048] == value.ljust(2048, b"\0")
        assert after[start + 2048 :] == data[start + 2048 :]
        assert len(after) == len(data)
    else:
        # A new record at the record boundary, where it replaces a partial tail.
        boundary = len(data) // RECORD_SIZE * RECORD_SIZE
        assert after == data[:boundary] + rec.encode_record(key, value)
        assert parsed[:-1] == records and parsed[-1] == Record(key, value)


@given(pool_files(), st.data())
def test_plan_delete(case: tuple[bytes, list[Record]], data_st: st.DataObject) -> None:
    data, records = case
    assume(records)
    index = data_st.draw(st.integers(0, len(records) - 1))
    start = rec.record_offset(index)
    following = data[start + RECORD_SIZE :]
    after = rec.apply_edit(data, rec.plan_delete(index, len(data), following))
    # Byte for byte: the record is gone, everything after it (leftovers, tail) moved up.
    assert after == data[:start] + following
    assert rec.parse(after) == records[:index] + records[index + 1 :]


def test_plan_delete_checks_its_input() -> None:
    with pytest.raises(ValueError):
        rec.plan_delete(0, 2 * RECORD_SIZE, b"short")


def test_delete_first_duplicate_exposes_the_second() -> None:
    data = rec.encode_record(b"dup", b"first") + rec.encode_record(b"dup", b"second")
    first = rec.first_indexes(r.key for r in rec.parse(data))
    after = rec.apply_edit(data, rec.plan_delete(first[b"dup"], len(data), data[RECORD_SIZE:]))
    assert rec.visible(rec.parse(after)) == {b"dup": b"second"}


@given(pool_files(), st.data(), keys)
def test_plan_rename_key(
    case: tuple[bytes, list[Record]], data_st: st.DataObject, new: bytes
) -> None:
    data, records = case
    assume(records)
    index = data_st.draw(st.integers(0, len(records) - 1))
    after = rec.apply_edit(data, rec.plan_rename_key(index, new))
    start = rec.record_offset(index)
    assert after[:start] == data[:start]
    assert after[start : start + 512] == new.ljust(512, b"\0")
    assert after[start + 512 :] == data[start + 512 :]
    assert rec.parse(after)[index] == Record(new, records[index].value)


def test_apply_edit_models_pwrite_and_ftruncate() -> None:
    assert rec.apply_edit(b"abc", rec.Edit(5, b"x")) == b"abc\0\0x"
    assert rec.apply_edit(b"abcdef", rec.Edit(1, b"X", truncate_to=3)) == b"aXc"
    assert rec.apply_edit(b"ab", rec.Edit(0, b"", truncate_to=4)) == b"ab\0\0"
