"""Hypothesis strategies for KVP keys, values and whole pool files."""

from __future__ import annotations

from hypothesis import strategies as st

from kvpfs.kvp.records import KEY_FIELD_SIZE, RECORD_SIZE, VALUE_FIELD_SIZE, Record


def _no_nul(data: bytes) -> bytes:
    return data.replace(b"\0", b"\x01")


#: Any key the format can hold: 0..511 bytes without NUL, any other byte.
keys = st.binary(max_size=KEY_FIELD_SIZE - 1).map(_no_nul)
#: Keys from a tiny alphabet, so that duplicates and prefixes are common.
small_keys = st.sampled_from([b"", b"a", b"ab", b"b", b"A", b"a/b", b"\xff", b"key"])
values = st.binary(max_size=VALUE_FIELD_SIZE - 1).map(_no_nul)
short_values = st.binary(max_size=40).map(_no_nul)


@st.composite
def fields(draw: st.DrawFn, content: st.SearchStrategy[bytes], size: int) -> tuple[bytes, bytes]:
    """(raw field, content): the content, then usually NUL and leftover garbage.

    A content that fills the whole field has no NUL at all, which parsers must accept.
    """
    data = draw(content)[:size]
    if len(data) == size:
        return data, data
    garbage = draw(st.binary(max_size=size - len(data) - 1))
    raw = (data + b"\0" + garbage).ljust(size, b"\0")
    return raw, data


#: A key field with no NUL at all (only a broken writer makes one).
_full_keys = st.binary(min_size=KEY_FIELD_SIZE, max_size=KEY_FIELD_SIZE).map(_no_nul)
_full_values = st.binary(min_size=VALUE_FIELD_SIZE, max_size=VALUE_FIELD_SIZE).map(_no_nul)


@st.composite
def raw_records(draw: st.DrawFn, key_strategy: st.SearchStrategy[bytes]) -> tuple[bytes, Record]:
    """(raw 2560 bytes, the record a correct parser finds)."""
    raw_key, key = draw(fields(key_strategy | _full_keys, KEY_FIELD_SIZE))
    raw_value, value = draw(fields(short_values | values | _full_values, VALUE_FIELD_SIZE))
    return raw_key + raw_value, Record(key, value)


@st.composite
def pool_files(
    draw: st.DrawFn,
    key_strategy: st.SearchStrategy[bytes] = small_keys | keys,
    max_records: int = 8,
) -> tuple[bytes, list[Record]]:
    """(file bytes, the records a correct parser finds), with leftovers and a partial tail."""
    items = draw(st.lists(raw_records(key_strategy), max_size=max_records))
    tail = draw(st.binary(max_size=RECORD_SIZE - 1) | st.just(b""))
    data = b"".join(raw for raw, _ in items) + tail
    return data, [record for _, record in items]
