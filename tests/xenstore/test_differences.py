"""Where the embedded xenstored differs from cxenstored 4.17 on purpose.

README, "Where the embedded xenstored differs from cxenstored, on purpose": each
difference listed there is pinned here twice.  The ``embedded`` tests check what
the embedded server does (they always run); the ``cxenstored`` tests check that
cxenstored 4.17 still does what the README says it does (they skip without it),
so that the list stays true in both directions.  Everything else is compared byte
for byte by ``test_conformance.py``.
"""

from __future__ import annotations

import pytest

from kvpfs.xenstore.protocol import Op

from .conftest import ConnectionClosed, RawConn, ServerPath, header


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


def frame(op: int, payload: bytes, rid: int = 0) -> bytes:
    return header(op, len(payload), 0, rid) + payload


#: Requests whose argument list is malformed: more than one string, or an
#: unterminated one (cxenstored's ``onearg()`` returns NULL without setting errno).
MALFORMED = [
    pytest.param(Op.READ, z(b"/tool", b"x"), id="read-two-args"),
    pytest.param(Op.READ, b"/tool", id="read-unterminated"),
    pytest.param(Op.DIRECTORY, z(b"/tool", b"x"), id="directory-two-args"),
    pytest.param(Op.DIRECTORY, b"/tool", id="directory-unterminated"),
    pytest.param(Op.GET_PERMS, z(b"/tool", b"x"), id="get-perms-two-args"),
    pytest.param(Op.GET_PERMS, b"/tool", id="get-perms-unterminated"),
    pytest.param(Op.MKDIR, z(b"/t", b"x"), id="mkdir-two-args"),
    pytest.param(Op.MKDIR, b"/t", id="mkdir-unterminated"),
    pytest.param(Op.RM, z(b"/tool", b"x"), id="rm-two-args"),
    pytest.param(Op.RM, b"/tool", id="rm-unterminated"),
    pytest.param(Op.SET_PERMS, z(b"@other", b"n0"), id="set-perms-unknown-special"),
]

#: Requests that leave a known errno behind in cxenstored before the malformed one.
PRIMERS = [
    pytest.param(Op.READ, z(b"/no/such"), "ENOENT", id="after-ENOENT"),
    pytest.param(Op.WRITE, b"/t/a b\0v", "EINVAL", id="after-EINVAL"),
    pytest.param(Op.TRANSACTION_END, z(b"T"), "ENOENT", id="after-unknown-tx"),
]


# --------------------------------------------------------------------------- 1. stale errno


@pytest.mark.parametrize(("op", "payload"), MALFORMED)
@pytest.mark.parametrize(("primer", "primer_payload", "primer_error"), PRIMERS)
def test_embedded_malformed_arguments_are_einval_whatever_came_before(
    xenstored_embedded: ServerPath,
    op: int,
    payload: bytes,
    primer: int,
    primer_payload: bytes,
    primer_error: str,
) -> None:
    with RawConn(xenstored_embedded) as c:
        # As the very first request (where cxenstored would abort when errno is 0) ...
        assert c.rq(op, payload) == b"E:EINVAL"
        # ... and after a request that failed otherwise.
        assert c.rq(primer, primer_payload) == b"E:" + primer_error.encode()
        assert c.rq(op, payload) == b"E:EINVAL"
        # Nothing changed: /tool is still there, /t was not made.
        assert c.rq(Op.DIRECTORY, z(b"/tool")) == b"xenstored\0"
        assert c.rq(Op.READ, z(b"/t")) == b"E:ENOENT"


@pytest.mark.realxen
@pytest.mark.parametrize(("op", "payload"), MALFORMED)
def test_cxenstored_answers_malformed_arguments_with_a_stale_errno(
    xenstored_real: ServerPath, op: int, payload: bytes
) -> None:
    with RawConn(xenstored_real) as c:
        assert c.rq(Op.READ, z(b"/no/such")) == b"E:ENOENT"
        # MKDIR and RM turn the stale ENOENT into ENOMEM.
        stale = b"E:ENOMEM" if op in (Op.MKDIR, Op.RM) else b"E:ENOENT"
        assert c.rq(op, payload) == stale
        assert c.rq(Op.WRITE, b"/t/a b\0v") == b"E:EINVAL"
        assert c.rq(op, payload) == b"E:EINVAL"


