"""Open files as a state machine: what an event on an open file must do.  Pure.

Every open file buffers the whole value (README, "Editing semantics").  When that
buffer reaches the store depends on what happened to the handle since its last
commit; :class:`State` names those situations, and :func:`transition` plans each
:class:`Event` as a :class:`Plan` value, the next state and the :class:`Action`\\ s
that the FUSE layer (``operations.py``) then carries out, the way
``kvp/records.py`` plans pool edits for ``kvp/pool.py`` to execute.

The rule it encodes:

* flush (every close) commits what was written since the last commit;
* fsync, release and the end of the mount commit whatever must reach the store:
  a write or truncate, an O_TRUNC open, a create;
* a commit leaves the handle with nothing to store *before* the store answers: a
  refused value was reported to the writer (flush and fsync return the errno) and
  is dropped, never stored later;
* a file created through the mount exists only in the mount until its first
  commit (the ``NEW*`` states, shared by every writer that opens it meanwhile);
  if that commit is refused, the name goes at release (:attr:`Action.DROP`), and
  if the name is unlinked first, nothing of it is ever stored (:attr:`State.GONE`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    # Members are singletons compared by identity: hashing them so is exact, and
    # three times faster than Enum's hash of the name (a table lookup per request).
    __hash__ = object.__hash__

    #: Nothing to store: read-only, untouched, or committed (or refused) since.
    CLEAN = "clean"
    #: Opened with O_TRUNC and not written since: stored at fsync or release, not
    #: at flush (a ``> k`` with nothing written still empties the value).
    PENDING = "pending"
    #: Written or truncated since the last commit: stored at flush, fsync or release.
    WRITTEN = "written"
    #: Created here and not yet stored, nothing written: stored (empty) at fsync
    #: or release.
    NEW = "new"
    #: Created here, not yet stored, written: stored at flush, fsync or release.
    NEW_WRITTEN = "new-written"
    #: Created here, not stored, nothing to store: its commit is under way or was
    #: refused, or the handle joined the new file and wrote nothing.
    NEW_CLEAN = "new-clean"
    #: Created here and unlinked before it was ever stored: nothing is stored.
    GONE = "gone"
    #: Released; no event changes it.
    CLOSED = "closed"


class Event(enum.Enum):
    __hash__ = object.__hash__

    #: write(2), or a truncate through the handle or of its file.
    WRITE = "write"
    #: close(2) of one descriptor (FUSE flush).
    FLUSH = "flush"
    FSYNC = "fsync"
    #: The last descriptor is gone (FUSE release).
    RELEASE = "release"
    #: The mount is ending with the handle still open.
    UNMOUNT = "unmount"
    #: The name is being renamed: a new file must reach the store first.
    RENAME = "rename"
    #: A new file's value was stored, through this handle or another one of it.
    STORED = "stored"
    #: A new file's name was unlinked before the file was ever stored.
    UNLINK = "unlink"


class Action(enum.Enum):
    #: Store the buffer (into the view, or the overlay for a scratch file).
    COMMIT = "commit"
    #: Store a new file's buffer; once stored, every handle of the file gets
    #: :attr:`Event.STORED` and the name is no longer the mount's alone.
    COMMIT_NEW = "commit-new"
    #: The new file is given up if it is still unstored: its name leaves the
    #: mount.  Always last; carried out whether or not a commit before it failed.
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Plan:
    #: The handle's state from now on (entered before any action runs).
    state: State
    actions: tuple[Action, ...] = ()


#: The states of a file created here and not yet stored: the name exists only in
#: the mount (listed from the handle, its size and content are the buffer's).
NEW_STATES = frozenset({State.NEW, State.NEW_WRITTEN, State.NEW_CLEAN})

_WRITTEN_AS = {
    State.NEW: State.NEW_WRITTEN,
    State.NEW_WRITTEN: State.NEW_WRITTEN,
    State.NEW_CLEAN: State.NEW_WRITTEN,
    State.GONE: State.GONE,
}
_STORED_AS = {
    State.NEW: State.PENDING,
    State.NEW_WRITTEN: State.WRITTEN,
    State.NEW_CLEAN: State.CLEAN,
}


def _plan(state: State, event: Event) -> Plan:
    """The rules; :func:`transition` answers from a table built from them."""
    if state is State.CLOSED:
        return Plan(State.CLOSED)
    if event is Event.WRITE:
        return Plan(_WRITTEN_AS.get(state, State.WRITTEN))
    if event is Event.FLUSH:
        if state is State.WRITTEN:
            return Plan(State.CLEAN, (Action.COMMIT,))
        if state is State.NEW_WRITTEN:
            return Plan(State.NEW_CLEAN, (Action.COMMIT_NEW,))
        return Plan(state)
    if event in (Event.FSYNC, Event.UNMOUNT):
        if state in (State.PENDING, State.WRITTEN):
            return Plan(State.CLEAN, (Action.COMMIT,))
        if state in (State.NEW, State.NEW_WRITTEN):
            return Plan(State.NEW_CLEAN, (Action.COMMIT_NEW,))
        return Plan(state)
    if event is Event.RELEASE:
        if state in (State.PENDING, State.WRITTEN):
            return Plan(State.CLOSED, (Action.COMMIT,))
        if state in (State.NEW, State.NEW_WRITTEN):
            return Plan(State.CLOSED, (Action.COMMIT_NEW, Action.DROP))
        if state is State.NEW_CLEAN:
            return Plan(State.CLOSED, (Action.DROP,))
        return Plan(State.CLOSED)
    if event is Event.RENAME:
        if state in (State.NEW, State.NEW_WRITTEN):
            return Plan(State.NEW_CLEAN, (Action.COMMIT_NEW,))
        return Plan(state)
    if event is Event.STORED:
        return Plan(_STORED_AS.get(state, state))
    if event is Event.UNLINK:
        return Plan(State.GONE)
    raise AssertionError(f"unhandled event {event}")


_TABLE: dict[tuple[State, Event], Plan] = {
    (state, event): _plan(state, event) for state in State for event in Event
}


def transition(state: State, event: Event) -> Plan:
    """What ``event`` does to a handle in ``state``: its next state and the actions."""
    return _TABLE[state, event]


def opened(*, truncated: bool, new_file: bool) -> State:
    """The state of a handle that open() returns.

    ``truncated``: a writable O_TRUNC open; ``new_file``: a writable open of a file
    created here and not yet stored, which the handle then shares.  (create()
    itself starts in :attr:`State.NEW`.)
    """
    if new_file:
        return State.NEW if truncated else State.NEW_CLEAN
    return State.PENDING if truncated else State.CLEAN
