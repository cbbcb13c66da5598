"""KvpView against other processes writing the same pool file at the same time.

Each writer owns a key prefix and keeps a model of its keys; at the end the
file must hold exactly the union of the models: nothing lost, nothing
duplicated, no torn record.  Writers that do not exclude each other (flock-only
and fcntl-only) only ever append or overwrite in place, which commutes; every
pair involving kvpfs excludes through one lock family or the other.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from kvpfs.kvp.location import create_pools
from kvpfs.kvp.records import RECORD_SIZE, parse
from kvpfs.kvp.view import KvpView

from .helpers import HERE

TASKS = 3
MIN_OPS_PER_TASK = 300


def start_peer(path: Path, mode: str, prefix: str, ops: int, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "peer_writer.py"), str(path), mode, prefix, str(ops),
         str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )


async def peer_model(proc: subprocess.Popen[str]) -> dict[str, str]:
    out, _ = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 0
    model: dict[str, str] = json.loads(out)
    return model


async def kvpfs_writer(
    backend: KvpView, task: int, model: dict[str, str], peers_done: trio.Event
) -> int:
    """Random sets, deletes, renames and checked listings until the peers are done."""
    rng = random.Random(task)
    names = [f"k{task}-{i}" for i in range(30)]
    n = 0
    while n < MIN_OPS_PER_TASK or not peers_done.is_set():
        n += 1
        name = rng.choice(names)
        roll = rng.random()
        if roll < 0.5:
            value = f"{name}={n}"
            await backend.write(("guest", name), value.encode())
            model[name] = value
        elif roll < 0.7:
            if name in model:
                await backend.remove(("guest", name))
                del model[name]
        elif roll < 0.85:
            target = rng.choice(names)
            if name in model and target != name:
                await backend.rename(("guest", name), ("guest", target), replace=True)
                model[target] = model.pop(name)
        else:
            listing = await backend.listdir(("guest",))
            mine = {n for n, _ in listing if n.startswith(f"k{task}-")}
            assert mine == set(model)
            for key in list(model)[:3]:
                assert (await backend.read(("guest", key))).decode() == model[key]
        # Let the other tasks in between, as concurrent FUSE requests would.
        await trio.lowlevel.checkpoint()
    return n


async def run_against(tmp_path: Path, peers: list[tuple[str, str, int]]) -> None:
    pool_dir = tmp_path / "pools"
    create_pools(str(pool_dir))
    path = pool_dir / ".kvp_pool_1"
    backend = KvpView(str(pool_dir))
    procs = [
        start_peer(path, mode, prefix, ops, seed) for seed, (mode, prefix, ops) in enumerate(peers)
    ]
    models: list[dict[str, str]] = [{} for _ in range(TASKS)]
    expected: dict[str, str] = {}
    peers_done = trio.Event()

    async def collect() -> None:
        for proc in procs:
            expected.update(await peer_model(proc))
        peers_done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            for task in range(TASKS):
                nursery.start_soon(kvpfs_writer, backend, task, models[task], peers_done)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for model in models:
        expected.update(model)
    data = path.read_bytes()
    assert len(data) % RECORD_SIZE == 0
    records = parse(data)
    keys = [r.key.decode() for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert {r.key.decode(): r.value.decode() for r in records} == expected
    assert {name: (await backend.read(("guest", name))).decode() for name in expected} == expected
    await backend.aclose()


@pytest.mark.timeout(60)
async def test_with_cloud_init_style_appender_and_ofd_writer(tmp_path: Path) -> None:
    await run_against(tmp_path, [("append-flock", "a-", 500), ("inplace-ofd", "o-", 700)])


@pytest.mark.timeout(60)
async def test_with_daemon_style_rewriter_and_ofd_writer(tmp_path: Path) -> None:
    await run_against(tmp_path, [("rewrite-posix", "d-", 500), ("inplace-ofd", "o-", 500)])
