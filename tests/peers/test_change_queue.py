"""The simulated drivers' change queue: bounded, a burst becomes one rescan."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kvpfs.peers.xendrivers import ChangeQueue


def drain(queue: ChangeQueue) -> list[str | None]:
    out: list[str | None] = []
    while True:
        try:
            out.append(queue.get_nowait())
        except trio.WouldBlock:
            return out


def test_paths_in_order_until_the_limit_then_one_gap() -> None:
    queue = ChangeQueue(limit=3)
    for path in ("a", "b", "c"):
        queue.put(path)
    assert drain(queue) == ["a", "b", "c"]
    for n in range(100_000):
        queue.put(f"p{n}")
    # Everything past the limit collapsed into one gap, and what came after the
    # gap is covered by the rescan the gap asks for.
    assert drain(queue) == [None]
    assert queue.overflows == 1


def test_a_watch_gap_is_a_gap() -> None:
    queue = ChangeQueue()
    queue.put("a")
    queue.put(None)
    queue.put("b")
    assert drain(queue) == [None]


async def test_get_waits_for_a_put() -> None:
    queue = ChangeQueue()
    got: list[str | None] = []

    async def consumer() -> None:
        got.append(await queue.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        queue.put("x")
    assert got == ["x"]


@pytest.mark.parametrize("limit", [1, 2])
def test_tiny_limits(limit: int) -> None:
    queue = ChangeQueue(limit=limit)
    queue.put("a")
    queue.put("b")
    assert drain(queue) == (["a", "b"] if limit == 2 else [None])
