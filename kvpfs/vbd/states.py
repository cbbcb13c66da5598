"""XenbusState: the numbers every frontend and backend ``state`` node holds (xenbus.h)."""

from __future__ import annotations

import enum


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


#: The names xenbus.h gives (``XenbusStateInitWait`` → ``InitWait``).
STATE_NAMES: dict[int, str] = {
    XenbusState.UNKNOWN: "Unknown",
    XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait",
    XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected",
    XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed",
    XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}


def state_name(value: int | None) -> str:
    """``Connected`` for 4; ``Unknown`` for anything xenbus.h does not define."""
    if value is None:
        return "Unknown"
    return STATE_NAMES.get(value, "Unknown")


def parse_state(raw: bytes | str | None) -> int | None:
    """A ``state`` node's value as a number, None when absent or not a number.

    Drivers write plain decimals; anything else is treated as unknown rather than
    an error, since a consumer must keep going whatever a peer writes.
    """
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not text.isdigit():
        return None
    return int(text)
