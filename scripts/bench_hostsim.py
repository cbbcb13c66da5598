#!/usr/bin/env python3
"""Benchmark the simulated Hyper-V host against the real hv_kvp_daemon (root only).

    .venv/bin/python scripts/bench_hostsim.py [--samples N] [--keys N] [--rounds N]
                                              [--ip-samples N]

Runs in private mount and network namespaces as ``kvpfs hostsim`` does (nothing
is left behind), with its default adapter eth0, and prints:

* IP requests: GET_IP_INFO and SET_IP_INFO round trips through the host API and
  through ``host/net/<mac>/config`` (a ``read`` of the file; a write of a whole
  configuration), with one address and with an IPv4 and an IPv6 one (the
  daemon runs its helper pipelines once per address); a SET alternates
  between two configurations, each applied by hostsim's ``hv_set_ifconfig``;

* host SET → visible in ``kvp/``: a new key set by the host, until a
  ``stat`` of ``kvp/external/KEY`` from another thread succeeds; also the SET
  round trip alone, and the same through the mount (write ``host/external/KEY``,
  then ``stat`` ``kvp/external/KEY``); with a small pool and with ``--keys``
  records in it, since the daemon rereads and rewrites the whole pool file for
  every request;
* host ENUMERATE of ``--keys`` keys: the host API's loop (one request per key
  plus the end marker) and ``os.listdir`` of ``host/external``;
* the rate of host SETs while filling the pool.

Medians and 90th percentiles over the samples; rounds of the enumeration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvpfs.peers.hyperv import hostsim
from kvpfs.peers.hyperv.ipconfig import IpConfig, format_config
from kvpfs.peers.hyperv.netns import SyntheticNetwork, default_nics


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1e3:7.3f} ms   p90 {pct(values, 0.9) * 1e3:7.3f} ms"
    )


def wait_visible(path: str, deadline: float = 5.0) -> float:
    """Seconds until ``path`` exists (polled as fast as stat allows)."""
    end = time.perf_counter() + deadline
    while True:
        try:
            os.stat(path)
            return time.perf_counter()
        except FileNotFoundError:
            if time.perf_counter() > end:
                raise TimeoutError(path) from None


async def thread(fn: Callable[..., object], *args: object) -> object:
    return await trio.to_thread.run_sync(lambda: fn(*args))


def records() -> int:
    return os.path.getsize(os.path.join(hostsim.POOL_DIR, ".kvp_pool_0")) // 2560


async def latency(env: hostsim.Environment, samples: int) -> None:
    """Each sample sets a new key and deletes it again (untimed): the pool keeps its size."""
    kvp = env.path("kvp", "external")
    size = records()
    round_trip: list[float] = []
    visible: list[float] = []
    for i in range(samples):
        key = f"api-{i}"
        started = time.perf_counter()
        await env.host.set(0, key, f"value {i}")
        done = time.perf_counter()
        seen = await thread(wait_visible, os.path.join(kvp, key))
        assert isinstance(seen, float)
        round_trip.append(done - started)
        visible.append(seen - started)
        await env.host.delete(0, key)

    def through_mount() -> list[float]:
        result = []
        for i in range(samples):
            key = f"file-{i}"
            started = time.perf_counter()
            with open(env.path("host", "external", key), "w") as f:
                f.write(f"value {i}\n")
            result.append(wait_visible(os.path.join(kvp, key)) - started)
            os.unlink(env.path("host", "external", key))
        return result

    by_file = await thread(through_mount)
    assert isinstance(by_file, list)
    print(f"\nhost SET -> visible in kvp/, pool 0 with {size} records ({samples} samples):")
    print(f"  host SET round trip (API)              {ms(round_trip)}")
    print(f"  host SET -> visible in kvp/ (API)      {ms(visible)}")
    print(f"  write host/external -> visible in kvp/ {ms(by_file)}")


IP_CONFIGS = (
    IpConfig(("192.0.2.10",), ("255.255.255.0",), ("192.0.2.1",), ("192.0.2.53",)),
    IpConfig(("192.0.2.20",), ("255.255.255.0",), ("192.0.2.1",), ("192.0.2.54",)),
)
DUAL_CONFIGS = (
    IpConfig(
        ("192.0.2.10", "2001:db8::10"),
        ("255.255.255.0", "/64"),
        ("192.0.2.1", "2001:db8::1"),
        ("192.0.2.53",),
    ),
    IpConfig(
        ("192.0.2.20", "2001:db8::20"),
        ("255.255.255.0", "/64"),
        ("192.0.2.1", "2001:db8::1"),
        ("192.0.2.54",),
    ),
)


async def ip_latency(env: hostsim.Environment, samples: int) -> None:
    """GET_IP_INFO and SET_IP_INFO of eth0, by API and through the mount."""
    ((mac, adapter),) = list(env.host.adapters.items())[:1]
    path = env.path("host", "net", mac, "config")

    def read_config() -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def write_config(text: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    for label, configs in (("one IPv4 address", IP_CONFIGS), ("IPv4 + IPv6", DUAL_CONFIGS)):
        await env.host.set_ip_info(adapter.guid, configs[0])
        get_api: list[float] = []
        get_file: list[float] = []
        set_api: list[float] = []
        set_file: list[float] = []
        for i in range(samples):
            started = time.perf_counter()
            seen = await env.host.get_ip_info(mac)
            get_api.append(time.perf_counter() - started)
            assert seen == configs[i % 2], seen
            started = time.perf_counter()
            text = await thread(read_config)
            get_file.append(time.perf_counter() - started)
            assert text == format_config(configs[i % 2])
            started = time.perf_counter()
            await env.host.set_ip_info(adapter.guid, configs[(i + 1) % 2])
            set_api.append(time.perf_counter() - started)
            started = time.perf_counter()
            await thread(write_config, format_config(configs[i % 2]))
            set_file.append(time.perf_counter() - started)
            await env.host.set_ip_info(adapter.guid, configs[(i + 1) % 2])
        print(f"\nIP requests for eth0, {label} ({samples} samples):")
        print(f"  GET_IP_INFO (API)                      {ms(get_api)}")
        print(f"  read host/net/<mac>/config             {ms(get_file)}")
        print(f"  SET_IP_INFO (API, hv_set_ifconfig)     {ms(set_api)}")
        print(f"  write host/net/<mac>/config (5 lines)  {ms(set_file)}")


async def main(args: argparse.Namespace, network: SyntheticNetwork) -> None:
    config = hostsim.Config(command=["-"], daemon=hostsim.find_daemon(), items={})
    mountpoint = tempfile.mkdtemp(prefix="kvpfs-hostsim-bench-")
    try:
        async with hostsim.environment(config, mountpoint, network=network) as env:
            print(f"hv_kvp_daemon {config.daemon}, {os.cpu_count()} CPUs")
            if args.ip_samples:
                await ip_latency(env, args.ip_samples)
            await latency(env, args.samples)
            started = time.perf_counter()
            for i in range(args.keys):
                await env.host.set(0, f"fill-{i:05d}", f"value number {i}")
            fill_time = time.perf_counter() - started
            print(
                f"\nfilling pool 0 with {args.keys} keys: {fill_time:.2f} s "
                f"({args.keys / fill_time:.0f} SET/s; the daemon rereads and rewrites the "
                "whole file for each)"
            )
            await latency(env, args.samples)
            count = records()
            enumerate_times: list[float] = []
            listdir_times: list[float] = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                result = await env.host.items(0)
                enumerate_times.append(time.perf_counter() - started)
                assert result.complete and len(result.items) == count
                started = time.perf_counter()
                names = await thread(os.listdir, env.path("host", "external"))
                listdir_times.append(time.perf_counter() - started)
                assert isinstance(names, list) and len(names) == count
            median = statistics.median(enumerate_times)
            print(f"\nhost ENUMERATE of {count} keys ({args.rounds} rounds):")
            print(
                f"  host API items(0)          median {median:.3f} s"
                f"   ({median / (count + 1) * 1e6:.0f} us/request)"
            )
            print(f"  os.listdir(host/external)  median {statistics.median(listdir_times):.3f} s")
            print(f"\n{env.host.requests} host requests in all")
    finally:
        os.rmdir(mountpoint)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ip-samples", type=int, default=50)
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_hostsim: needs root (a private mount namespace, like kvpfs hostsim)")
    try:
        hostsim.enter_private_namespace()
        hostsim.prepare_filesystems()
        synthetic = hostsim.prepare_network(default_nics())
    except hostsim.HostsimError as exc:
        sys.exit(f"bench_hostsim: {exc}")
    try:
        trio.run(main, arguments, synthetic)
    finally:
        synthetic.close()