# --------------------------------------------------------------------------- 2. SET_TARGET + RELEASE


def _target_setup(c: RawConn, watcher: RawConn) -> None:
    assert watcher.rq(Op.WATCH, z(b"@releaseDomain", b"rel")) == b"OK\0"
    assert [m.payload for m in watcher.sync()] == [b"@releaseDomain\0rel\0"]
    assert c.rq(Op.INTRODUCE, z(b"3", b"1", b"7")) == b"OK\0"
    assert c.rq(Op.INTRODUCE, z(b"7", b"1", b"7")) == b"OK\0"
    assert c.rq(Op.WRITE, b"/owned3\0v") == b"OK\0"
    assert c.rq(Op.SET_PERMS, z(b"/owned3", b"n3")) == b"OK\0"
    assert c.rq(Op.SET_TARGET, z(b"7", b"3")) == b"OK\0"


def test_embedded_release_of_a_target_releases_at_once(xenstored_embedded: ServerPath) -> None:
    with RawConn(xenstored_embedded) as c, RawConn(xenstored_embedded) as w:
        _target_setup(c, w)
        assert c.rq(Op.RELEASE, z(b"3")) == b"OK\0"
        assert c.rq(Op.IS_DOMAIN_INTRODUCED, z(b"3")) == b"F\0"
        assert c.rq(Op.READ, z(b"/owned3")) == b"E:ENOENT"
        assert [m.payload for m in w.sync()] == [b"@releaseDomain\0rel\0"]
        assert c.rq(Op.RELEASE, z(b"3")) == b"E:ENOENT"
        assert w.sync() == []
        # Domain 7 (whose target 3 was) is still there and releases normally.
        assert c.rq(Op.IS_DOMAIN_INTRODUCED, z(b"7")) == b"T\0"
        assert c.rq(Op.RELEASE, z(b"7")) == b"OK\0"
        assert [m.payload for m in w.sync()] == [b"@releaseDomain\0rel\0"]


def test_embedded_survives_the_sequence_that_crashes_cxenstored(
    xenstored_embedded: ServerPath,
) -> None:
    steps = [
        (Op.INTRODUCE, z(b"3", b"1", b"7"), b"OK\0"),
        (Op.INTRODUCE, z(b"7", b"1", b"7"), b"OK\0"),
        (Op.SET_TARGET, z(b"7", b"3"), b"OK\0"),
        (Op.RELEASE, z(b"3"), b"OK\0"),
        (Op.RELEASE, z(b"3"), b"E:ENOENT"),
        (Op.RELEASE, z(b"7"), b"OK\0"),
    ]
    with RawConn(xenstored_embedded) as c:
        for op, payload, want in steps:
            assert c.rq(op, payload) == want
        assert c.rq(Op.IS_DOMAIN_INTRODUCED, z(b"7")) == b"F\0"
    with RawConn(xenstored_embedded) as c:
        assert c.rq(Op.DIRECTORY, z(b"/tool")) == b"xenstored\0"


@pytest.mark.realxen
def test_cxenstored_keeps_a_target_until_the_second_release(xenstored_real: ServerPath) -> None:
    with RawConn(xenstored_real) as c, RawConn(xenstored_real) as w:
        _target_setup(c, w)
        assert c.rq(Op.RELEASE, z(b"3")) == b"OK\0"
        assert c.rq(Op.IS_DOMAIN_INTRODUCED, z(b"3")) == b"T\0"
        assert c.rq(Op.READ, z(b"/owned3")) == b"v"
        assert w.sync() == []
        assert c.rq(Op.RELEASE, z(b"3")) == b"OK\0"
        assert c.rq(Op.IS_DOMAIN_INTRODUCED, z(b"3")) == b"F\0"
        assert c.rq(Op.READ, z(b"/owned3")) == b"E:ENOENT"
        assert [m.payload for m in w.sync()] == [b"@releaseDomain\0rel\0"]
        # (RELEASE 7 now would be the use after free that kills cxenstored.)


# --------------------------------------------------------------------------- 3. @releaseDomain order


