"""kvpfs.xenstore.protocol's input rules, checked against cxenstored 4.17 itself.

For generated payloads, the protocol module must reject exactly what the real daemon
answers with EINVAL, and compute exactly what it answers (domain paths, DIRECTORY_PART
chunks).  One daemon serves a whole test; the generated requests only read, or write
below a scratch node.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvpfs.xenstore import protocol as p
from kvpfs.xenstore.protocol import Op, ProtocolError

from .conftest import RawConn, ServerPath

pytestmark = pytest.mark.realxen

fuzz = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

path_text = st.text(alphabet="/a@-_ .\x01Z9", max_size=14).map(str.encode)
perm_text = st.text(alphabet="rwbnqR0x19- +\t", max_size=6).map(str.encode)


@pytest.fixture
def conn(xenstored_real: ServerPath) -> Iterator[RawConn]:
    with RawConn(xenstored_real) as c:
        assert c.rq(Op.WRITE, b"/p\0") == b"OK\0"
        yield c


def is_einval(reply: bytes) -> bool:
    return reply == b"E:EINVAL"


def rejects(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except ProtocolError as exc:
        assert exc.errno == errno.EINVAL
        return True
    return False


@fuzz
@given(path_text)
@example(b"/local/domain/5/" + b"a" * 2048)
@example(b"/local/domain/-5/" + b"a" * 2048)
@example(b"/local/domain/123456/" + b"a" * 2040)
@example(b"/t/" + b"a" * 2046)
@example(b"@introduceDomain")
@example(b"")
def test_node_paths(conn: RawConn, path: bytes) -> None:
    reply = conn.rq(Op.READ, path + b"\0")
    assert is_einval(reply) == rejects(p.check_path, path), reply


@fuzz
@given(st.binary(max_size=8).map(lambda b: b.replace(b"\xff", b"")))
def test_single_argument_framing(conn: RawConn, tail: bytes) -> None:
    """Payloads that are not one NUL-terminated string are refused by both; cxenstored
    answers such a request with a stale errno (not always EINVAL), so only "some
    error" is compared there."""
    payload = b"/p" + tail
    reply = conn.rq(Op.READ, payload)
    if rejects(p.onearg, payload):
        assert reply.startswith(b"E:"), reply
    else:
        assert is_einval(reply) == rejects(p.check_path, payload[:-1]), reply


@fuzz
@given(path_text, st.binary(max_size=6).filter(lambda b: b"\0" not in b), st.integers(0, 3))
@example(b"@" + b"a" * 2048, b"t", 2)
@example(b"@" + b"a" * 2047, b"t", 2)
@example(b"@a b!", b"t", 2)
def test_watch_arguments(conn: RawConn, path: bytes, token: bytes, nargs: int) -> None:
    args = [path, b"T" + token, b"1"][:nargs]
    payload = b"".join(a + b"\0" for a in args)
    reply = conn.rq(Op.WATCH, payload)

    def check(payload: bytes) -> None:
        wpath, _ = p.parse_watch(payload)
        p.check_watch_path(wpath)

    assert is_einval(reply) == rejects(check, payload), reply
    if reply == b"OK\0":
        conn.rq(Op.UNWATCH, payload)


@fuzz
@given(st.lists(perm_text, max_size=3), st.booleans())
@example([b"n0x10"], True)
@example([b"n08"], True)
@example([b"r 5"], True)
@example([b"n99999999999"], True)
@example([], True)
def test_set_perms_arguments(conn: RawConn, perms: list[bytes], terminated: bool) -> None:
    payload = b"/p\0" + b"\0".join(perms) + (b"\0" if terminated and perms else b"")
    reply = conn.rq(Op.SET_PERMS, payload)
    assert is_einval(reply) == rejects(p.parse_set_perms, payload), reply
    if reply == b"OK\0":
        _, parsed = p.parse_set_perms(payload)
        assert conn.rq(Op.GET_PERMS, b"/p\0") == p.format_perms(parsed)


@fuzz
@given(st.text(alphabet="0123456789-+ xa", max_size=12).map(str.encode))
@example(b"-3")
@example(b"0x10")
@example(b"99999999999")
def test_domain_ids_read_with_atoi(conn: RawConn, domid: bytes) -> None:
    assert conn.rq(Op.GET_DOMAIN_PATH, domid + b"\0") == p.domain_path(p.c_atoi(domid)) + b"\0"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_directory_part_chunks(conn: RawConn, data: st.DataObject) -> None:
    names = [b"c%d-" % i + b"x" * (i * 37 % 300) for i in range(40)]
    child_list = p.build_strings(names)
    if conn.rq(Op.DIRECTORY, b"/dp\0") != child_list:
        conn.rq(Op.RM, b"/dp\0")
        for n in names:
            conn.rq(Op.WRITE, b"/dp/" + n + b"\0")
    offset = data.draw(st.integers(-2, len(child_list) + 3))
    reply = conn.rq(Op.DIRECTORY_PART, b"/dp\0%d\0" % offset)
    generation = int(reply.split(b"\0", 1)[0])
    assert reply == p.build_directory_part_reply(generation, child_list, offset)
    part = p.parse_directory_part_reply(reply)
    assert part.final == (reply.endswith(b"\0\0"))
