"""The one place kvpfs reads trio's private internals, behind one switch.

The embedded xenstored (:mod:`kvpfs.peers.xenstored.server`) can wait for a client's
next request in a blocking poll(2) instead of through trio, which is several times
cheaper per request, but only while nothing else in the trio run could proceed.
Knowing that takes trio internals: the run queue, the deadlines, the tasks waiting
for the run to go idle, and the I/O manager's epoll fd (:class:`IdleLoop`).

The switch is the environment variable ``KVPFS_TRIO_FASTPATH``, read once, when this
module is first imported:

* ``0``: off.  The server waits through trio's public API only;
* ``1``: on with any trio version, as long as its internals look as expected;
* unset or empty: on only with a trio version it was tested with
  (:data:`TESTED_TRIO_VERSIONS`), off with any other.

Whatever the switch says, :meth:`IdleLoop.install` declines (and the server falls
back) when the run is not what the fast path expects: guest mode, a non-system
clock, an I/O manager without an epoll object.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import warnings
from typing import Any

import trio

__all__ = ["ENABLED", "ENV", "TESTED_TRIO_VERSIONS", "IdleLoop", "decide"]

ENV = "KVPFS_TRIO_FASTPATH"

#: trio releases the fast path was tested with (the XenStore suites, switch on).
TESTED_TRIO_VERSIONS = frozenset({"0.34.0", "0.35.0"})

#: Longest sleep in poll(2) on one client's socket.
IDLE_POLL_MS = 5


def decide(value: str | None, version: str) -> bool:
    """Whether the fast path is on, for the switch's ``value`` and a trio version."""
    if value == "1":
        return True
    if value == "0":
        return False
    if value:
        warnings.warn(
            f"{ENV}={value!r} is neither 0 nor 1: ignored", RuntimeWarning, stacklevel=2
        )
    return version in TESTED_TRIO_VERSIONS


#: The switch, read once.
ENABLED: bool = decide(os.environ.get(ENV), trio.__version__)


class IdleLoop(trio.abc.Instrument):
    """Whether this trio run has nothing to do but wait for I/O, and its epoll fd.

    A request/reply client sends its next request some tens of microseconds after
    our reply.  Waiting for it through trio (``wait_readable``: an epoll_ctl, the
    scheduler pass, epoll_wait, rescheduling the task) costs about 25 us of CPU per
    request on a small VM, more than the whole request; a blocking ``poll(2)`` on
    the client's socket costs a few.  Blocking the thread is only harmless while
    nothing else in the run could proceed:

    * no task is runnable: neither in the run queue nor still to run in the
      current scheduler pass (trio takes the pass's tasks out of the queue before
      running them; as an instrument this counts them off as they step);
    * no task waits for the run to go idle, no deadline falls within the sleep;
    * no I/O is pending for another task, which is what polling trio's own epoll
      fd alongside the socket watches (other tasks' sockets, the wake-up socket
      that signals and other threads use).

    The run loop exposes the queue and its epoll fd only internally (its public
    statistics walk every registered fd, costing as much as the wait they would
    save), hence this module.
    """

    def __init__(self, runner: Any) -> None:
        self._runq = runner.runq
        self._next_deadline = runner.deadlines.next_deadline
        self._waiting_for_idle = runner.waiting_for_idle
        self._now = runner.clock.current_time
        self.epoll_fd: int = runner.io_manager._epoll.fileno()
        #: Tasks of the current pass not yet run; unknown (large) until the first
        #: pass this instrument sees starts.
        self._pending = 1 << 30

    @classmethod
    def install(cls) -> IdleLoop | None:
        """Start counting in the current run (None: switched off, or trio is not as
        expected; the caller then waits through trio only)."""
        if not ENABLED:
            return None
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

            runner: Any = GLOBAL_RUN_CONTEXT.runner
            if runner.is_guest or type(runner.clock) is not SystemClock:
                return None
            if not isinstance(runner.io_manager._epoll, select.epoll):
                return None
            idle = cls(runner)
            idle.budget_ms()
        except Exception:
            return None
        trio.lowlevel.add_instrument(idle)
        return idle

    def uninstall(self) -> None:
        with contextlib.suppress(KeyError):
            trio.lowlevel.remove_instrument(self)

    def after_io_wait(self, timeout: float) -> None:
        # The pass about to run takes every task queued now.  Deadlines that have
        # passed, and a run going idle, wake more tasks before it starts: then its
        # size is unknown.
        self._pending = len(self._runq)
        if self._waiting_for_idle or self._next_deadline() <= self._now():
            self._pending = 1 << 30

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._pending -= 1

    def budget_ms(self) -> int:
        """How long the thread may block in poll(2) without delaying trio (0: not)."""
        if self._pending > 0 or self._runq or self._waiting_for_idle:
            return 0
        deadline = self._next_deadline()
        if deadline == math.inf:
            return IDLE_POLL_MS
        left = deadline - self._now()
        if left >= IDLE_POLL_MS / 1000:
            return IDLE_POLL_MS
        # poll(2) counts whole milliseconds: never past the deadline.
        return int(left * 1000) if left > 0 else 0
