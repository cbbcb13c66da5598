"""The XenStore tree and its semantics as a sans-IO state machine (cxenstored 4.17).

:class:`Store` owns the tree, the connections' watches and transactions, the domain
table and the quotas.  :meth:`Store.handle` takes one request from one connection and
returns every message it causes: the reply to the requester and the watch events for
any connection (the requester included), each as ``(conn_id, Message)`` in the order
cxenstored writes them.  :meth:`Store.handle_frame` is the same for a server: header
fields and payload in, encoded frames out, with no message objects in between.  No
sockets, no clock, no randomness: the trio server (:mod:`kvpfs.peers.xenstored.server`)
only moves bytes.

Observable details follow the real cxenstored 4.17 (checked against it by the
conformance suite), not just the protocol description:

* every node carries a generation number from one global counter, shown by
  DIRECTORY_PART.  The counter advances once per node write, once per
  TRANSACTION_START, twice per removed node (the node and its parent's child list),
  once per RELEASE, and once per node written back at commit;
* a transaction records every node it touches, in first-touch order, with the
  generation it had outside; the commit fails with EAGAIN if any of them changed
  (blind writes of existing nodes conflict too).  At commit the modified nodes are
  written back in that order, and the watch events are fired once per touched node in
  that order - not once per operation;
* a request whose single argument is malformed (READ ``"/a"`` without its NUL)
  makes cxenstored answer with a stale ``errno``; this model answers EINVAL, which is
  what cxenstored answers once any EINVAL has happened.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter

from kvpfs.vbd.layout import MKDIR, SET_PERMS, WRITE, XsOp, dom0_ops, domain_creation_ops
from kvpfs.xenstore.protocol import (
    DEFAULT_MAX_PATH_LEN,
    EMBEDDED_PROBE,
    EMBEDDED_PROBE_REPLY,
    HEADER,
    INTRODUCE_DOMAIN,
    OK,
    RELEASE_DOMAIN,
    XENSTORE_PAYLOAD_MAX,
    Access,
    Message,
    Op,
    Perm,
    ProtocolError,
    build_bool,
    build_directory_part_reply,
    build_error,
    build_path,
    build_set_perms,
    build_strings,
    build_transaction_id,
    build_watch_event,
    build_write,
    c_atoi,
    canonicalize,
    check_path,
    check_watch_path,
    domain_path,
    format_perms,
    is_relative,
    onearg,
    parse_control,
    parse_directory_part,
    parse_domid,
    parse_introduce,
    parse_set_perms,
    parse_set_target,
    parse_transaction_end,
    parse_watch,
    parse_write,
    perm_for,
    relativize,
)

__all__ = [
    "DEFAULT_QUOTAS",
    "INITIAL_TREES",
    "Quotas",
    "Store",
    "StoreError",
]

# Plain ints: comparing and hashing IntEnum members costs an attribute lookup
# through the enum class on every request.
_WATCH = int(Op.WATCH)
_UNWATCH = int(Op.UNWATCH)
_WATCH_EVENT = int(Op.WATCH_EVENT)
_ERROR = int(Op.ERROR)
_PRIVILEGED_OPS = frozenset(
    int(op)
    for op in (
        Op.CONTROL,
        Op.INTRODUCE,
        Op.RELEASE,
        Op.IS_DOMAIN_INTRODUCED,
        Op.RESUME,
        Op.SET_TARGET,
    )
)
_OK = OK
_FULL = Access.BOTH | Access.OWNER
_READ = Access.READ
_WRITE = Access.WRITE

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size

#: Bound of the cache of validated request payloads (:meth:`Store._path_arg`).
_PATH_CACHE_MAX = 4096
#: Bound of the cache of encoded watch events (frames plus paths, see
#: :meth:`Store._fire_entry`): at most about a megabyte.
_FIRE_CACHE_MAX = 16384

#: Size of cxenstored's on-disk node header (generation u64, three u32, padded to 8):
#: the node-size quota counts it.
_NODE_HEADER = 24
_PERM_SIZE = 8

HELP_TEXT = (
    b"check\t\n"
    b"log\ton|off\n"
    b"live-update\t[-c <cmdline>] [-F] [-t <timeout>] <file>\n"
    b"    Default timeout is 60 seconds.\n"
    b"logfile\t<file>\n"
    b"memreport\t[<file>]\n"
    b"print\t<string>\n"
    b"quota\t[set <name> <val>|<domid>]\n"
    b"quota-soft\t[set <name> <val>]\n"
    b"help\t\n"
)


class StoreError(Exception):
    """A request fails with this errno (sent as its XS_ERROR name)."""

    __slots__ = ("errno",)

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


# --------------------------------------------------------------------------- quotas


@dataclass
class Quotas:
    """cxenstored 4.17's per-domain limits; they bind unprivileged connections only,
    except ``path_max`` which applies to every path."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    outstanding: int = 20
    transaction_nodes: int = 1024
    memory: int = 2621440
    node_size: int = 2048
    path_max: int = DEFAULT_MAX_PATH_LEN
    permissions: int = 5
    memory_soft: int = 2097152

    #: ``CONTROL quota`` names → attribute and description, in cxenstored's order.
    TABLE: tuple[tuple[bytes, str, bytes], ...] = field(
        default=(
            (b"nodes", "nodes", b"Nodes per domain"),
            (b"watches", "watches", b"Watches per domain"),
            (b"transactions", "transactions", b"Transactions per domain"),
            (b"outstanding", "outstanding", b"Outstanding requests per domain"),
            (
                b"transaction-nodes",
                "transaction_nodes",
                b"Max. number of accessed nodes per transaction",
            ),
            (b"memory", "memory", b"Total Xenstore memory per domain (error level)"),
            (b"node-size", "node_size", b"Max. size of a node"),
            (b"path-max", "path_max", b"Max. length of a node path"),
            (b"permissions", "permissions", b"Max. number of permissions per node"),
        ),
        repr=False,
    )


