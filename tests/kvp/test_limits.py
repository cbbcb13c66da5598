"""Counting UTF-16 units the way the host receives guest-pool strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvpfs.kvp.limits import HOST_MAX_KEY_UNITS, HOST_MAX_VALUE_UNITS, utf16_units


def test_host_limits() -> None:
    assert (HOST_MAX_KEY_UNITS, HOST_MAX_VALUE_UNITS) == (254, 1022)


@given(st.text())
def test_utf16_units(text: str) -> None:
    assert utf16_units(text) == sum(2 if ord(c) > 0xFFFF else 1 for c in text)
