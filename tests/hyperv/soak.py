"""The soak: host SET/DELETE interleaved with guest writes and a cloud-init-style appender.

Five parties work at once on the real daemon:

* the host (this task): ``ops`` SETs and DELETEs on pools 0 and 3, with an
  enumeration of the guest pool every 300 operations and IP requests between
  them: every 100 operations a GET_IP_INFO of eth0, which must show the
  configuration last injected, and every 200 a SET_IP_INFO switching eth0
  between two configurations;
* a network reader (a worker thread) reading ``host/net/<mac>/config`` through
  the mount four times a second: always one of the two configurations, whole.
  (A GET costs the daemon four shell pipelines per address, tens of ms.)
* the guest, through ``kvp/guest`` (a worker thread): writes and removes;
* an appender process adding records to pool 1 as cloud-init does (flock);
* a reader (a worker thread) listing and reading ``kvp/external`` and
  ``kvp/auto_external`` all the time.

Every value anyone sees must be one that was written for that key, and at the
end every pool is compared record by record with a model: the host pools in
the daemon's exact order (append new keys, modify in place, delete shifts),
the guest pool as the guest's writes plus the appended records, nothing lost,
nothing doubled.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import threading
import time
from collections import defaultdict

import trio

from kvpfs.kvp.location import pool_path
from kvpfs.kvp.names import key_to_name
from kvpfs.kvp.records import parse
from kvpfs.peers.hyperv.host import HostError
from kvpfs.peers.hyperv.hostsim import POOL_DIR, Environment, default_items
from kvpfs.peers.hyperv.ipconfig import IpConfig, format_config

#: The two configurations the soak switches eth0 between (the first is its start).
IP_CONFIGS = (
    IpConfig(("192.0.2.10",), ("255.255.255.0",), ("192.0.2.1",), ("192.0.2.53",)),
    IpConfig(
        ("198.51.100.7", "2001:db8::7"),
        ("255.255.255.0", "/64"),
        ("198.51.100.1", "2001:db8::1"),
        ("198.51.100.53",),
    ),
)

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_KEYS = 40


def _records(number: int) -> list[tuple[str, str]]:
    with open(pool_path(POOL_DIR, number), "rb") as f:
        return [(r.key.decode(), r.value.decode()) for r in parse(f.read())]


class HostModel:
    """The daemon's record order for the pools the host writes."""

    def __init__(self) -> None:
        self.pools: dict[int, list[tuple[str, str]]] = {
            0: [],
            3: list(default_items()[3].items()),
        }
        #: Every value ever sent per (pool, key): what a reader may see.
        self.ever: dict[tuple[int, str], set[str]] = defaultdict(set)
        for key, value in self.pools[3]:
            self.ever[3, key].add(value)

    def index(self, pool: int, key: str) -> int | None:
        for i, (k, _) in enumerate(self.pools[pool]):
            if k == key:
                return i
        return None

    def set(self, pool: int, key: str, value: str) -> None:
        i = self.index(pool, key)
        if i is None:
            self.pools[pool].append((key, value))
        else:
            self.pools[pool][i] = (key, value)

    def delete(self, pool: int, key: str) -> bool:
        i = self.index(pool, key)
        if i is None:
            return False
        del self.pools[pool][i]
        return True


def _value(rng: random.Random, key: str, i: int) -> str:
    roll = rng.random()
    if roll < 0.1:
        return f"{key}={i}:" + "ü" * rng.randrange(1, 600)
    if roll < 0.2:
        return f"{key}={i}:" + "x" * rng.randrange(500, 1000)
    return f"{key}={i}"


def _guest_writer(directory: str, ops: int, seed: int, errors: list[str]) -> dict[str, str]:
    rng = random.Random(seed)
    model: dict[str, str] = {}
    for i in range(ops):
        key = f"G{rng.randrange(GUEST_KEYS)}"
        path = os.path.join(directory, key)
        try:
            if rng.random() < 0.75 or key not in model:
                value = f"{key}={i}"
                with open(path, "w", encoding="utf-8") as f:
                    f.write(value + "\n")
                model[key] = value
            else:
                os.unlink(path)
                del model[key]
        except OSError as exc:
            errors.append(f"guest {key}: {exc}")
        time.sleep(rng.random() / 1000)
    return model