DEFAULT_QUOTAS = Quotas()


# --------------------------------------------------------------------------- model


class Node:
    """One node.  ``children`` holds child names in creation order."""

    __slots__ = ("children", "gen", "perms", "value")

    def __init__(
        self, value: bytes, perms: tuple[Perm, ...], children: list[bytes], gen: int
    ) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.gen = gen

    def copy(self) -> Node:
        return Node(self.value, self.perms, list(self.children), self.gen)

    def record_size(self) -> int:
        """Bytes of cxenstored's node record: what the node-size quota measures."""
        return (
            _NODE_HEADER
            + _PERM_SIZE * len(self.perms)
            + len(self.value)
            + sum(len(c) + 1 for c in self.children)
        )


class _Touched:
    """A node a transaction has touched: the generation it had outside (None: absent)
    when first touched, and what the commit must do with it."""

    __slots__ = ("exact", "fire", "gen", "modified", "saved_perms")

    def __init__(self, gen: int | None) -> None:
        self.gen = gen
        self.modified = False
        self.fire = False
        self.exact = False
        # Permissions of a node that existed outside and was removed in the
        # transaction: the commit fires its watches with them.
        self.saved_perms: tuple[Perm, ...] | None = None


class _Tx:
    __slots__ = ("conn", "id", "overlay", "owner_delta", "touched")

    def __init__(self, tx_id: int, conn: _Conn) -> None:
        self.id = tx_id
        self.conn = conn
        #: Copy-on-write layer: path → private node copy, or None when removed.
        self.overlay: dict[bytes, Node | None] = {}
        self.touched: dict[bytes, _Touched] = {}
        self.owner_delta: dict[int, int] = {}


class _Watch:
    __slots__ = ("conn", "order", "path", "relative", "seq", "token")

    def __init__(self, conn: _Conn, path: bytes, token: bytes, relative: bool, seq: int) -> None:
        self.conn = conn
        self.path = path
        self.token = token
        self.relative = relative
        self.seq = seq
        #: Where cxenstored's watch list puts it: by connection, then age.
        self.order = (conn.id, seq)


class _Conn:
    __slots__ = (
        "domid",
        "home",
        "id",
        "next_tx",
        "privileged",
        "transactions",
        "watches",
    )

    def __init__(self, conn_id: int, domid: int, privileged: bool) -> None:
        self.id = conn_id
        self.domid = domid
        self.privileged = privileged
        self.home = domain_path(domid)
        self.watches: list[_Watch] = []
        self.transactions: dict[int, _Tx] = {}
        self.next_tx = 1


class _Domain:
    __slots__ = ("domid", "target")

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.target: int | None = None


def _parent(path: bytes) -> bytes:
    cut = path.rfind(b"/")
    return path[:cut] if cut > 0 else b"/"


def _basename(path: bytes) -> bytes:
    return path[path.rfind(b"/") + 1 :]


def _ancestors(path: bytes) -> Iterator[bytes]:
    """``path`` and each ancestor up to ``/``: every watch path that matches it."""
    yield path
    while path != b"/":
        cut = path.rfind(b"/")
        path = path[:cut] if cut > 0 else b"/"
        yield path


