"""Through the kernel, beside writers that hold OFD locks and writers that hold flock.

A few thousand operations in all; afterwards the pool holds exactly the union of
every writer's model: nothing lost, nothing duplicated, no torn record.
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from kvpfs.kvp.records import RECORD_SIZE, parse, visible
from tests.kvp.test_concurrency import peer_model, start_peer
from tests.mount.kvp_fixtures import Pools, mount_kvp
from tests.mounting import in_thread, write_bytes

pytestmark = pytest.mark.mount

PEER_OPS = 1200


def mount_ops(kvp: str, model: dict[str, str], stop: list[bool]) -> int:
    """Sets, deletes and renames through the mount until the peers are done."""
    rng = random.Random(7)
    names = [f"m-{i}" for i in range(25)]
    n = 0
    while n < 600 or not stop[0]:
        n += 1
        name = rng.choice(names)
        roll = rng.random()
        if roll < 0.55:
            value = f"{name}={n}"
            write_bytes(f"{kvp}/guest/{name}", value.encode() + b"\n")
            model[name] = value
        elif roll < 0.75:
            if name in model:
                os.unlink(f"{kvp}/guest/{name}")
                del model[name]
        elif roll < 0.9:
            target = rng.choice(names)
            if name in model and target != name:
                os.rename(f"{kvp}/guest/{name}", f"{kvp}/guest/{target}")
                model[target] = model.pop(name)
        else:
            mine = {x for x in os.listdir(f"{kvp}/guest") if x.startswith("m-")}
            assert mine == set(model)
    return n


@pytest.mark.timeout(120)
async def test_ofd_and_flock_writers_beside_the_mount(mount, pools: Pools) -> None:
    _, kvp = await mount_kvp(mount, pools)
    path = pools.path("guest")
    peers = [
        start_peer(path, "inplace-ofd", "ofd-", PEER_OPS, 1),
        start_peer(path, "append-flock", "flock-", PEER_OPS, 2),
    ]
    model: dict[str, str] = {}
    stop = [False]
    models: list[dict[str, str]] = []
    try:
        async with trio.open_nursery() as nursery:

            async def collect() -> None:
                for proc in peers:
                    models.append(await peer_model(proc))
                stop[0] = True

            nursery.start_soon(collect)
            ops = await in_thread(mount_ops, kvp, model, stop, timeout=100)
    finally:
        for proc in peers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert ops >= 600
    data = pools.bytes("guest")
    assert len(data) % RECORD_SIZE == 0
    records = parse(data)
    assert len({r.key for r in records}) == len(records)
    expected = {k: v for m in [*models, model] for k, v in m.items()}
    assert {k.decode(): v.decode() for k, v in visible(records).items()} == expected
