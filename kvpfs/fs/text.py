"""The text convention of key files, as in sysfs and xenstore-read/-write.

Reading a key file gives the value followed by one newline; writing drops exactly
one trailing newline before storing.  So ``cat k > k2`` copies a value exactly,
and ``echo v > k`` stores ``v``.  With ``-o raw`` files are the bytes as stored.
"""

from __future__ import annotations


def value_to_file(value: bytes, raw: bool) -> bytes:
    return value if raw else value + b"\n"


def file_to_value(content: bytes, raw: bool) -> bytes:
    if not raw and content.endswith(b"\n"):
        return content[:-1]
    return content


def file_size(value_size: int, raw: bool) -> int:
    return value_size if raw else value_size + 1
