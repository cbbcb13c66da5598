"""The store model directly: unprivileged domains (permissions, quotas, targets) and
the starting trees.

cxenstored offers no way to talk as a guest without a hypervisor (a guest uses a
shared ring, and the test shim gives introduced domains a silent one), so these
expectations come from the reference (§7, §8.4, §11) and run on the model only.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kvpfs.peers.xenstored.store import Quotas, Store, _ancestors
from kvpfs.xenstore.protocol import Message, Op, is_child


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


class Conn:
    def __init__(self, store: Store, domid: int = 0) -> None:
        self.store = store
        self.id = store.connect(domid)

    def rq(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        out = self.store.handle(self.id, Message(op, 0, tx, payload))
        reply = next(m for cid, m in out if cid == self.id and m.type != Op.WATCH_EVENT)
        return b"E:" + reply.payload[:-1] if reply.type == Op.ERROR else reply.payload

    def events(self, op: int, payload: bytes, tx: int = 0) -> dict[int, list[bytes]]:
        out = self.store.handle(self.id, Message(op, 0, tx, payload))
        got: dict[int, list[bytes]] = {}
        for cid, m in out:
            if m.type == Op.WATCH_EVENT:
                got.setdefault(cid, []).append(m.payload)
        return got


@pytest.fixture
def store() -> Store:
    s = Store()
    dom0 = Conn(s)
    for d in (1, 2):
        home = b"/local/domain/%d" % d
        assert dom0.rq(Op.MKDIR, z(home)) == b"OK\0"
        assert dom0.rq(Op.SET_PERMS, z(home, b"n%d" % d, b"r0")) == b"OK\0"
    return s


def test_guest_home_and_permission_checks(store: Store) -> None:
    dom0, g1, g2 = Conn(store), Conn(store, 1), Conn(store, 2)
    assert g1.rq(Op.WRITE, b"data\0v") == b"OK\0"
    assert g1.rq(Op.GET_PERMS, z(b"data")) == b"n1\0r0\0"
    assert g2.rq(Op.READ, z(b"/local/domain/1/data")) == b"E:EACCES"
    assert g2.rq(Op.READ, z(b"/local/domain/1/none")) == b"E:EACCES"  # no leak
    assert g1.rq(Op.READ, z(b"none")) == b"E:ENOENT"
    assert g1.rq(Op.SET_PERMS, z(b"data", b"n1", b"r2")) == b"OK\0"
    assert g2.rq(Op.READ, z(b"/local/domain/1/data")) == b"v"
    assert g2.rq(Op.WRITE, b"/local/domain/1/data\0x") == b"E:EACCES"
    assert g1.rq(Op.SET_PERMS, z(b"data", b"n2")) == b"E:EPERM"  # owner change
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1/data", b"n2")) == b"OK\0"
    assert g1.rq(Op.READ, z(b"data")) == b"E:EACCES"
    assert g1.rq(Op.RM, z(b"/tool")) == b"E:EACCES"
    for op, payload in [
        (Op.INTRODUCE, z(b"5", b"1", b"1")),
        (Op.RELEASE, z(b"2")),
        (Op.SET_TARGET, z(b"1", b"2")),
        (Op.RESUME, z(b"2")),
        (Op.IS_DOMAIN_INTRODUCED, z(b"2")),
        (Op.CONTROL, z(b"check")),
    ]:
        assert g1.rq(op, payload) == b"E:EACCES"
    assert g1.rq(Op.GET_DOMAIN_PATH, z(b"2")) == b"/local/domain/2\0"


def test_guest_creation_replaces_owner_in_inherited_perms(store: Store) -> None:
    dom0, g1 = Conn(store), Conn(store, 1)
    assert dom0.rq(Op.WRITE, b"/local/domain/1/shared\0") == b"OK\0"
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1/shared", b"n0", b"b1", b"r2")) == b"OK\0"
    assert g1.rq(Op.WRITE, b"shared/a/b\0v") == b"OK\0"
    assert g1.rq(Op.GET_PERMS, z(b"shared/a")) == b"n1\0b1\0r2\0"
    assert g1.rq(Op.GET_PERMS, z(b"shared/a/b")) == b"n1\0b1\0r2\0"


def test_target_domain_gets_the_targets_rights(store: Store) -> None:
    dom0, _, g2 = Conn(store), Conn(store, 1), Conn(store, 2)
    assert dom0.rq(Op.WRITE, b"/local/domain/1/dm\0v") == b"OK\0"
    assert g2.rq(Op.READ, z(b"/local/domain/1/dm")) == b"E:EACCES"
    assert dom0.rq(Op.SET_TARGET, z(b"2", b"1")) == b"OK\0"
    assert g2.rq(Op.READ, z(b"/local/domain/1/dm")) == b"v"
    assert g2.rq(Op.WRITE, b"/local/domain/1/dm\0w") == b"OK\0"


def test_guest_watches_need_read_access(store: Store) -> None:
    dom0, g1, g2 = Conn(store), Conn(store, 1), Conn(store, 2)
    assert g2.rq(Op.WATCH, z(b"/local/domain/1", b"peek")) == b"OK\0"
    assert g2.rq(Op.WATCH, z(b"@releaseDomain", b"rel")) == b"OK\0"
    events = g1.events(Op.WRITE, b"secret\0v")
    assert g2.id not in events
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1/secret", b"n1", b"r2")) == b"OK\0"
    events = g1.events(Op.WRITE, b"secret\0w")
    assert events[g2.id] == [b"/local/domain/1/secret\0peek\0"]
    assert dom0.rq(Op.INTRODUCE, z(b"7", b"1", b"1")) == b"OK\0"
    assert g2.id not in dom0.events(Op.RELEASE, z(b"7"))
    assert dom0.rq(Op.SET_PERMS, z(b"@releaseDomain", b"n0", b"r2")) == b"OK\0"
    assert dom0.rq(Op.INTRODUCE, z(b"7", b"1", b"1")) == b"OK\0"
    assert dom0.events(Op.RELEASE, z(b"7"))[g2.id] == [b"@releaseDomain\0rel\0"]


def test_guest_quotas() -> None:
    store = Store(quotas=Quotas(nodes=8, watches=3, transactions=2, transaction_nodes=6))
    dom0 = Conn(store)
    assert dom0.rq(Op.MKDIR, z(b"/local/domain/1")) == b"OK\0"
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1", b"n1")) == b"OK\0"
    g1 = Conn(store, 1)
    # nodes owned by the domain: its home counts
    for i in range(7):
        assert g1.rq(Op.WRITE, b"n%d\0" % i) == b"OK\0"
    assert g1.rq(Op.WRITE, b"n7\0") == b"E:ENOSPC"
    assert dom0.rq(Op.WRITE, b"/local/domain/1/by-dom0\0") == b"OK\0"  # dom0 is exempt
    # watches: E2BIG past the limit
    for i in range(3):
        assert g1.rq(Op.WATCH, z(b"n0", b"t%d" % i)) == b"OK\0"
    assert g1.rq(Op.WATCH, z(b"n0", b"t9")) == b"E:E2BIG"
    # transactions: ENOSPC past the limit
    assert g1.rq(Op.TRANSACTION_START, b"\0") == b"1\0"
    assert g1.rq(Op.TRANSACTION_START, b"\0") == b"2\0"
    assert g1.rq(Op.TRANSACTION_START, b"\0") == b"E:ENOSPC"
    # nodes touched per transaction
    for i in range(6):
        assert g1.rq(Op.READ, z(b"n%d" % i), tx=1) == b""
    assert g1.rq(Op.READ, z(b"n6"), tx=1) == b"E:ENOSPC"
    for _ in range(40):
        assert dom0.rq(Op.WATCH, z(b"/", b"x%d" % _)) == b"OK\0"  # dom0: no limit


def test_guest_node_size_and_permission_count() -> None:
    store = Store()
    dom0 = Conn(store)
    assert dom0.rq(Op.MKDIR, z(b"/local/domain/1")) == b"OK\0"
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1", b"n1")) == b"OK\0"
    g1 = Conn(store, 1)
    # record = 24-byte header + 8 per permission + value (+ child names) < 2048
    assert g1.rq(Op.WRITE, b"v\0" + b"x" * (2048 - 24 - 8 - 1)) == b"OK\0"
    assert g1.rq(Op.WRITE, b"v\0" + b"x" * (2048 - 24 - 8)) == b"E:ENOSPC"
    assert dom0.rq(Op.WRITE, b"/local/domain/1/v\0" + b"x" * 4000) == b"OK\0"
    perms = [b"n1", b"r2", b"r3", b"r4", b"r5"]
    assert g1.rq(Op.SET_PERMS, z(b"w", *perms)) == b"E:ENOENT"
    assert g1.rq(Op.WRITE, b"w\0") == b"OK\0"
    assert g1.rq(Op.SET_PERMS, z(b"w", *perms)) == b"OK\0"
    assert g1.rq(Op.SET_PERMS, z(b"w", *perms, b"r6")) == b"E:ENOSPC"
    assert dom0.rq(Op.SET_PERMS, z(b"/local/domain/1/w", *perms, b"r6", b"r7")) == b"OK\0"


def test_failed_guest_requests_leave_store_unchanged(store: Store) -> None:
    g2 = Conn(store, 2)
    before = store.dump(), store.generation()
    for op, payload in [
        (Op.WRITE, b"/local/domain/1/x\0v"),
        (Op.MKDIR, z(b"/local/domain/1/y/z")),
        (Op.RM, z(b"/local/domain/1")),
        (Op.SET_PERMS, z(b"/local/domain/1", b"n2")),
        (Op.WRITE, b"/tool/x\0v"),
    ]:
        assert g2.rq(op, payload) == b"E:EACCES"
    assert (store.dump(), store.generation()) == before


def test_initial_trees() -> None:
    plain = Store()
    assert [p for p, _, _ in plain.dump()] == [b"/", b"/tool", b"/tool/xenstored"]
    assert plain.is_domain_introduced(0) and not plain.is_domain_introduced(1)
    doms = Store(initial="domains")
    tree = {p: (v, b",".join(x.encode() for x in perms)) for p, v, perms in doms.dump()}
    assert tree[b"/local/domain/1"] == (b"", b"n0,r1")
    assert tree[b"/local/domain/1/name"] == (b"guest1", b"n0,r1")
    assert tree[b"/local/domain/1/device"] == (b"", b"n0,r1")
    assert tree[b"/local/domain/1/device/suspend/event-channel"] == (b"", b"n1")
    assert tree[b"/libxl/1"] == (b"", b"n0")
    assert tree[b"/local/domain/0/name"] == (b"Domain-0", b"n0")
    assert doms.is_domain_introduced(1)
    with pytest.raises(ValueError):
        Store(initial="bogus")


def test_nodes_stay_compact() -> None:
    """30,000 nodes in well under 30 MB (the benchmark checks 100,000 by RSS)."""
    import tracemalloc

    tracemalloc.start()
    store = Store()
    conn = store.connect(0)
    base = tracemalloc.get_traced_memory()[0]
    for i in range(30_000):
        payload = b"/local/domain/%d/device/vbd/%d/state\0%d" % (i // 1000, i % 1000, i % 7)
        store.handle(conn, Message(Op.WRITE, 0, 0, payload))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert store.node_count() > 30_000
    assert used < 30 * 1024 * 1024


# The store finds the watches an event fires by walking up the changed path
# (_ancestors), the client by testing each watch with protocol.is_child: both must
# be the same rule.
_names = st.lists(st.sampled_from(["a", "ab", "b", "a-b", "0"]), max_size=5)


@given(_names, _names, st.integers(0, 5))
@example(["a", "b"], ["ab"], 0)
@example(["ab"], ["a"], 0)
def test_ancestors_agree_with_is_child(child: list[str], other: list[str], shared: int) -> None:
    child_path = ("/" + "/".join(child)).encode()
    parent_path = ("/" + "/".join(child[:shared] + other)).encode()
    assert (parent_path in set(_ancestors(child_path))) == is_child(child_path, parent_path)