def _child(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent == b"/" else parent + b"/" + name


_PERM_CACHE: dict[tuple[Perm, ...], tuple[Perm, ...]] = {}


def _intern_perms(perms: tuple[Perm, ...]) -> tuple[Perm, ...]:
    """Share equal permission tuples between nodes (most nodes have a handful of
    distinct lists), which keeps 100,000 nodes small."""
    got = _PERM_CACHE.get(perms)
    if got is None:
        if len(_PERM_CACHE) > 10000:
            return perms
        _PERM_CACHE[perms] = perms
        got = perms
    return got


_N0 = _intern_perms((Perm(Access.NONE, 0),))

#: Named starting trees for :class:`Store` (see :meth:`Store.__init__`).
INITIAL_TREES = ("xenstored", "domains")


Output = list[tuple[int, Message]]
#: ``(conn_id, frame)``: an encoded message (header and payload) for a connection.
Frames = list[tuple[int, bytes]]
_Handler = Callable[[_Conn, "_Tx | None", bytes, Frames], bytes]
_watch_order = attrgetter("order")
_Fired = tuple[Frames, "list[_Conn | None]"]


def _decode_frame(frame: bytes) -> Message:
    mtype, req_id, tx_id, _ = _unpack_header(frame)
    return Message(mtype, req_id, tx_id, frame[_HEADER_SIZE:])


def _event_frame(payload: bytes) -> bytes:
    return _pack_header(_WATCH_EVENT, 0, 0, len(payload)) + payload


def _layout_request(step: XsOp) -> tuple[int, bytes]:
    """One :class:`kvpfs.vbd.layout.XsOp` as the request a toolstack sends."""
    if step.op == WRITE:
        return Op.WRITE, build_write(step.path, step.value)
    if step.op == MKDIR:
        return Op.MKDIR, build_path(step.path)
    if step.op == SET_PERMS:
        return Op.SET_PERMS, build_set_perms(step.path, step.perms)
    return Op.RM, build_path(step.path)


class Store:
    """The whole XenStore state of one daemon.

    ``initial``: ``"xenstored"`` is what cxenstored 4.17 holds after start-up
    (``/``, ``/tool``, ``/tool/xenstored``, dom0 introduced); ``"domains"`` adds dom0's
    home and one guest domain as libxl's domain creation leaves it (reference §12.2),
    with ``guest_domid`` introduced.
    """

    def __init__(
        self,
        *,
        quotas: Quotas | None = None,
        initial: str = "xenstored",
        guest_domid: int = 1,
        guest_name: bytes = b"guest1",
    ) -> None:
        if initial not in INITIAL_TREES:
            raise ValueError(f"initial tree must be one of {INITIAL_TREES}, not {initial!r}")
        self.quotas = quotas or Quotas()
        self._nodes: dict[bytes, Node] = {}
        self._gen = 0
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 1
        self._watch_seq = 0
        #: watch path → watches on it, for matching an event against its ancestors.
        self._watch_index: dict[bytes, list[_Watch]] = {}
        #: path → the events its change sends (see _fire_entry), one cache for
        #: changes and one for removals (watches on the exact path only).  Any
        #: change to the watches empties them; their size counts frames and paths.
        self._fired: dict[bytes, _Fired] = {}
        self._fired_exact: dict[bytes, _Fired] = {}
        self._fired_size = 0
        self._domains: dict[int, _Domain] = {0: _Domain(0)}
        self._owned: dict[int, int] = {}
        self._special_perms: dict[bytes, tuple[Perm, ...]] = {
            INTRODUCE_DOMAIN: _N0,
            RELEASE_DOMAIN: _N0,
        }
        self._logfile_set = False
        #: One-argument payloads (an absolute name and NUL) → their name; see
        #: _path_arg.
        self._arg_paths: dict[bytes, bytes] = {}
        self._handlers: dict[int, _Handler] = {
            Op.CONTROL: self._do_control,
            Op.DIRECTORY: self._do_directory,
            Op.READ: self._do_read,
            Op.GET_PERMS: self._do_get_perms,
            Op.WATCH: self._do_watch,
            Op.UNWATCH: self._do_unwatch,
            Op.TRANSACTION_START: self._do_transaction_start,
            Op.TRANSACTION_END: self._do_transaction_end,
            Op.INTRODUCE: self._do_introduce,
            Op.RELEASE: self._do_release,
            Op.GET_DOMAIN_PATH: self._do_get_domain_path,
            Op.WRITE: self._do_write,
            Op.MKDIR: self._do_mkdir,
            Op.RM: self._do_rm,
            Op.SET_PERMS: self._do_set_perms,
            Op.IS_DOMAIN_INTRODUCED: self._do_is_domain_introduced,
            Op.RESUME: self._do_resume,
            Op.SET_TARGET: self._do_set_target,
            Op.RESET_WATCHES: self._do_reset_watches,
            Op.DIRECTORY_PART: self._do_directory_part,
        }
        self._setup_structure()
        if initial == "domains":
            self._build_domains(guest_domid, guest_name)

    # ------------------------------------------------------------------ set-up

    def _setup_structure(self) -> None:
        # cxenstored's start leaves /, /tool and /tool/xenstored with generations
        # 1, 2 and 3, all owned by dom0.
        self._nodes[b"/"] = Node(b"", _N0, [b"tool"], 1)
        self._nodes[b"/tool"] = Node(b"", _N0, [b"xenstored"], 2)
        self._nodes[b"/tool/xenstored"] = Node(b"", _N0, [], 3)
        self._gen = 4
        self._owned[0] = 3

    def _build_domains(self, domid: int, name: bytes) -> None:
        # The same operations the toolstack and the simulated host apply over a
        # socket (kvpfs.vbd.layout), so the initial tree and theirs cannot differ.
        conn = self.connect(0)
        for step in dom0_ops() + domain_creation_ops(domid, name.decode()):
            op, payload = _layout_request(step)
            out = self.handle(conn, Message(op, 0, 0, payload))
            assert out[-1][1].type == op, out
        self.disconnect(conn)
        self._domains[domid] = _Domain(domid)

    # ------------------------------------------------------------------ connections

    def connect(self, domid: int = 0, *, privileged: bool | None = None) -> int:
        """Register a connection and return its id.

        A local socket connection is ``domid=0`` (privileged).  A connection for an
        unprivileged domain has that domain's home, permissions and quotas; the
        domain is introduced if it was not.
        """
        if privileged is None:
            privileged = domid == 0
        conn_id = self._next_conn
        self._next_conn += 1
        self._conns[conn_id] = _Conn(conn_id, domid, privileged)
        if domid not in self._domains:
            self._domains[domid] = _Domain(domid)
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a connection: its watches go, its transactions are aborted."""
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            self._drop_watches(conn)
            conn.transactions.clear()

    def introduce(self, domid: int) -> None:
        """Mark a domain introduced without firing ``@introduceDomain`` (set-up)."""
        if domid not in self._domains:
            self._domains[domid] = _Domain(domid)

    def connection_ids(self) -> list[int]:
        return list(self._conns)

    def is_domain_introduced(self, domid: int) -> bool:
        return domid in self._domains

    # ------------------------------------------------------------------ dispatch

    def handle(self, conn_id: int, msg: Message) -> Output:
        """Process one request; returns replies and watch events in send order."""
        return [
            (target, _decode_frame(frame))
            for target, frame in self.handle_frame(
                conn_id, msg.type, msg.req_id, msg.tx_id, msg.payload
            )
        ]

    def handle_frame(
        self, conn_id: int, mtype: int, req_id: int, tx_id: int, payload: bytes
    ) -> Frames:
        """:meth:`handle` from the request's header fields and payload, each message
        caused returned encoded, as ``(conn_id, frame)`` in send order."""
        conn = self._conns[conn_id]
        out: Frames = []
        try:
            handler = self._handlers.get(mtype)
            if handler is None:
                raise StoreError(E.ENOSYS)
            tx: _Tx | None = None
            if tx_id and mtype != _WATCH and mtype != _UNWATCH:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise StoreError(E.ENOENT)
            if not conn.privileged and mtype in _PRIVILEGED_OPS:
                raise StoreError(E.EACCES)
            reply = handler(conn, tx, payload, out)
        except (StoreError, ProtocolError) as exc:
            err = build_error(exc.errno)
            out.append((conn_id, _pack_header(_ERROR, req_id, tx_id, len(err)) + err))
            return out
        out.append((conn_id, _pack_header(mtype, req_id, tx_id, len(reply)) + reply))
        if mtype == _WATCH:
            # The initial event follows the WATCH reply.
            out.append((conn_id, _event_frame(build_watch_event(*parse_watch(payload)))))
        return out

    # ------------------------------------------------------------------ arguments

    def _path_arg(self, conn: _Conn, payload: bytes) -> bytes:
        """``check_path(onearg(payload))``: a request whose argument is one node name.

        The answer for an absolute name is kept by payload, which skips both calls
        (they cost more than the rest of a read).  A relative name is not kept: its
        meaning depends on the connection.  Only ``path_max`` can make a valid name
        invalid later, so a hit is re-checked against it (a valid name longer than
        ``path_max``, allowed below a domain's home, just misses).
        """
        cache = self._arg_paths
        path = cache.get(payload)
        if path is not None and len(path) <= self.quotas.path_max:
            return path
        path = check_path(onearg(payload), conn.home, self.quotas.path_max)
        if payload[:1] == b"/":
            if len(cache) >= _PATH_CACHE_MAX:
                cache.clear()
            cache[payload] = path
        return path

    # ------------------------------------------------------------------ tree access

    def _get(self, tx: _Tx | None, path: bytes) -> Node | None:
        """Read a node as the request sees it, recording the touch in a transaction."""
        if tx is None:
            return self._nodes.get(path)
        overlay = tx.overlay
        if path in overlay:
            return overlay[path]
        node = self._nodes.get(path)
        self._touch(tx, path, node)
        # cxenstored keeps a node as the transaction first read it (absent
        # included): later reads in the transaction do not see outside changes.
        if node is not None:
            node = node.copy()
        overlay[path] = node
        return node

    def _touch(self, tx: _Tx, path: bytes, node: Node | None) -> _Touched:
        touched = tx.touched.get(path)
        if touched is None:
            conn = tx.conn
            if not conn.privileged and len(tx.touched) >= self.quotas.transaction_nodes:
                raise StoreError(E.ENOSPC)
            touched = _Touched(node.gen if node is not None else None)
            tx.touched[path] = touched
        return touched

    def _for_write(self, tx: _Tx | None, path: bytes, node: Node) -> Node:
        """The node object a write may change: in a transaction a private copy."""
        if tx is None:
            return node
        if tx.overlay.get(path) is node:
            return node
        copy = node.copy()
        tx.overlay[path] = copy
        return copy

    def _store(self, tx: _Tx | None, path: bytes, node: Node) -> None:
        """Write a node: it gets the next generation."""
        node.gen = self._gen
        self._gen += 1
        if tx is None:
            self._nodes[path] = node
        else:
            tx.overlay[path] = node
            self._touch(tx, path, None).modified = True

    def _delete(self, tx: _Tx | None, path: bytes, node: Node) -> None:
        self._gen += 1
        owner = node.perms[0].domid
        if tx is None:
            del self._nodes[path]
            self._owned[owner] = self._owned.get(owner, 0) - 1
        else:
            tx.overlay[path] = None
            touched = self._touch(tx, path, None)
            touched.modified = True
            if touched.gen is not None and touched.saved_perms is None:
                touched.saved_perms = node.perms
            tx.owner_delta[owner] = tx.owner_delta.get(owner, 0) - 1

    def _fire(
        self,
        tx: _Tx | None,
        path: bytes,
        perms: tuple[Perm, ...],
        out: Frames,
        exact: bool = False,
    ) -> None:
        if tx is not None:
            touched = self._touch(tx, path, None)
            if not touched.fire:
                touched.fire = True
                touched.exact = exact
            elif not exact:
                touched.exact = False
            return
        self._fire_now(path, perms, exact, out)

    def _fire_now(self, path: bytes, perms: tuple[Perm, ...], exact: bool, out: Frames) -> None:
        if not self._watch_index:
            return
        cache = self._fired_exact if exact else self._fired
        entry = cache.get(path)
        if entry is None:
            entry = self._fire_entry(path, exact)
            self._fired_size += len(entry[0]) + 1
            if self._fired_size > _FIRE_CACHE_MAX:
                self._forget_fired()
                self._fired_size = len(entry[0]) + 1
            cache[path] = entry
        frames, guests = entry
        if not guests:
            out.extend(frames)
            return
        for pair, guest in zip(frames, guests, strict=True):
            if guest is None or self._access(guest, perms) & _READ:
                out.append(pair)

    def _fire_entry(self, path: bytes, exact: bool) -> _Fired:
        """The events a change of ``path`` sends, encoded, before permission checks.

        In cxenstored's order (by connection, then watch age); one firing sends a
        connection each distinct event once, even when several of its watches
        (same token, same reported path) match.  Watches of one connection pass or
        fail the permission check together, so removing duplicates first changes
        nothing.  ``guests`` is empty when every connection is privileged, else it
        holds, per frame, the unprivileged connection to check (None: no check).
        """
        index = self._watch_index
        if exact:
            matched = list(index.get(path, ()))
        else:
            matched = []
            for anc in _ancestors(path):
                got = index.get(anc)
                if got:
                    matched.extend(got)
        if len(matched) > 1:
            matched.sort(key=_watch_order)
        frames: Frames = []
        guests: list[_Conn | None] = []
        any_guest = False
        seen: set[tuple[int, bytes]] = set()
        for w in matched:
            conn = w.conn
            shown = relativize(path, conn.home) if w.relative else path
            payload = build_watch_event(shown, w.token)
            key = (conn.id, payload)
            if key in seen:
                continue
            seen.add(key)
            frames.append((conn.id, _event_frame(payload)))
            if conn.privileged:
                guests.append(None)
            else:
                guests.append(conn)
                any_guest = True
        return frames, guests if any_guest else []

    def _forget_fired(self) -> None:
        self._fired.clear()
        self._fired_exact.clear()
        self._fired_size = 0

    def _fire_special(self, name: bytes, out: Frames) -> None:
        watches = self._watch_index.get(name)
        if not watches:
            return
        perms = self._special_perms[name]
        sent: set[tuple[int, bytes]] = set()
        for w in sorted(watches, key=_watch_order):
            conn = w.conn
            if not conn.privileged and not (self._access(conn, perms) & _READ):
                continue
            if (conn.id, w.token) in sent:
                continue
            sent.add((conn.id, w.token))
            out.append((conn.id, _event_frame(build_watch_event(name, w.token))))

    # ------------------------------------------------------------------ permissions

    def _access(self, conn: _Conn, perms: tuple[Perm, ...]) -> Access:
        if conn.privileged:
            return _FULL
        dom = self._domains.get(conn.domid)
        target = dom.target if dom is not None else None
        return perm_for(conn.domid, perms, privileged=False, target=target)

    def _check(self, conn: _Conn, tx: _Tx | None, path: bytes, node: Node, want: Access) -> None:
        if conn.privileged:
            return
        if (self._access(conn, node.perms) & want) != want:
            raise StoreError(E.EACCES)

    def _missing(self, conn: _Conn, tx: _Tx | None, path: bytes) -> StoreError:
        """ENOENT, or EACCES when the caller may not even read the closest existing
        ancestor (so that absence does not leak)."""
        if conn.privileged and tx is None:
            return StoreError(E.ENOENT)
        # cxenstored reads the ancestors up to the closest existing one even for a
        # privileged caller: in a transaction that read is a touch like any other.
        for anc in _ancestors(path):
            if anc == path:
                continue
            node = self._get(tx, anc)
            if node is not None:
                if self._access(conn, node.perms) & Access.READ:
                    return StoreError(E.ENOENT)
                return StoreError(E.EACCES)
        return StoreError(E.ENOENT)

    def _existing(
        self, conn: _Conn, tx: _Tx | None, raw: bytes, want: Access
    ) -> tuple[bytes, Node]:
        path = check_path(raw, conn.home, self.quotas.path_max)
        node = self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path)
        self._check(conn, tx, path, node, want)
        return path, node

    def _existing_arg(self, conn: _Conn, tx: _Tx | None, payload: bytes, want: Access) -> Node:
        path = self._path_arg(conn, payload)
        node = self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path)
        self._check(conn, tx, path, node, want)
        return node

    # ------------------------------------------------------------------ read ops

    def _do_read(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        path = self._path_arg(conn, payload)
        node = self._nodes.get(path) if tx is None else self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path)
        if not conn.privileged and not (self._access(conn, node.perms) & _READ):
            raise StoreError(E.EACCES)
        return node.value

    def _do_directory(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        node = self._existing_arg(conn, tx, payload, _READ)
        data = build_strings(node.children)
        if len(data) > XENSTORE_PAYLOAD_MAX:
            raise StoreError(E.E2BIG)
        return data

    def _do_directory_part(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        raw, offset = parse_directory_part(payload)
        node = self._existing(conn, tx, raw, Access.READ)[1]
        return build_directory_part_reply(node.gen, build_strings(node.children), offset)

    def _do_get_perms(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        node = self._existing_arg(conn, tx, payload, _READ)
        return format_perms(node.perms)

    # ------------------------------------------------------------------ write ops

    def _create(self, conn: _Conn, tx: _Tx | None, path: bytes, value: bytes, out: Frames) -> Node:
        """Create ``path`` and any missing parents (deepest first, as cxenstored
        writes them), then add it to the first existing ancestor's child list."""
        missing = [path]
        parent_path = _parent(path)
        parent = self._get(tx, parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = _parent(parent_path)
            parent = self._get(tx, parent_path)
        self._check(conn, tx, parent_path, parent, Access.WRITE)
        perms = parent.perms
        if not conn.privileged:
            if perms[0].domid != conn.domid:
                perms = _intern_perms((Perm(perms[0].access, conn.domid), *perms[1:]))
            owned = self._owned.get(conn.domid, 0)
            if tx is not None:
                owned += tx.owner_delta.get(conn.domid, 0)
            if owned + len(missing) > self.quotas.nodes:
                raise StoreError(E.ENOSPC)
            size = _NODE_HEADER + _PERM_SIZE * len(perms)
            if size + len(value) >= self.quotas.node_size:
                raise StoreError(E.ENOSPC)
            grown = parent.record_size() + len(_basename(missing[-1])) + 1
            if grown >= self.quotas.node_size:
                raise StoreError(E.ENOSPC)
        owner = perms[0].domid
        created = None
        child_name = None
        for i, p in enumerate(missing):
            node = Node(value if i == 0 else b"", perms, [child_name] if child_name else [], 0)
            self._store(tx, p, node)
            if created is None:
                created = node
            child_name = _basename(p)
        assert child_name is not None and created is not None
        parent = self._for_write(tx, parent_path, parent)
        parent.children.append(child_name)
        self._store(tx, parent_path, parent)
        if tx is None:
            self._owned[owner] = self._owned.get(owner, 0) + len(missing)
        else:
            tx.owner_delta[owner] = tx.owner_delta.get(owner, 0) + len(missing)
        return created

    def _do_write(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        raw, value = parse_write(payload)
        path = check_path(raw, conn.home, self.quotas.path_max)
        node = self._nodes.get(path) if tx is None else self._get(tx, path)
        if node is None:
            created = self._create(conn, tx, path, value, out)
            self._fire(tx, path, created.perms, out)
            return _OK
        if not conn.privileged:
            self._check(conn, tx, path, node, _WRITE)
            size = node.record_size() - len(node.value) + len(value)
            if size >= self.quotas.node_size:
                raise StoreError(E.ENOSPC)
        if tx is None:
            # _store and _fire inlined: the most frequent write of all.
            node.value = value
            node.gen = self._gen
            self._gen += 1
            if self._watch_index:
                self._fire_now(path, node.perms, False, out)
            return _OK
        node = self._for_write(tx, path, node)
        node.value = value
        self._store(tx, path, node)
        self._fire(tx, path, node.perms, out)
        return _OK

    def _do_mkdir(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        path = self._path_arg(conn, payload)
        node = self._get(tx, path)
        if node is not None:
            self._check(conn, tx, path, node, Access.WRITE)
            return _OK
        created = self._create(conn, tx, path, b"", out)
        self._fire(tx, path, created.perms, out)
        return _OK

    def _do_rm(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        path = self._path_arg(conn, payload)
        node = self._get(tx, path)
        if node is None:
            err = self._missing(conn, tx, path)
            if err.errno == E.ENOENT and self._get(tx, _parent(path)) is not None:
                return _OK
            raise err
        self._check(conn, tx, path, node, Access.WRITE)
        if path == b"/":
            raise StoreError(E.EINVAL)
        self._remove_subtree(conn, tx, path, node, out)
        return _OK

    def _remove_subtree(
        self, conn: _Conn, tx: _Tx | None, path: bytes, node: Node, out: Frames
    ) -> None:
        parent_path = _parent(path)
        parent = self._get(tx, parent_path)
        if parent is None:
            raise StoreError(E.EINVAL)
        # Depth-first like cxenstored's tree walk: a node is read on the way down
        # and removed on the way up, after its children.  Each removal also writes
        # the parent's shortened child list, hence two generations per node.  A
        # removed node fires the watches set exactly on it; the top one fires like
        # any change.  A child that cannot be read (a transaction's snapshot of the
        # parent still lists a child removed outside) stops the walk with EIO and
        # leaves what was done so far, as cxenstored does.
        stack: list[tuple[bytes, Node, int]] = [(path, node, 0)]
        while stack:
            p, n, i = stack[-1]
            if i < len(n.children):
                stack[-1] = (p, n, i + 1)
                cp = _child(p, n.children[i])
                child = self._get(tx, cp)
                if child is None:
                    raise StoreError(E.EIO)
                stack.append((cp, child, 0))
                continue
            stack.pop()
            self._delete(tx, p, n)
            if stack:
                self._gen += 1
            self._fire(tx, p, n.perms, out, exact=p != path)
        name = _basename(path)
        if name not in parent.children:
            # Only possible in a transaction whose snapshot of the parent predates
            # the node: cxenstored reports the inconsistency as EIO, keeping the
            # removals already done.
            raise StoreError(E.EIO)
        parent = self._for_write(tx, parent_path, parent)
        parent.children.remove(name)
        self._store(tx, parent_path, parent)

    def _do_set_perms(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        limit = None if conn.privileged else self.quotas.permissions
        raw, perms = parse_set_perms(payload, limit)
        if raw in self._special_perms:
            if not conn.privileged and not (
                self._access(conn, self._special_perms[raw]) & Access.WRITE
            ):
                raise StoreError(E.EACCES)
            self._special_perms[raw] = _intern_perms(perms)
            return _OK
        path, node = self._existing(conn, tx, raw, Access.WRITE)
        old_owner = node.perms[0].domid
        new_owner = perms[0].domid
        if not conn.privileged and new_owner != old_owner:
            raise StoreError(E.EPERM)
        if not conn.privileged:
            size = node.record_size() + _PERM_SIZE * (len(perms) - len(node.perms))
            if size >= self.quotas.node_size:
                raise StoreError(E.ENOSPC)
        node = self._for_write(tx, path, node)
        node.perms = _intern_perms(perms)
        self._store(tx, path, node)
        if old_owner != new_owner:
            if tx is None:
                self._owned[old_owner] = self._owned.get(old_owner, 0) - 1
                self._owned[new_owner] = self._owned.get(new_owner, 0) + 1
            else:
                d = tx.owner_delta
                d[old_owner] = d.get(old_owner, 0) - 1
                d[new_owner] = d.get(new_owner, 0) + 1
        self._fire(tx, path, node.perms, out)
        return _OK

    # ------------------------------------------------------------------ watches

    def _do_watch(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        raw, token = parse_watch(payload)
        path = check_watch_path(raw, conn.home, self.quotas.path_max)
        for w in conn.watches:
            if w.path == path and w.token == token:
                raise StoreError(E.EEXIST)
        if not conn.privileged and len(conn.watches) >= self.quotas.watches:
            raise StoreError(E.E2BIG)
        self._watch_seq += 1
        w = _Watch(conn, path, token, is_relative(raw), self._watch_seq)
        conn.watches.append(w)
        self._watch_index.setdefault(path, []).append(w)
        self._forget_fired()
        return _OK

    def _do_unwatch(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        raw, token = parse_watch(payload)
        path = canonicalize(raw, conn.home)
        for i, w in enumerate(conn.watches):
            if w.path == path and w.token == token:
                del conn.watches[i]
                self._unindex(w)
                return _OK
        raise StoreError(E.ENOENT)

    def _unindex(self, w: _Watch) -> None:
        self._forget_fired()
        lst = self._watch_index.get(w.path)
        if lst is not None:
            lst.remove(w)
            if not lst:
                del self._watch_index[w.path]

    def _drop_watches(self, conn: _Conn) -> None:
        for w in conn.watches:
            self._unindex(w)
        conn.watches.clear()

    def _do_reset_watches(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        self._drop_watches(conn)
        conn.transactions.clear()
        return _OK

    # ------------------------------------------------------------------ transactions

    def _do_transaction_start(
        self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames
    ) -> bytes:
        if tx is not None:
            raise StoreError(E.EBUSY)
        if not conn.privileged and len(conn.transactions) >= self.quotas.transactions:
            raise StoreError(E.ENOSPC)
        tx_id = conn.next_tx
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = _Tx(tx_id, conn)
        self._gen += 1
        return build_transaction_id(tx_id)

    def _do_transaction_end(
        self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames
    ) -> bytes:
        commit = parse_transaction_end(payload)
        if tx is None:
            raise StoreError(E.ENOENT)
        del conn.transactions[tx.id]
        if not commit:
            return _OK
        nodes = self._nodes
        touched = tx.touched
        for path, t in touched.items():
            cur = nodes.get(path)
            if (cur.gen if cur is not None else None) != t.gen:
                raise StoreError(E.EAGAIN)
        overlay = tx.overlay
        owned = self._owned
        for path, t in touched.items():
            if not t.modified:
                continue
            node = overlay[path]
            if node is None:
                nodes.pop(path, None)
            else:
                node.gen = self._gen
                self._gen += 1
                nodes[path] = node
        for domid, delta in tx.owner_delta.items():
            owned[domid] = owned.get(domid, 0) + delta
        for path, t in touched.items():
            if not t.fire:
                continue
            node = nodes.get(path)
            if node is not None:
                self._fire_now(path, node.perms, t.exact, out)
            elif t.saved_perms is not None:
                self._fire_now(path, t.saved_perms, t.exact, out)
        return _OK

    # ------------------------------------------------------------------ domains

    def _do_get_domain_path(
        self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames
    ) -> bytes:
        return domain_path(parse_domid(payload)) + b"\0"

    def _do_is_domain_introduced(
        self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames
    ) -> bytes:
        return build_bool(parse_domid(payload) in self._domains)

    def _do_introduce(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        domid_text, _, port_text = parse_introduce(payload)  # the gfn is not used
        domid = c_atoi(domid_text)
        port = c_atoi(port_text)
        if port <= 0:
            raise StoreError(E.EINVAL)
        if domid in self._domains:
            return _OK
        self._domains[domid] = _Domain(domid)
        self._fire_special(INTRODUCE_DOMAIN, out)
        return _OK

    def _guest_domid(self, payload: bytes) -> int:
        """The domain of RELEASE and RESUME: never dom0 (EINVAL), introduced (ENOENT)."""
        domid = parse_domid(payload)
        if domid == 0:
            raise StoreError(E.EINVAL)
        if domid not in self._domains:
            raise StoreError(E.ENOENT)
        return domid

    def _do_release(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        domid = self._guest_domid(payload)
        del self._domains[domid]
        self._remove_owned(conn, domid, out)
        for other in list(self._conns.values()):
            if other.domid == domid and not other.privileged:
                # cxenstored forgets the released domain's ring connection.
                self._drop_watches(other)
                other.transactions.clear()
        self._fire_special(RELEASE_DOMAIN, out)
        return _OK

    def _remove_owned(self, conn: _Conn, domid: int, out: Frames) -> None:
        """Remove every subtree whose top node the released domain owns, in a
        top-down walk of the tree (cxenstored 4.17 does not leave them behind)."""
        stack = [b"/"]
        while stack:
            path = stack.pop()
            node = self._nodes.get(path)
            if node is None:
                continue
            if path != b"/" and node.perms[0].domid == domid:
                self._remove_subtree(conn, None, path, node, out)
                continue
            stack.extend(reversed([_child(path, c) for c in node.children]))

    def _do_resume(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        self._guest_domid(payload)
        return _OK

    def _do_set_target(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        domid_text, target_text = parse_set_target(payload)
        domid = c_atoi(domid_text)
        target = c_atoi(target_text)
        dom = self._domains.get(domid)
        if dom is None or target not in self._domains:
            raise StoreError(E.ENOENT)
        dom.target = target
        return _OK

    # ------------------------------------------------------------------ control

    def _do_control(self, conn: _Conn, tx: _Tx | None, payload: bytes, out: Frames) -> bytes:
        cmd, args = parse_control(payload)
        if cmd == b"check" and not args:
            return _OK
        if cmd == b"help" and not args:
            return HELP_TEXT + b"\0"
        if cmd == b"print" and len(args) == 1:
            return _OK
        if cmd == b"log" and len(args) == 1 and args[0] in (b"on", b"off"):
            return _OK
        if cmd == b"logfile" and len(args) == 1:
            self._logfile_set = True
            return _OK
        if cmd == b"memreport" and len(args) <= 1:
            # cxenstored writes a talloc report to its log file (or the named file),
            # failing without one; the embedded server writes nothing.
            if not args and not self._logfile_set:
                raise StoreError(E.EINVAL)
            return _OK
        if cmd == EMBEDDED_PROBE and not args:
            return EMBEDDED_PROBE_REPLY
        if cmd == b"quota":
            return self._control_quota(args)
        if cmd == b"quota-soft":
            return self._control_quota_soft(args)
        if cmd == b"live-update" and args == [b"-s"]:
            return b"Not in live-update session.\0"
        if cmd == b"live-update" and args == [b"-a"]:
            return b"No live-update session active.\0"
        raise StoreError(E.EINVAL)

    def _control_quota(self, args: list[bytes]) -> bytes:
        q = self.quotas
        if not args:
            lines = [b"Quota settings:\n"]
            for name, attr, desc in q.TABLE:
                lines.append(b"%-17s: %8d %s\n" % (name, getattr(q, attr), desc))
            return b"".join(lines) + b"\0"
        if args[0] == b"set":
            if len(args) != 3:
                raise StoreError(E.EINVAL)
            for name, attr, _ in q.TABLE:
                if name == args[1]:
                    setattr(q, attr, c_atoi(args[2]))
                    return _OK
            raise StoreError(E.EINVAL)
        if len(args) != 1:
            raise StoreError(E.EINVAL)
        domid = c_atoi(args[0])
        if domid not in self._domains:
            raise StoreError(E.ENOENT)
        watches = txs = 0
        for c in self._conns.values():
            if c.domid == domid and not c.privileged:
                watches += len(c.watches)
                txs += len(c.transactions)
        return (
            b"Domain %d:\n"
            b"nodes           : %8d\n"
            b"watches         : %8d\n"
            b"transactions    : %8d\n"
            b"outstanding     : %8d\n"
            b"memory          : %8d\n\0"
            % (domid, self._owned.get(domid, 0), watches, txs, 0, self._memory(domid))
        )

    def _memory(self, domid: int) -> int:
        # cxenstored accounts the stored size of the domain's nodes (key and record).
        total = 0
        for path, node in self._nodes.items():
            if node.perms[0].domid == domid:
                total += len(path) + node.record_size()
        return total

    def _control_quota_soft(self, args: list[bytes]) -> bytes:
        q = self.quotas
        if not args:
            return b"Quota settings:\n%-17s: %8d %s\n\0" % (
                b"memory",
                q.memory_soft,
                b"Total Xenstore memory per domain (warning level)",
            )
        if args[0] == b"set" and len(args) == 3 and args[1] == b"memory":
            q.memory_soft = c_atoi(args[2])
            return _OK
        raise StoreError(E.EINVAL)

    # ------------------------------------------------------------------ inspection

    def dump(self) -> list[tuple[bytes, bytes, tuple[Perm, ...]]]:
        """(path, value, perms) of every node, parents before children, children in
        creation order: for tests and diagnostics."""
        result = []
        stack = [b"/"]
        while stack:
            path = stack.pop()
            node = self._nodes[path]
            result.append((path, node.value, node.perms))
            stack.extend(reversed([_child(path, c) for c in node.children]))
        return result

    def node_count(self) -> int:
        return len(self._nodes)

    def generation(self) -> int:
        """The next generation number to be handed out."""
        return self._gen