def _release_order(path: str, introduce_first: bool) -> list[int]:
    """Message types a watcher of @releaseDomain receives when it releases a domain
    that was introduced before it connected, or by itself after it connected."""
    with RawConn(path) as other:
        if introduce_first:
            assert other.rq(Op.INTRODUCE, z(b"5", b"1", b"7")) == b"OK\0"
        with RawConn(path) as c:
            assert c.rq(Op.WATCH, z(b"@releaseDomain", b"r")) == b"OK\0"
            c.sync()
            if not introduce_first:
                # Domain 5's connection comes right after c's in cxenstored's list.
                assert c.rq(Op.INTRODUCE, z(b"5", b"1", b"7")) == b"OK\0"
            c.send(Op.RELEASE, z(b"5"))
            got = c.sync()
    assert sorted((m.type, m.payload) for m in got) == [
        (Op.RELEASE, b"OK\0"),
        (Op.WATCH_EVENT, b"@releaseDomain\0r\0"),
    ]
    return [m.type for m in got]


@pytest.mark.parametrize("introduce_first", [True, False], ids=["before", "after"])
def test_embedded_release_event_always_precedes_the_reply(
    xenstored_embedded: ServerPath, introduce_first: bool
) -> None:
    assert _release_order(xenstored_embedded, introduce_first) == [Op.WATCH_EVENT, Op.RELEASE]


@pytest.mark.realxen
def test_cxenstored_release_event_follows_the_reply_when_next_in_its_list(
    xenstored_real: ServerPath,
) -> None:
    assert _release_order(xenstored_real, True) == [Op.WATCH_EVENT, Op.RELEASE]
    assert _release_order(xenstored_real, False) == [Op.RELEASE, Op.WATCH_EVENT]


# --------------------------------------------------------------------------- 4. oversized header


def _replies_before_oversized_header(path: str) -> list[tuple[int, int, bytes]]:
    got: list[tuple[int, int, bytes]] = []
    with RawConn(path) as c:
        c.send_raw(
            frame(Op.WRITE, b"/p\0v", 1)
            + frame(Op.READ, z(b"/p"), 2)
            + header(Op.WRITE, 4097)
            + b"/t\0"
            + b"v" * 100
        )
        try:
            while (msg := c.recv(timeout=5)) is not None:
                got.append((msg.type, msg.req_id, msg.payload))
        except ConnectionClosed:
            pass
        assert c.closed
    with RawConn(path) as c:  # both earlier requests were carried out
        assert c.rq(Op.READ, z(b"/p")) == b"v"
    return got


def test_embedded_sends_replies_queued_before_an_oversized_header(
    xenstored_embedded: ServerPath,
) -> None:
    assert _replies_before_oversized_header(xenstored_embedded) == [
        (Op.WRITE, 1, b"OK\0"),
        (Op.READ, 2, b"v"),
    ]


@pytest.mark.realxen
def test_cxenstored_drops_replies_queued_before_an_oversized_header(
    xenstored_real: ServerPath,
) -> None:
    assert _replies_before_oversized_header(xenstored_real) == []


# --------------------------------------------------------------------------- 5. permission id 2^31


def _perms_after(path: str, *perms: bytes) -> bytes:
    with RawConn(path) as c:
        assert c.rq(Op.WRITE, b"/p\0v") == b"OK\0"
        assert c.rq(Op.SET_PERMS, z(b"/p", *perms)) == b"OK\0"
        return c.rq(Op.GET_PERMS, z(b"/p"))


@pytest.mark.parametrize(
    ("perms", "want"),
    [
        ((b"n0", b"r2147483648"), b"n0\0r-2147483648\0"),
        ((b"n2147483648",), b"n-2147483648\0"),
        ((b"n0", b"w-2147483648"), b"n0\0w-2147483648\0"),
        ((b"n0", b"b4294967296"), b"n0\0b0\0"),
    ],
)
def test_embedded_prints_a_permission_id_of_2_31_whole(
    xenstored_embedded: ServerPath, perms: tuple[bytes, ...], want: bytes
) -> None:
    assert _perms_after(xenstored_embedded, *perms) == want


@pytest.mark.realxen
def test_cxenstored_prints_a_permission_id_of_2_31_truncated(xenstored_real: ServerPath) -> None:
    assert _perms_after(xenstored_real, b"n0", b"r2147483648") == b"n0\0r-214748364\0"