def _reader(
    kvp: str, model: HostModel, stop: threading.Event, errors: list[str], counts: list[int]
) -> None:
    rng = random.Random(7)
    pools = {"external": 0, "auto_external": 3}
    while not stop.is_set():
        directory = rng.choice(list(pools))
        pool = pools[directory]
        names = os.listdir(os.path.join(kvp, directory))
        counts[0] += 1
        for name in rng.sample(names, min(3, len(names))):
            try:
                with open(os.path.join(kvp, directory, name), encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                continue  # deleted since the listing
            counts[1] += 1
            key = name  # the soak's keys are their own names
            if not text.endswith("\n") or text[:-1] not in model.ever[pool, key]:
                errors.append(f"reader: {directory}/{name} = {text[:60]!r}")
        time.sleep(0.005)


def _net_reader(path: str, stop: threading.Event, errors: list[str], counts: list[int]) -> None:
    allowed = {format_config(config) for config in IP_CONFIGS}
    while not stop.is_set():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        counts[2] += 1
        if text not in allowed:
            errors.append(f"net reader: {text!r}")
        time.sleep(0.25)


async def run_soak(env: Environment, *, ops: int, seed: int = 20240601) -> None:
    rng = random.Random(seed)
    host = env.host
    model = HostModel()
    kvp = env.path("kvp")
    errors: list[str] = []
    guest_ops = max(ops // 3, 1)
    appends = max(ops // 10, 1)
    stop = threading.Event()
    reader_counts = [0, 0, 0]
    ((mac, adapter),) = list(host.adapters.items())[:1]
    ip_state = {"current": 0, "gets": 0, "sets": 0}
    results: dict[str, object] = {}
    started = time.monotonic()

    async def appender() -> None:
        result = await trio.run_process(
            [
                sys.executable,
                os.path.join(HERE, "appender.py"),
                pool_path(POOL_DIR, 1),
                str(appends),
                "CLOUD_INIT|soak|",
                str(seed),
            ],
            capture_stdout=True,
        )
        results["appended"] = [tuple(pair) for pair in json.loads(result.stdout)]

    async def guest() -> None:
        results["guest"] = await trio.to_thread.run_sync(
            _guest_writer, os.path.join(kvp, "guest"), guest_ops, seed + 1, errors
        )

    async def reader() -> None:
        await trio.to_thread.run_sync(_reader, kvp, model, stop, errors, reader_counts)

    async def net_reader() -> None:
        path = env.path("host", "net", mac, "config")
        await trio.to_thread.run_sync(_net_reader, path, stop, errors, reader_counts)

    async def ip_request(i: int) -> None:
        if i % 200 == 199:
            ip_state["current"] ^= 1
            await host.set_ip_info(adapter.guid, IP_CONFIGS[ip_state["current"]])
            ip_state["sets"] += 1
        elif i % 100 == 99:
            seen = await host.get_ip_info(mac)
            assert seen == IP_CONFIGS[ip_state["current"]], seen
            ip_state["gets"] += 1

    def check_guest_item(key: str, value: str) -> None:
        if key.startswith("G"):
            ok = value.startswith(key + "=")
        else:
            ok = key.startswith("CLOUD_INIT|soak|") and json.loads(value)["name"] == key
        if not ok:
            errors.append(f"host saw guest item {key!r}={value[:60]!r}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(appender)
        nursery.start_soon(guest)
        nursery.start_soon(reader)
        nursery.start_soon(net_reader)
        sets = deletes = missing = 0
        for i in range(ops):
            pool = 0 if rng.random() < 0.7 else 3
            names = [f"H{n}" for n in range(50)] if pool == 0 else [f"P{n}" for n in range(20)]
            if pool == 3:
                names += list(default_items()[3])
            key = rng.choice(names)
            if rng.random() < 0.7:
                value = _value(rng, key, i)
                model.ever[pool, key].add(value)
                await host.set(pool, key, value)
                model.set(pool, key, value)
                sets += 1
            else:
                expected = model.delete(pool, key)
                try:
                    await host.delete(pool, key)
                except HostError as exc:
                    if expected or exc.errno != errno.ENOENT:
                        raise
                    missing += 1
                else:
                    assert expected, f"DELETE of {key} in pool {pool} found a record"
                    deletes += 1
            await ip_request(i)
            if i % 300 == 299:
                enumeration = await host.items(1)
                assert enumeration.complete, enumeration.end_status
                for key, value in enumeration.items:
                    check_guest_item(key, value)
        host_done = time.monotonic()
        while "guest" not in results or "appended" not in results:
            await trio.sleep(0.05)
        stop.set()

    assert not errors, errors[:20]
    assert await host.get_ip_info(mac) == IP_CONFIGS[ip_state["current"]]
    # The host pools: record by record, in the daemon's order.
    assert _records(0) == model.pools[0]
    assert _records(3) == model.pools[3]
    # The guest pool: the guest's model plus every appended record, once each.
    guest_model = results["guest"]
    appended = results["appended"]
    assert isinstance(guest_model, dict) and isinstance(appended, list)
    expected1 = {**guest_model, **dict(appended)}
    records1 = _records(1)
    assert len(records1) == len(expected1), (len(records1), len(expected1))
    assert dict(records1) == expected1
    appended_order = [key for key, _ in records1 if key.startswith("CLOUD_INIT|")]
    assert appended_order == [key for key, _ in appended]
    for number in (2, 4):
        with open(pool_path(POOL_DIR, number), "rb") as f:
            assert f.read() == b""
    # What the host enumerates and what the guest lists agree with the files.
    for pool, directory in ((0, "external"), (1, "guest"), (3, "auto_external")):
        enumeration = await host.items(pool)
        assert enumeration.complete
        assert enumeration.items == _records(pool)
        listed = await trio.to_thread.run_sync(os.listdir, os.path.join(kvp, directory))
        assert sorted(listed) == sorted(key_to_name(k.encode()) for k, _ in _records(pool))
    print(
        f"soak: {ops} host ops ({sets} SET, {deletes} DELETE, {missing} DELETE of a missing "
        f"key) in {host_done - started:.2f} s; {guest_ops} guest ops, {appends} appended "
        f"records, {reader_counts[0]} listings and {reader_counts[1]} reads checked; "
        f"{ip_state['gets']} GET_IP_INFO, {ip_state['sets']} SET_IP_INFO and "
        f"{reader_counts[2]} reads of host/net/{mac}/config; "
        f"{host.requests} requests in all; final pools 0/1/3: {len(model.pools[0])}/"
        f"{len(records1)}/{len(model.pools[3])} records",
        flush=True,
    )
