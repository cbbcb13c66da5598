"""The open-file state machine (kvpfs.fs.openfile): every state × event, spelled out.

The expected table is written here independently of the module's rules, one row
per event; a cell left out means "no change, nothing to do".
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from kvpfs.fs import openfile
from kvpfs.fs.openfile import NEW_STATES, Action, Event, Plan, State, opened, transition

S = State
A = Action
CLEAN, PENDING, WRITTEN = S.CLEAN, S.PENDING, S.WRITTEN
NEW, NEW_WRITTEN, NEW_CLEAN, GONE, CLOSED = S.NEW, S.NEW_WRITTEN, S.NEW_CLEAN, S.GONE, S.CLOSED
COMMIT, COMMIT_NEW, DROP = A.COMMIT, A.COMMIT_NEW, A.DROP

Cell = tuple[State, tuple[Action, ...]]

EXPECTED: dict[Event, dict[State, Cell]] = {
    Event.WRITE: {
        CLEAN: (WRITTEN, ()),
        PENDING: (WRITTEN, ()),
        NEW: (NEW_WRITTEN, ()),
        NEW_CLEAN: (NEW_WRITTEN, ()),
    },
    # close(2): only what was written since the last commit.
    Event.FLUSH: {
        WRITTEN: (CLEAN, (COMMIT,)),
        NEW_WRITTEN: (NEW_CLEAN, (COMMIT_NEW,)),
    },
    Event.FSYNC: {
        PENDING: (CLEAN, (COMMIT,)),
        WRITTEN: (CLEAN, (COMMIT,)),
        NEW: (NEW_CLEAN, (COMMIT_NEW,)),
        NEW_WRITTEN: (NEW_CLEAN, (COMMIT_NEW,)),
    },
    Event.UNMOUNT: {
        PENDING: (CLEAN, (COMMIT,)),
        WRITTEN: (CLEAN, (COMMIT,)),
        NEW: (NEW_CLEAN, (COMMIT_NEW,)),
        NEW_WRITTEN: (NEW_CLEAN, (COMMIT_NEW,)),
    },
    Event.RELEASE: {
        CLEAN: (CLOSED, ()),
        PENDING: (CLOSED, (COMMIT,)),
        WRITTEN: (CLOSED, (COMMIT,)),
        NEW: (CLOSED, (COMMIT_NEW, DROP)),
        NEW_WRITTEN: (CLOSED, (COMMIT_NEW, DROP)),
        NEW_CLEAN: (CLOSED, (DROP,)),
        GONE: (CLOSED, ()),
    },
    Event.RENAME: {
        NEW: (NEW_CLEAN, (COMMIT_NEW,)),
        NEW_WRITTEN: (NEW_CLEAN, (COMMIT_NEW,)),
    },
    Event.STORED: {
        NEW: (PENDING, ()),
        NEW_WRITTEN: (WRITTEN, ()),
        NEW_CLEAN: (CLEAN, ()),
    },
    Event.UNLINK: {
        CLEAN: (GONE, ()),
        PENDING: (GONE, ()),
        WRITTEN: (GONE, ()),
        NEW: (GONE, ()),
        NEW_WRITTEN: (GONE, ()),
        NEW_CLEAN: (GONE, ()),
    },
}


def expected(state: State, event: Event) -> Cell:
    return EXPECTED[event].get(state, (state, ()))


def test_the_table_names_only_real_cells() -> None:
    assert set(EXPECTED) == set(Event)
    for row in EXPECTED.values():
        assert CLOSED not in row or row[CLOSED] == (CLOSED, ())


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(State, Event)), ids=lambda v: v.value
)
def test_every_state_and_event(state: State, event: Event) -> None:
    assert transition(state, event) == Plan(*expected(state, event))


def test_plans_are_well_formed() -> None:
    for state, event in itertools.product(State, Event):
        plan = transition(state, event)
        actions = plan.actions
        # At most one commit; DROP only last, and only for a new file.
        assert sum(a in (COMMIT, COMMIT_NEW) for a in actions) <= 1
        assert DROP not in actions[:-1]
        if DROP in actions or COMMIT_NEW in actions:
            assert state in NEW_STATES
        if COMMIT in actions:
            assert state in (PENDING, WRITTEN)
        # A commit leaves nothing owed: a refused value is never stored later.
        if COMMIT in actions or COMMIT_NEW in actions:
            assert plan.state in (CLEAN, NEW_CLEAN, CLOSED)
        # Only these events may act; the others only change the state.
        if event in (Event.WRITE, Event.STORED, Event.UNLINK):
            assert actions == ()


def test_release_always_closes_and_closed_is_final() -> None:
    for state in State:
        assert transition(state, Event.RELEASE).state is CLOSED
    for event in Event:
        assert transition(CLOSED, event) == Plan(CLOSED)


def test_gone_never_reaches_the_store() -> None:
    for event in Event:
        plan = transition(GONE, event)
        assert plan.actions == ()
        assert plan.state in (GONE, CLOSED)


@pytest.mark.parametrize(
    ("truncated", "new_file", "state"),
    [
        (False, False, CLEAN),
        (True, False, PENDING),
        (False, True, NEW_CLEAN),
        (True, True, NEW),
    ],
)
def test_opened(truncated: bool, new_file: bool, state: State) -> None:
    assert opened(truncated=truncated, new_file=new_file) is state


def test_commit_rule_sequences() -> None:
    """The README's editing semantics, as event sequences."""

    def run(state: State, *events: Event) -> list[tuple[Action, ...]]:
        done = []
        for event in events:
            plan = transition(state, event)
            state = plan.state
            done.append(plan.actions)
        return done

    # echo v > k: O_TRUNC open, write, close (flush commits, release has nothing).
    assert run(opened(truncated=True, new_file=False), Event.WRITE, Event.FLUSH, Event.RELEASE) == [
        (), (COMMIT,), ()
    ]
    # : > k: O_TRUNC open, nothing written: stored at release, not at flush.
    assert run(PENDING, Event.FLUSH, Event.RELEASE) == [(), (COMMIT,)]
    # A refused flush is not retried at release.
    assert run(WRITTEN, Event.FLUSH, Event.RELEASE) == [(COMMIT,), ()]
    # touch new: create, close: the empty file is stored at release.
    assert run(NEW, Event.FLUSH, Event.RELEASE) == [(), (COMMIT_NEW, DROP)]
    # A refused new file is not stored at release; its name goes.
    assert run(NEW_WRITTEN, Event.FLUSH, Event.RELEASE) == [(COMMIT_NEW,), (DROP,)]
    # fsync commits a pending truncate, once.
    assert run(PENDING, Event.FSYNC, Event.FSYNC, Event.RELEASE) == [(COMMIT,), (), ()]


def test_module_is_pure() -> None:
    tree = ast.parse(Path(openfile.__file__).read_text())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "enum", "dataclasses"}
