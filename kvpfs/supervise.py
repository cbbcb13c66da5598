"""Keeping a long-running task alive: one view's or peer's failure is logged and
contained, never the end of the whole mount."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

#: First and longest wait before a failed task runs again.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


class _StartedOnce:
    """Passes the first ``started()`` on; a restarted task's are its own business."""

    def __init__(self, task_status: trio.TaskStatus[Any]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: Any = None) -> None:
        if not self.done:
            self.done = True
            self._task_status.started(value)


async def supervise(
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` (a ``nursery.start``-style task) until cancelled.

    A failure before ``fn`` reports started is the caller's: it is raised, so a
    mount that cannot start says why.  A failure afterwards is logged and ``fn``
    runs again after a growing delay; meanwhile its users see it as unavailable
    (a view answers EIO).  Returning normally ends the supervision.
    """
    once = _StartedOnce(task_status)
    delay = RESTART_DELAY
    while True:
        try:
            await fn(task_status=once)
            return
        except Exception:
            if not once.done:
                raise
            log.exception("%s failed; starting it again in %.1f s", name, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, MAX_RESTART_DELAY)
